"""Plan from MODEL on a CUDA machine, in-process with a real ComfyUI (default: the newer tree in QUANT_CORE_COMFYUI_V3,
with its dynamic VRAM loading when comfy-aimdo is importable): the graph's patched model computed on ComfyUI's device.

A Flux-shaped model (hidden 3072, --double/--single blocks, bf16) is loaded with ComfyUI's loader, a LoRA (rank 16,
every block Linear) and a LoHa (rank 8, the attention projections) are applied with ComfyUI's LoRA code, and the model
is sampled once (so ComfyUI has loaded it the way it does for sampling). Then:

- an unquantized save (`dtype: as loaded`): every tensor compared with what ComfyUI itself computes for that key
  (`ModelPatcher.patch_weight_to_device(..., return_weight=True)`), and the reloaded file sampled with the same seed;
- an INT8 save: time, peak GPU memory, host RSS, and the reloaded file's latent next to the patched model's.

    QUANT_CORE_COMFYUI_V3=/path/to/ComfyUI python benchmarks/graph_gpu.py --double 4 --single 8
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _enable_dynamic_vram(mm) -> None:
    """What ComfyUI's main.py does when dynamic VRAM is on: devices registered with comfy-aimdo, loaders then give
    ModelPatcherDynamic."""
    import comfy.memory_management
    import comfy.model_patcher
    import comfy_aimdo.control
    from comfy.cli_args import args as comfy_args
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(comfy_args.vram_headroom * 1024 ** 3))
                                              for d in mm.get_all_torch_devices())
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
    if not ok:
        sys.exit("comfy-aimdo could not initialise the devices: no dynamic VRAM here")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


def comfy_patched(model, key: str):
    """The weight ComfyUI samples with for `key`: patched in place while the model is loaded the classic way (its
    backup holds the base), or patched on the fly by its LowVramPatch in the weight's dtype (dynamic VRAM)."""
    import comfy.model_patcher
    import comfy.utils
    if key in model.backup:
        return comfy.utils.get_attr(model.model, key)
    if model.is_dynamic():
        base = comfy.utils.get_attr(model.model, key)
        return comfy.model_patcher.LowVramPatch(key, model.patches)(base.to(model.load_device, copy=True))
    return model.patch_weight_to_device(key, device_to=model.load_device, return_weight=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dynamic", action="store_true",
                        help="start ComfyUI's dynamic VRAM loading (comfy-aimdo) the way its main.py does at startup")
    args = parser.parse_args()

    import torch
    from comfy_env import comfyui_tree, import_pack
    tree = str(comfyui_tree())
    sys.path.insert(0, tree)  # ComfyUI's own modules first; not --cpu: this is the GPU run
    from comfy_env import add_stubs
    add_stubs()
    if not torch.cuda.is_available():  # a CPU smoke run of the script
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = True
    if args.dynamic:
        import comfy_aimdo.control
        try:
            comfy_aimdo.control.init(simple_vram_headroom=None)
        except TypeError:
            comfy_aimdo.control.init()
    import comfy.model_management as mm
    import comfy.sd
    if args.dynamic:
        _enable_dynamic_vram(mm)
    from comfy_graphs import tiny_flux_state_dict
    from graph_memory import RssSampler
    pack = import_pack()
    importlib.import_module(f"{pack.__name__}.nodes.extension")
    nodes = pack.nodes.extension.NODES_BY_ID
    import comfy.memory_management
    print(f"ComfyUI {tree}: device {mm.get_torch_device()}, dynamic VRAM "
          f"{getattr(comfy.memory_management, 'aimdo_enabled', False)}")

    sd = tiny_flux_state_dict(double=args.double, single=args.single)
    params = sum(v.numel() for v in sd.values())
    from safetensors.torch import save_file
    source_dir = tempfile.mkdtemp()
    source = os.path.join(source_dir, "flux.safetensors")
    save_file(sd, source)
    del sd
    base = comfy.sd.load_diffusion_model(source)  # as UNETLoader does (a dynamic-VRAM patcher where enabled)
    g = torch.Generator().manual_seed(0)
    lora, loha = {}, {}
    for key, value in base.model.state_dict().items():
        if key.endswith(".weight") and value.dim() == 2 and "blocks" in key:
            name, (n, k) = key[: -len(".weight")], value.shape
            lora |= {f"{name}.lora_up.weight": torch.randn(n, 16, generator=g) * 0.01,
                     f"{name}.lora_down.weight": torch.randn(16, k, generator=g) * 0.01}
            if "attn" in key:
                loha |= {f"{name}.hada_w1_a": torch.randn(n, 8, generator=g) * 0.03,
                         f"{name}.hada_w1_b": torch.randn(8, k, generator=g) * 0.03,
                         f"{name}.hada_w2_a": torch.randn(n, 8, generator=g) * 0.03,
                         f"{name}.hada_w2_b": torch.randn(8, k, generator=g) * 0.03}
    model, _ = comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)
    model, _ = comfy.sd.load_lora_for_models(model, None, loha, 0.5, 0)
    del lora, loha
    print(f"model: {params / 1e9:.2f} B parameters ({args.double}+{args.single} blocks), patcher "
          f"{type(model).__name__}, held as {next(model.model.parameters()).dtype}, {len(model.patches)} patched tensors")

    def sample(m, seed=1):
        import comfy.sample
        gen = torch.Generator().manual_seed(seed)
        cond = [[torch.randn(1, 77, 768, generator=gen), {"pooled_output": torch.randn(1, 768, generator=gen),
                                                          "guidance": 3.5}]]
        latent = torch.zeros(1, 16, 32, 32)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(m, noise, args.steps, 1.0, "euler", "simple", cond, cond, latent, seed=seed,
                                   disable_pbar=True).float().cpu()

    patched_latent = sample(model)  # ComfyUI loads (and patches, its way) the model for sampling
    plan = nodes["QuantCorePlanFromModel"].execute(model, "as loaded").args[0]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fmt in ("none", "int8"):
            p = plan if fmt == "none" else plan.with_quantize(format=fmt)
            out = os.path.join(d, f"{fmt}.safetensors")
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            gpu_before = torch.cuda.memory_allocated() if cuda else 0
            start = time.perf_counter()
            with RssSampler() as rss:
                rss_before = RssSampler.now()
                result = pack.quant_core.convert(p.open_source(), out, p.job(verify="cheap", progress=False))
            seconds = time.perf_counter() - start
            peak_gpu = torch.cuda.max_memory_allocated() - gpu_before if cuda else 0
            exact = None
            if fmt == "none":
                from safetensors import safe_open
                mismatched = 0
                with safe_open(out, "pt") as f:
                    for key, native in p.computed.key_map:
                        want = comfy_patched(model, native) if native in model.patches else None
                        if want is not None and not torch.equal(f.get_tensor(key), want.to("cpu")):
                            mismatched += 1
                exact = f"{mismatched} of {len(model.patches)} patched tensors differ from ComfyUI's"
            reloaded = comfy.sd.load_diffusion_model(out)
            latent = sample(reloaded)
            del reloaded
            mm.soft_empty_cache()
            err = float((latent - patched_latent).norm() / patched_latent.norm())
            rows.append((fmt, seconds, peak_gpu, rss.peak - rss_before, os.path.getsize(out), err,
                         bool(torch.equal(latent, patched_latent)), exact))
    gib = 1 << 30
    print("\n| save | seconds | peak GPU added (GiB) | host anonymous RSS added (GiB) | file (GiB) | latent rel. L2 vs patched "
          "| bit-identical | weights vs ComfyUI's own patching |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, s, gpu, rss, size, err, same, exact in rows:
        print(f"| {fmt} | {s:.1f} | {gpu / gib:.2f} | {rss / gib:.2f} | {size / gib:.2f} | {err:.5f} | {same} | "
              f"{exact or ''} |")


if __name__ == "__main__":
    main()
