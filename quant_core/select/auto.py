"""Automatic mixed precision (`--auto-bits B` or `--auto-size-gb S`, `--target-gpu CLASS`): every layer's format
chosen from measurements, the least total error that fits the budget.

1. Candidates: the formats ComfyUI runs with a native kernel on the target GPU class (`TARGETS`, one table), each
   only where it fits the layer's shape, and keeping the layer unquantized (its source dtype: BF16 for the models
   this is made for), always.
2. Sensitivity (`measure_layer`), one streaming pass over the selected layers (one weight in memory at a time, on the
   run's device): each candidate's codes are computed as the conversion will compute them (the run's method, with
   its comparison against round-to-nearest, and the bias correction), and the layer's output is emulated as ComfyUI
   computes it on the target class (`quantization.runtime`: activations quantized where its kernels do) on the
   calibration file's input rows — held-out rows when the file has them. Without real statistics the rows are
   N(0, I), whose output error is the weight error (plus the activations' on such rows); the report says which.
3. The choice (`select.knapsack.solve`): minimize the sum over layers of the noise at the model's output — each
   layer's per-channel output noise weighted by the calibration file's `output_gain` (how much of it reaches the
   output, recorded by `calibrate --hf-model`) — or, without gains, of the layers' relative output noise
   ‖ŷ − y‖² / ‖y‖², subject to Σ stored bytes ≤ the budget: a multiple-choice knapsack, solved by exact dynamic
   programming.

What it assumes: per-layer output noise adds up at the model's output (measured on all-MiniLM-L6-v2: NVFP4 one layer
at a time, the layers' output noise summed, predicts the all-layers figure within 0.1 dB), and reaches it to first
order (gains) or, without gains, with the same weight for every layer's relative noise — measured to be a poor
stand-in on MiniLM. docs/AUTO.md has the measurements.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from ..errors import QuantError
from ..io.dtypes import element_size, torch_dtype
from ..io.writer import header_reserve
from ..quantization.formats import Format, make_format
from ..quantization.formats.markers import MARKER_SUFFIX, QUANT_METADATA_KEY
from ..quantization.layer import LayerRun, count_nonfinite, layer_method, pick_device, streaming_threshold
from ..quantization.methods import make_method
from ..quantization.runtime import GPU_CLASSES, TEXT_ENCODER_PRESETS, Runtime, emulate, evaluation_rows, runtime
from ..report import sqnr_db
from .knapsack import Infeasible, solve
from .plan import KEEP, QUANTIZE, REMOVE, Decision, Plan

KEEP_OPTION = "keep"


@dataclass(frozen=True)
class Candidate:
    """A format the chooser may give a layer: a family of `--format`, rotated (ConvRot) or not."""

    family: str
    rotated: bool = False

    def build(self, group: int, int4_linear_dtype: str) -> Format:
        return make_format(self.family, None, 128, group if self.rotated else 0,
                           int4_linear_dtype if self.family == "int4" else "int4")


CANDIDATES = {"int8": Candidate("int8"), "int8_convrot": Candidate("int8", True), "int4": Candidate("int4", True),
              "fp8": Candidate("fp8"), "mxfp8": Candidate("mxfp8"), "nvfp4": Candidate("nvfp4")}


@dataclass(frozen=True)
class Target:
    """A `--target-gpu`: the formats allowed, and the GPU class whose computation the errors are measured as."""

    formats: tuple[str, ...]  # keys of CANDIDATES; keeping the layer is always a candidate too
    emulated: str  # a runtime.GPU_CLASSES key
    why: str


TARGETS = {
    "ampere": Target(("int8", "int8_convrot", "int4"), "ampere",
                     "RTX 20/30, A100: INT8 and INT4 tensor cores (INT4 as W4A4); no FP8, FP4 or MXFP8 kernels"),
    "ada": Target(("int8", "int8_convrot", "fp8", "int4"), "ada",
                  "RTX 40, L40S: as Ampere, plus FP8 (E4M3 activations)"),
    "hopper": Target(("fp8", "int8", "int8_convrot", "int4"), "hopper",
                     "H100, H200: FP8 and INT8 tensor cores; INT4 files run as W4A8 on the INT8 GEMM, the only 4-bit "
                     "format with a kernel there"),
    "blackwell": Target(("nvfp4", "mxfp8", "fp8", "int8", "int8_convrot"), "blackwell",
                        "RTX 50, B200: NVFP4 and MXFP8 (FP4/FP8 tensor cores with block scales), FP8, INT8"),
    "any": Target(("int8", "int8_convrot", "int4"), "ampere",
                  "formats ComfyUI never disables (INT8, INT4); measured where they are least accurate: INT4 as W4A4 "
                  "(RTX 20-40)"),
}
TARGET_GPUS = tuple(TARGETS)


def target_help() -> str:
    """The --target-gpu help text, from TARGETS."""
    return "; ".join(f"{name}: {', '.join(t.formats)} ({t.why})" for name, t in TARGETS.items())


@dataclass
class Option:
    """One candidate of one layer: what it costs in the file and what error it gives."""

    name: str  # a CANDIDATES key, or KEEP_OPTION
    format: Format | None  # None: kept unquantized
    nbytes: int  # bytes the layer adds to the file: stored tensors (codes and scales) and marker
    noise: float = 0.0  # output noise energy ‖ŷ − y‖² on the measured rows
    describe: str = ""
    at_output: float | None = None  # noise per token it adds at the model's output (Σ_n gain_n·e_n), if gains known


@dataclass
class LayerChoice:
    decision: Decision
    numel: int
    signal: float = 0.0  # ‖y‖² on the measured rows
    options: list[Option] = field(default_factory=list)
    chosen: int = 0
    measured_db: float | None = None  # after writing: the written layer's output SQNR as computed (report)

    def relative(self, option: Option) -> float:
        return option.noise / self.signal if self.signal > 0 else 0.0

    def cost(self, option: Option, gains: bool) -> float:
        """What the chooser minimizes the sum of: the noise at the model's output (with gains), else the layer's
        relative output noise."""
        return option.at_output if gains else self.relative(option)

    def predicted_db(self, option: Option | None = None) -> float:
        option = option or self.options[self.chosen]
        return sqnr_db(self.signal, option.noise)


@dataclass
class AutoChoice:
    """What the chooser decided and why: the report's `auto` part."""

    target: str
    emulated_on: str  # the GPU class's label
    basis: str  # what the errors were measured on
    asked: str  # the budget as given ("--auto-bits 5.6")
    budget_bytes: int  # for the layers chosen here
    fixed_bytes: int  # the rest of the file (other tensors, header upper bound)
    layers: list[LayerChoice]
    exact: bool
    cell: int
    gains: bool = False  # each layer weighed by its recorded output gain (else: equal relative noise)
    output_energy: float | None = None  # E‖Y_t‖² of the model output per token (calibration header), if recorded
    file_bytes: int | None = None  # after writing

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.layers)

    def chosen_bytes(self) -> int:
        return sum(c.options[c.chosen].nbytes for c in self.layers)

    def bits(self, nbytes: int) -> float:
        return 8.0 * nbytes / max(self.numel, 1)

    def mix(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.layers:
            name = c.options[c.chosen].describe
            counts[name] = counts.get(name, 0) + 1
        return counts

    def noise_db(self, pick=None) -> float:
        """The chooser's objective in dB (`pick` maps a layer to the option measured; default the chosen one): with
        gains the predicted model output SQNR, E‖Y‖² / Σ noise at the output; else -10·log10 of the layers' mean
        relative output noise."""
        pick = pick or (lambda c: c.options[c.chosen])
        if self.gains:  # a file without output_energy: relative to E‖Y_t‖² = 1
            return sqnr_db(self.output_energy or 1.0, sum(pick(c).at_output for c in self.layers))
        return sqnr_db(len(self.layers), sum(c.relative(pick(c)) for c in self.layers))

    def objective(self) -> str:
        if self.gains:
            return "noise at the model's output, each layer's through its recorded output gain"
        return "the sum of the layers' relative output noise (no output gains in the calibration: equal weights)"

    def uniform(self) -> dict[str, tuple[float, float]]:
        """Each candidate format as if given to every layer (where it fits all of them): (bits/weight, noise dB)."""
        out = {}
        for name in dict.fromkeys(o.name for c in self.layers for o in c.options):
            if all(any(o.name == name for o in c.options) for c in self.layers):
                def pick(c, name=name):
                    return next(o for o in c.options if o.name == name)
                out[name] = (self.bits(sum(pick(c).nbytes for c in self.layers)), self.noise_db(pick))
        return out

    def summary(self) -> str:
        mix = ", ".join(f"{n}× {f}" for f, n in self.mix().items())
        size = f", file {self.file_bytes / 1e9:.3f} GB" if self.file_bytes is not None else ""
        measured = [c for c in self.layers if c.measured_db is not None]
        after = ""
        if measured:
            gap = max(abs(c.measured_db - c.predicted_db()) for c in measured if math.isfinite(c.measured_db)) \
                if any(math.isfinite(c.measured_db) for c in measured) else 0.0
            after = f"; measured after writing: within {gap:.2f} dB of the prediction on {len(measured)} layers"
        return (f"auto ({self.target}, errors as computed on {self.emulated_on}, on {self.basis}): asked {self.asked} "
                f"= {self.bits(self.budget_bytes):.3f} bits/weight ({(self.budget_bytes + self.fixed_bytes) / 1e9:.3f} "
                f"GB), chose {self.bits(self.chosen_bytes()):.3f} bits/weight{size}; {mix}; minimizing "
                f"{self.objective()}: predicted {'model output SQNR' if self.gains else 'mean layer noise'} "
                f"{self.noise_db():.2f} dB{after}")

    def table(self) -> str:
        width = max([len(c.decision.layer) for c in self.layers] + [5])
        fmt = max([len(c.options[c.chosen].describe) for c in self.layers] + [6])
        lines = [f"{'layer':<{width}}  {'chosen':<{fmt}} {'bits':>6} {'pred dB':>8} {'meas dB':>8} {'share':>6}  "
                 "candidates (bits/dB)"]
        for c in self.layers:
            o = c.options[c.chosen]
            others = ", ".join(f"{x.name} {self.bits_of(c, x):.2f}/{c.predicted_db(x):.1f}" for x in c.options)
            meas = f"{c.measured_db:8.2f}" if c.measured_db is not None else f"{'-':>8}"
            share = f"{100 * self.share(c):5.1f}%" if self.gains else f"{'-':>6}"
            lines.append(f"{c.decision.layer:<{width}}  {o.describe:<{fmt}} {self.bits_of(c, o):6.2f} "
                         f"{c.predicted_db(o):8.2f} {meas} {share}  {others}")
        return "\n".join(lines)

    def share(self, c: LayerChoice) -> float | None:
        """The chosen option's part of the predicted noise at the model's output (with gains), 0…1."""
        if not self.gains:
            return None
        total = sum(x.options[x.chosen].at_output for x in self.layers)
        return c.options[c.chosen].at_output / total if total > 0 else 0.0

    @staticmethod
    def bits_of(c: LayerChoice, o: Option) -> float:
        return 8.0 * o.nbytes / max(c.numel, 1)

    def attach(self, report, file_bytes: int) -> None:
        """The measured figures after writing: each written layer's output SQNR as computed (report.LayerStats)."""
        self.file_bytes = file_bytes
        stats = {s.layer: s for s in report.layers}
        for c in self.layers:
            s = stats.get(c.decision.layer)
            if s is not None:
                c.measured_db = s.runtime_sqnr_db
        report.auto = self

    def to_json(self) -> dict:
        def finite(x):
            return x if x is None or math.isfinite(x) else ("inf" if x > 0 else "-inf")
        return {
            "target_gpu": self.target, "emulated_on": self.emulated_on, "measured_on": self.basis,
            "asked": self.asked, "budget_bytes": self.budget_bytes,
            "budget_bits_per_weight": self.bits(self.budget_bytes),
            "budget_gb": (self.budget_bytes + self.fixed_bytes) / 1e9,
            "chosen_bytes": self.chosen_bytes(), "chosen_bits_per_weight": self.bits(self.chosen_bytes()),
            "file_gb": None if self.file_bytes is None else self.file_bytes / 1e9,
            "objective": self.objective(), "output_gains": self.gains,
            "predicted_noise_db": finite(self.noise_db()), "exact": self.exact, "cell_bytes": self.cell,
            "uniform": {k: {"bits_per_weight": b, "predicted_noise_db": finite(db)}
                        for k, (b, db) in self.uniform().items()},
            "layers": [{"layer": c.decision.layer, "format": c.options[c.chosen].describe,
                        "bits_per_weight": self.bits_of(c, c.options[c.chosen]),
                        "predicted_db": finite(c.predicted_db()), "measured_db": finite(c.measured_db),
                        "share_of_output_noise": self.share(c),
                        "candidates": {o.name: {"bits_per_weight": self.bits_of(c, o), "db": finite(c.predicted_db(o))}
                                       for o in c.options}} for c in self.layers],
        }


def choose_formats(reader, plan: Plan, job, calibration, transform=None, notes: list | None = None,
                   on_layer=None) -> AutoChoice:
    """Measure every selected layer's candidates (one streaming pass), solve for the budget and write the choice
    into `plan` (each QUANTIZE decision gets its format, or becomes KEEP). Raises QuantError for a budget no choice
    fits, before anything is written. `on_layer(done, total)` is called after each measured layer (it may raise to
    stop: ComfyUI's Cancel)."""
    auto = job.auto
    target = TARGETS[auto.target_gpu]
    notes = notes if notes is not None else []
    formats = {name: CANDIDATES[name].build(job.quantize.convrot_group_size, job.quantize.int4_linear_dtype)
               for name in target.formats}
    layers = [LayerChoice(d, reader.info(d.key).numel) for d in plan.of(QUANTIZE)]
    for choice in layers:
        choice.options = _options(choice.decision, reader.info(choice.decision.key), formats)
    text_encoder = any(p in TEXT_ENCODER_PRESETS for p in job.select.presets)
    basis = _measure_all(reader, layers, job, calibration, transform, target.emulated, text_encoder, notes, on_layer)
    budget, fixed = _budget(reader, plan, layers, auto)
    gains = bool(layers) and all(o.at_output is not None for c in layers for o in c.options)
    try:
        solution = solve([[o.nbytes for o in c.options] for c in layers],
                         [[c.cost(o, gains) for o in c.options] for c in layers], budget)
    except Infeasible as e:
        numel = max(sum(c.numel for c in layers), 1)
        raise QuantError(f"{reader.path}: {_asked(auto)} is below the smallest file the {auto.target_gpu} formats "
                         f"give: {8 * e.least / numel:.3f} bits/weight ({(e.least + fixed) / 1e9:.3f} GB)") from None
    for c, index in zip(layers, solution.choice):
        c.chosen = index
        _apply(c)
    if layers and all(c.options[c.chosen].format is None for c in layers):
        notes.append("auto: the budget holds every selected layer unquantized; none is quantized")
    return AutoChoice(auto.target_gpu, GPU_CLASSES[target.emulated].label if not text_encoder
                      else "every GPU class (text encoder: weights dequantized)", "; ".join(sorted(basis)) or "-",
                      _asked(auto), budget, fixed, layers, solution.exact, solution.cell, gains,
                      _output_energy(calibration) if gains else None)


def _measure_all(reader, layers: list[LayerChoice], job, calibration, transform, emulated: str, text_encoder: bool,
                 notes: list, on_layer=None) -> set[str]:
    """The measuring pass: every layer's weight read once (LoRA merges applied), its candidates measured on the
    run's device; returns what the rows were."""
    device = pick_device(job.device)
    run = LayerRun(make_method(job.method, job.method_config), device, job.device.no_memory_limits, reader.path,
                   streaming_threshold(job.device, device), notes)
    by_key = {c.decision.key: c for c in layers}
    basis = set()
    ahead = 0 if job.device.low_memory else job.device.prefetch_bytes
    # exact: as the conversion gets them (a computed source's weights unrounded)
    tensors = reader.iter_tensors(list(by_key), prefetch_bytes=ahead, exact=frozenset(by_key))
    for done, (key, tensor) in enumerate(tqdm(tensors, total=len(by_key), desc="auto: measuring candidates",
                                              unit="layer", disable=not job.output.progress, dynamic_ncols=True)):
        if on_layer is not None:
            on_layer(done, len(by_key))
        if transform is not None:
            tensor = transform(key, tensor)
        choice = by_key[key]
        bad = count_nonfinite(tensor)
        if bad:  # as the conversion does: refused, or kept with --allow-nonfinite (no choice: any cost will do)
            if not job.quantize.allow_nonfinite:
                raise QuantError(f"{reader.path}: layer {choice.decision.layer} has {bad} NaN/Inf values; fix the "
                                 "checkpoint or pass --allow-nonfinite to keep such layers in high precision")
            choice.options = [replace(o, at_output=0.0) for o in choice.options if o.format is None]
            continue
        basis.add(measure_layer(choice, tensor, run, calibration, emulated, text_encoder))
        del tensor
    return basis


def _output_energy(calibration) -> float | None:
    """The model output's mean energy per token the calibration file recorded with its gains (header)."""
    source = getattr(calibration, "source", None)
    value = source.file.metadata.get("output_energy") if source is not None and source.file is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _asked(auto) -> str:
    return f"--auto-bits {auto.auto_bits:g}" if auto.auto_bits is not None else f"--auto-size-gb {auto.auto_size_gb:g}"


def _marker_bytes(fmt: Format, dtype_tag: str, fpmm: bool) -> int:
    conf = dict(fmt.marker(), orig_dtype=str(torch_dtype(dtype_tag)).removeprefix("torch."))
    if fpmm:
        conf["full_precision_matrix_mult"] = True
    return len(json.dumps(conf).encode("utf-8"))


def _options(decision: Decision, info, formats: dict[str, Format]) -> list[Option]:
    """Keeping the layer, and every candidate format that holds its shape, with its bytes in the file."""
    options = [Option(KEEP_OPTION, None, info.nbytes, describe=f"kept ({info.dtype})")]
    for name, fmt in formats.items():
        if fmt.fit(info.shape) is not None:
            continue
        stored = sum(math.prod(shape) * element_size(tag) for _, tag, shape in fmt.layout(info.shape))
        options.append(Option(name, fmt, stored + _marker_bytes(fmt, info.dtype, decision.full_precision_matrix_mult),
                              describe=fmt.describe()))
    return options


def measure_layer(choice: LayerChoice, tensor: torch.Tensor, run: LayerRun, calibration, emulated: str,
                  text_encoder: bool = False) -> str:
    """Each option's output noise on the layer's input rows, as computed on GPU class `emulated`; returns what the
    rows are. The codes are the conversion's own (method, guard against RTN, bias correction)."""
    d = choice.decision
    tensor = tensor.to(run.device_for(tensor.numel()))  # once, not once per candidate
    stats, _ = calibration.stats(d.layer, tensor.shape[1])
    method, evaluation, guard = layer_method(run, calibration, d.layer, stats)
    rows = evaluation_rows(d.layer, tensor.shape[1], stats)
    gain = getattr(stats, "output_gain", None)
    if gain is not None and gain.shape[0] != tensor.shape[0]:
        raise QuantError(f"--calibration-data: {d.layer}.output_gain has {gain.shape[0]} values, the layer "
                         f"{tensor.shape[0]} outputs (a file recorded on another model?)")
    correction = evaluation.correction_mean if evaluation is not None and evaluation.second_moment is not None \
        else None
    with torch.no_grad():
        for option in choice.options:
            if option.format is None:
                weight = tensor.to(device=run.device_for(tensor.numel()), dtype=torch.float32)
                approx, rt, shift = weight, Runtime("", None), None
            else:
                marker = dict(option.format.marker(), **({"full_precision_matrix_mult": True}
                                                         if d.full_precision_matrix_mult else {}))
                rt = runtime(marker, None, emulated, text_encoder)
                _, weight, approx, _ = run.compute(Decision(d.key, QUANTIZE, "", option.format,
                                                            d.full_precision_matrix_mult), tensor, stats, method, guard)
                shift = None if correction is None else (weight - approx) @ correction.to(weight.device)
            x = rows.x.to(weight.device)
            reference = x @ weight.T
            out = emulate(x, approx, rt)
            if shift is not None:
                out += shift
            per_channel = (out - reference).square().sum(0, dtype=torch.float64)  # [N]
            option.noise = float(per_channel.sum())
            if gain is not None:  # per token at the model's output
                option.at_output = float(per_channel @ gain.to(per_channel.device, torch.float64)) / x.shape[0]
            choice.signal = float(reference.square().sum(dtype=torch.float64))
            del weight, approx, out, reference
    what = rows.basis.split(" ", 1)[1] if rows.basis[:1].isdigit() else rows.basis  # "128 held-out …": no count
    return what if stats is not None else f"the weight error ({what})"


def _budget(reader, plan: Plan, layers: list[LayerChoice], auto) -> tuple[int, int]:
    """(bytes the chosen layers may take, bytes of the rest of the file: other tensors and an upper bound of the
    header). --auto-bits counts the chosen layers only; --auto-size-gb the whole file."""
    chosen = {c.decision.key for c in layers}
    entries, other = [], 0
    for d in plan.decisions.values():
        if d.action == REMOVE or d.key in chosen:
            continue
        info = reader.info(d.key)  # every other tensor is written as it is
        entries.append((d.key, info.dtype, info.shape))
        other += info.nbytes
    for c in layers:  # every option's tensors (distinct names): the header's upper bound
        info = reader.info(c.decision.key)
        for o in c.options:
            tensors = [(c.decision.key, info.dtype, info.shape)] if o.format is None else \
                [(f"{c.decision.layer}.{s}", t, sh) for s, t, sh in o.format.layout(info.shape)] + \
                [(f"{c.decision.layer}.{MARKER_SUFFIX}", "U8", (256,))]
            entries += [(f"{name}#{o.name}", t, sh) for name, t, sh in tensors]
    metadata = {**reader.metadata(), QUANT_METADATA_KEY: json.dumps(
        {"layers": {c.decision.layer: {"format": "x" * 64} for c in layers}}), "quant_core": "x" * 256}
    fixed = other + int(header_reserve(entries, metadata))
    if auto.auto_bits is not None:
        return int(auto.auto_bits * sum(c.numel for c in layers) / 8), fixed
    return int(auto.auto_size_gb * 1e9) - fixed, fixed


def _apply(c: LayerChoice) -> None:
    option = c.options[c.chosen]
    d = c.decision
    if option.format is None:
        d.action, d.format, d.reason = KEEP, None, f"auto: {option.describe}"
    else:
        d.format, d.reason = option.format, ""
