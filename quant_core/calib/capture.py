"""Capture: the input statistics of a model's Linear layers recorded while the model runs somewhere else (inside
ComfyUI: any sampler, any prompt), inside a memory budget, and saved into — or accumulated onto — a calibration file
whose held-out part is made of whole runs.

The engine side knows nothing of ComfyUI: `CaptureSession` holds the running statistics of the current run and
attaches forward hooks to any torch module; `save_capture` merges one run into a file. The nodes (nodes/capture.py)
decide when a run starts, which module runs, and where the file goes.

Memory. A layer with K input features costs 20·K bytes for its diagonal statistics (max, sum, sum of squares), about
512·K for its sample of 256 input rows (bf16, for the run-time quality figures), and 4·K² more for a full Hessian
(fp32 sum). `plan_capture` gives every layer its diagonal, then full Hessians to the
narrowest layers first until the budget is spent (the most layers with a full Hessian per byte). The accumulators
are allocated up front on the device the model runs on (`CaptureSession.allocate`), before the model is loaded,
so ComfyUI's memory manager sees them and offloads weights instead of running out of memory. Each model call also
takes a transient fp32 copy of a layer's input. The Hessian of a call uses at most `max_tokens` of its rows
(evenly strided), which bounds the Gram products' cost at large resolutions; the other statistics use every row.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..errors import QuantError
from .file import CalibrationFile, write_calibration_stream
from .stats import MAX_HESSIAN_K, SAMPLE_ROWS, InputStats, StatsAccumulator, combine, layer_seed, merge_heldout

GIB = 1 << 30
DEFAULT_BUDGET_GB = 4.0  # leaves a 24 GB GPU room to sample a 12 GB (FP8) Flux-dev; see docs/CALIBRATION.md
DEFAULT_MAX_TOKENS = 1024  # rows per call entering the Hessian
DEFAULT_HELDOUT_EVERY = 4  # every 4th run (the 4th, 8th, …) goes to the held-out statistics
E4M3_MAX = 448.0
MAX_PROMPTS = 200  # prompts kept in the header (each cut to PROMPT_CHARS)
PROMPT_CHARS = 300
SIGMA_BINS = 400  # distinct noise levels kept in the header (rounded to 4 significant digits)
FEW_ROWS = 16  # a layer whose first call has fewer rows (per-sample vectors: modulation, embedders) keeps diagonals
MODES = ("accumulate", "new file")
ROLES = ("auto", "fit", "held-out")


def is_linear(module: torch.nn.Module) -> bool:
    """A Linear layer: torch's, or a Linear-like module (ComfyUI's mixed-precision ops are not torch.nn.Linear)."""
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Linear" and isinstance(getattr(module, "in_features", None), int)


def linear_widths(module: torch.nn.Module, prefix: str = "") -> dict[str, int]:
    """Every Linear layer under `module` (name → input width K), in module order."""
    return {prefix + name: int(m.in_features) for name, m in module.named_modules() if is_linear(m)}


@dataclass
class CapturePlan:
    """Which layers keep a full Hessian within the budget."""

    widths: dict[str, int]  # layer → K, model order
    full: set[str]
    budget_bytes: int
    used_bytes: int
    all_full_bytes: int  # what full Hessians for every layer would take
    order: list = field(default_factory=list)  # the order full Hessians are given in (narrowest first)
    few_rows: set = field(default_factory=set)  # layers seen with fewer than FEW_ROWS rows per call
    sample_rows: int = SAMPLE_ROWS  # input rows each layer keeps (part of its diagonal share)

    def demote(self, layer: str, ran=lambda name: False) -> list[str]:
        """`layer` turned out to see a few rows per call (a per-sample vector: its Hessian would have a rank of a few
        calls): it keeps its diagonal, and the bytes go to the next layers in the plan's order. Returns the layers
        that gain a full Hessian."""
        self.few_rows.add(layer)
        if layer not in self.full:
            return []
        self.full.discard(layer)
        self.used_bytes -= 4 * self.widths[layer] ** 2
        gained = []
        for name in self.order:
            if name in self.full or name in self.few_rows or ran(name):
                continue  # a layer already running without a Hessian in this run cannot start one midway
            cost = 4 * self.widths[name] ** 2
            if self.used_bytes + cost > self.budget_bytes:
                break  # the order is by width: nothing after this fits either
            self.full.add(name)
            self.used_bytes += cost
            gained.append(name)
        return gained

    def describe(self) -> str:
        n = len(self.widths)
        line = (f"{len(self.full)} of {n} layers with a full Hessian, {n - len(self.full)} diagonal only; "
                f"{self.used_bytes / GIB:.2f} GiB of the {self.budget_bytes / GIB:.2f} GiB budget")
        if len(self.full) < n:
            line += f" (a full Hessian for every layer needs {self.all_full_bytes / GIB:.1f} GiB)"
        if self.few_rows:
            line += (f"; {len(self.few_rows)} layers see one vector per sample (modulation, embedders): diagonal "
                     "only, their share went to other layers")
        return line


def plan_capture(widths: dict[str, int], budget_bytes: int, hessian: bool = True,
                 sample_rows: int = SAMPLE_ROWS) -> CapturePlan:
    """Diagonals (with a sample of `sample_rows` input rows) for every layer, then full Hessians narrowest layer
    first while they fit in `budget_bytes`."""
    if not widths:
        raise QuantError("capture: the model has no Linear layers to record")
    diagonal = sum(StatsAccumulator.nbytes(k, False, sample_rows=sample_rows) for k in widths.values())
    all_full = diagonal + sum(4 * k * k for k in widths.values() if k <= MAX_HESSIAN_K)
    if diagonal > budget_bytes:
        raise QuantError(f"capture: a budget of {budget_bytes / GIB:.3g} GiB cannot hold even the diagonal statistics "
                         f"of the {len(widths)} layers ({diagonal / GIB:.3g} GiB): raise the budget to at least "
                         f"{math.ceil(diagonal / GIB * 1000) / 1000:.3f} GB")
    used, full = diagonal, set()
    order = [name for name, k in sorted(widths.items(), key=lambda item: item[1]) if k <= MAX_HESSIAN_K] \
        if hessian else []  # stable sort: model order among equal widths
    for name in order:
        cost = 4 * widths[name] ** 2
        if used + cost > budget_bytes:
            break
        full.add(name)
        used += cost
    return CapturePlan(dict(widths), full, int(budget_bytes), used, all_full, order, sample_rows=sample_rows)


@dataclass
class CapturedRun:
    """One run's statistics (accumulators on the capture device) and what it saw."""

    accumulators: dict[str, StatsAccumulator]
    plan: CapturePlan
    model: str
    kind: str
    calls: int
    sigmas: Counter
    prompts: list[str]
    max_tokens: int

    @property
    def n_tokens(self) -> int:
        return max((a.n for a in self.accumulators.values()), default=0)

    def stats(self, layer: str) -> InputStats | None:
        acc = self.accumulators.get(layer)
        return acc.result() if acc is not None and acc.n else None


@dataclass
class CaptureSession:
    """The running statistics of one capture: the current run's accumulators, and what the run has seen."""

    model: str  # what was captured, e.g. "Flux (diffusion model)"
    kind: str  # "diffusion model" or "text encoder"
    plan: CapturePlan
    max_tokens: int = DEFAULT_MAX_TOKENS
    run_id: object = None
    calls: int = 0
    sigmas: Counter = field(default_factory=Counter)
    prompts: list = field(default_factory=list)
    _acc: dict = field(default_factory=dict)

    def start(self, run_id) -> None:
        """Enter run `run_id` (e.g. ComfyUI's prompt id): statistics left by another run that never reached its save
        node (interrupted, failed) are dropped, so they cannot leak into this run's file."""
        if run_id != self.run_id:
            self.reset()
            self.run_id = run_id

    def reset(self) -> None:
        self._acc, self.calls, self.sigmas, self.prompts = {}, 0, Counter(), []

    def allocate(self, device) -> None:
        """Create every layer's accumulator on `device` now (before the model is loaded, so a memory manager sees
        the budget as used). A run already holding accumulators on another device keeps them."""
        for name in self.plan.widths:
            if name not in self._acc:
                self._acc[name] = self._accumulator(name, device)

    def note_call(self, sigma: torch.Tensor | None = None) -> None:
        """One model call; `sigma` (the noise level of each batch element) for the timestep coverage."""
        self.calls += 1
        if sigma is not None:
            for value in sigma.detach().float().flatten().tolist():
                if len(self.sigmas) < SIGMA_BINS or float(f"{value:.4g}") in self.sigmas:
                    self.sigmas[float(f"{value:.4g}")] += 1

    def note_prompt(self, text: str) -> None:
        if len(self.prompts) < MAX_PROMPTS:
            self.prompts.append(str(text)[:PROMPT_CHARS])

    @contextlib.contextmanager
    def hooks(self, module: torch.nn.Module, prefix: str = ""):
        """Forward hooks on the planned Linear layers under `module` (named `prefix + name`) while in the block.
        The hooks only read the inputs: the module's outputs are untouched."""
        handles = []
        try:
            for name, m in module.named_modules():
                if is_linear(m) and prefix + name in self.plan.widths:
                    handles.append(m.register_forward_hook(self._hook(prefix + name)))
            yield len(handles)
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            x = inputs[0]
            acc = self._acc.get(name)
            if acc is None:
                acc = self._acc[name] = self._accumulator(name, x.device)
            if not acc.n and name not in self.plan.few_rows and x.numel() < FEW_ROWS * x.shape[-1]:
                self._demote(name)
            with torch.no_grad():
                acc.add(x.to(acc.sum.device))
        return hook

    def _accumulator(self, name: str, device) -> StatsAccumulator:
        return StatsAccumulator(self.plan.widths[name], name in self.plan.full, device=device,
                                gram_dtype=torch.float32, buffered=False, max_gram_tokens=self.max_tokens,
                                sample_rows=self.plan.sample_rows, seed=layer_seed(0, name))

    def _demote(self, name: str) -> None:
        """A layer with a few rows per call gives its Hessian's memory to layers that have not run yet."""
        acc = self._acc[name]
        acc.gram = None  # freed before the gains are allocated: the total stays within the budget
        for gained in self.plan.demote(name, lambda n: n in self._acc and self._acc[n].n > 0):
            other = self._acc.get(gained)
            if other is not None:
                other.gram = torch.zeros(other.k, other.k, dtype=torch.float32, device=other.sum.device)

    def take(self, run_id) -> CapturedRun | None:
        """This run's statistics (None if the capture did not see the run), and a fresh start."""
        if run_id != self.run_id or not self.calls:
            return None
        run = CapturedRun({k: a for k, a in self._acc.items() if a.n}, self.plan, self.model, self.kind, self.calls,
                          self.sigmas, self.prompts, self.max_tokens)
        self.reset()
        self.run_id = None
        return run


def new_session(model: str, kind: str, widths: dict[str, int], budget_gb: float = DEFAULT_BUDGET_GB,
                max_tokens: int = DEFAULT_MAX_TOKENS, hessian: bool = True) -> CaptureSession:
    """A capture of the Linear layers `widths` (name → K) within `budget_gb` of the model device's memory."""
    if not budget_gb >= 0:
        raise QuantError(f"capture: budget must be 0 GB or more, not {budget_gb}")
    if max_tokens < 0:
        raise QuantError("capture: max_tokens must be 0 (every row) or more")
    return CaptureSession(model, kind, plan_capture(widths, int(budget_gb * GIB), hessian), max_tokens)


@dataclass
class SaveSummary:
    path: str
    role: str  # "fit" or "held-out"
    runs: int
    heldout_runs: int
    layers: int
    full: int
    tokens: int
    info: dict

    def describe(self) -> str:
        sig = self.info.get("sigmas") or {}
        cover = f", noise levels {sig['min']:.4g}–{sig['max']:.4g} ({sig['distinct']} distinct)" if sig else ""
        return (f"run saved as {self.role} statistics into {os.path.basename(self.path)}: {self.runs} fitting and "
                f"{self.heldout_runs} held-out runs, {self.info.get('calls', 0)} model calls, {self.tokens} tokens "
                f"per layer (fit){cover}; {self.full} of {self.layers} layers with a full Hessian, "
                f"{self.layers - self.full} diagonal only")


def save_capture(path: str, run: CapturedRun | None, mode: str = "accumulate", role: str = "auto",
                 heldout_every: int = DEFAULT_HELDOUT_EVERY) -> SaveSummary:
    """Write one captured run into the calibration file at `path`: a new file, or merged into an existing capture
    of the same model (mode "accumulate"; "new file" refuses an existing name). The run goes to the fitting or
    held-out statistics (`role`; "auto": every `heldout_every`-th run is held out, never the first). Atomic: an
    error or interruption leaves the file as it was."""
    if mode not in MODES or role not in ROLES:
        raise QuantError(f"save calibration: mode must be one of {MODES} and role one of {ROLES}")
    if heldout_every < 0 or heldout_every == 1:
        raise QuantError("save calibration: heldout_every must be 0 (no held-out runs) or at least 2")
    if run is None or not run.n_tokens:
        raise QuantError("the capture saw no tokens in this run: the captured model did not run (connect the "
                         "Capture node's output to the sampler or text encode node; a cached sampler result does not "
                         "run the model again: change the seed or prompt)")
    existing = _open_existing(path, mode, run)
    try:
        info = existing.capture_info() if existing is not None else {}
        runs, held = int(info.get("runs", 0)), int(info.get("heldout_runs", 0))
        to_heldout = _to_heldout(role, runs, held, heldout_every, path)
        info = _merged_info(info, run, to_heldout, heldout_every)
        layout = {layer: _layout(existing, layer, run, to_heldout) for layer in run.plan.widths
                  if layer in run.accumulators or (existing is not None and layer in existing)}

        fit_tokens = []

        def produce(layer: str) -> InputStats:
            old = existing.get(layer) if existing is not None else None
            new = run.stats(layer)
            if to_heldout:
                merged = merge_heldout(old.fit_part(), combine(old.heldout_part(), new))
            else:
                merged = merge_heldout(combine(old.fit_part() if old else None, new),
                                       old.heldout_part() if old else None)
            merged.input_scale = merged.absmax.max().reshape(()) / E4M3_MAX
            _check_layout(layer, merged, layout[layer])
            fit_tokens.append(merged.n_tokens)
            return merged
        diagonal = [layer for layer, keys in layout.items() if "hessian" not in keys]
        info["layers"] = {"total": len(layout), "full_hessian": len(layout) - len(diagonal), "diagonal_only": diagonal}
        source = f"ComfyUI capture of {run.model}"
        write_calibration_stream(path, layout, produce, source, overwrite=existing is not None,
                                 metadata={"inputs": "captured", "capture": json.dumps(info, separators=(",", ":"))})
    finally:
        if existing is not None:
            existing.close()
    return SaveSummary(path, "held-out" if to_heldout else "fit", info["runs"], info["heldout_runs"], len(layout),
                       len(layout) - len(diagonal), max(fit_tokens, default=0), info)


def _open_existing(path: str, mode: str, run: CapturedRun) -> CalibrationFile | None:
    if not os.path.lexists(path):
        return None
    if mode == "new file":
        raise QuantError(f"{os.path.basename(path)} exists: choose mode accumulate to add this run to it, or another "
                         "file name (a calibration file is never replaced)")
    existing = CalibrationFile(path)
    try:
        if existing.inputs != "captured":
            raise QuantError(f"{os.path.basename(path)} was not made by a capture ({existing.source!r}): runs are only "
                             "added to capture files; choose another file name")
        _same_model(existing, run, path)
    except BaseException:
        existing.close()
        raise
    return existing


def _same_model(existing: CalibrationFile, run: CapturedRun, path: str) -> None:
    """Refuse to add a run of another model (layer names or widths differ), naming the layers."""
    old, new = existing.widths(), {l: k for l, k in run.plan.widths.items() if l in run.accumulators}
    missing = [l for l in old if l not in new]
    extra = [l for l in new if l not in old]
    wrong = [l for l in old if l in new and old[l] != new[l]]
    if not (extra or wrong):
        return  # a run that skipped some layers (e.g. a model part not used by this sampler) is fine
    parts = []
    if extra:
        parts.append(f"{len(extra)} layers of this model are not in the file (e.g. {', '.join(extra[:5])})")
    if wrong:
        parts.append(f"{len(wrong)} layers have another input width (e.g. {', '.join(wrong[:5])})")
    if missing:
        parts.append(f"{len(missing)} layers of the file were not seen (e.g. {', '.join(missing[:5])})")
    raise QuantError(f"{os.path.basename(path)} holds statistics of another model "
                     f"({existing.capture_info().get('model', existing.source)!r}; this run: {run.model!r}): "
                     + "; ".join(parts) + ". Save into another file name")


def _to_heldout(role: str, runs: int, held: int, every: int, path: str) -> bool:
    if role == "held-out":
        if not runs:
            raise QuantError(f"{os.path.basename(path)}: the first run of a file must be a fitting run (the methods "
                             "need statistics to fit on); held-out runs come after")
        return True
    if role == "fit":
        return False
    return bool(every) and runs > 0 and (runs + held + 1) % every == 0


def _merged_info(info: dict, run: CapturedRun, to_heldout: bool, every: int) -> dict:
    sigmas = Counter({float(k): int(v) for k, v in (info.get("sigma_histogram") or [])})
    sigmas.update(run.sigmas)
    prompts = list(info.get("prompts") or [])
    prompts += [p for p in run.prompts if p not in prompts][: max(MAX_PROMPTS - len(prompts), 0)]
    out = {
        "model": info.get("model", run.model), "kind": run.kind,
        "runs": int(info.get("runs", 0)) + (not to_heldout), "heldout_runs": int(info.get("heldout_runs", 0)) + to_heldout,
        "calls": int(info.get("calls", 0)) + run.calls, "prompts": prompts,
        "heldout_every": every, "budget_gb": round(run.plan.budget_bytes / GIB, 3), "max_tokens": run.max_tokens,
        "sigma_histogram": sorted(sigmas.items())[:SIGMA_BINS],
    }
    if sigmas:
        out["sigmas"] = {"min": min(sigmas), "max": max(sigmas), "distinct": len(sigmas)}
    log = list(info.get("run_log") or [])
    log.append({"role": "held-out" if to_heldout else "fit", "calls": run.calls, "tokens": run.n_tokens,
                "prompts": run.prompts[:8]})
    out["run_log"] = log[-MAX_PROMPTS:]
    return out


def _layout(existing: CalibrationFile | None, layer: str, run: CapturedRun, to_heldout: bool) -> dict:
    """The keys (suffix → shape) of a layer after the merge, known before anything is read."""
    k = run.plan.widths[layer]
    old = existing.layers.get(layer, set()) if existing is not None else set()
    new_seen = layer in run.accumulators
    new_full = new_seen and run.accumulators[layer].gram is not None
    fit_keys = {s for s in old if not s.startswith("heldout_")}
    held_keys = {s for s in old if s.startswith("heldout_")}
    base = {"input_absmax", "n_tokens", "input_mean_sq", "input_mean", "input_scale"}
    shapes = {"n_tokens": (), "heldout_n_tokens": (), "input_scale": (), "hessian": (k, k), "heldout_hessian": (k, k)}
    for sample in ("input_sample", "heldout_input_sample"):
        if sample in old:
            shapes[sample] = (existing.sample_rows(layer, sample), k)
    if not to_heldout and new_seen:
        full = new_full and (not fit_keys or "hessian" in fit_keys)
        fit_keys = base | ({"hessian"} if full else set()) | _sample_key(run, layer, fit_keys, "input_sample", shapes)
    if to_heldout and new_seen:
        full = new_full and (not held_keys or "heldout_hessian" in held_keys)
        held_keys = {"heldout_mean_sq", "heldout_mean", "heldout_n_tokens"} | ({"heldout_hessian"} if full else set()) \
            | _sample_key(run, layer, held_keys, "heldout_input_sample", shapes)
    return {s: shapes.get(s, (k,)) for s in sorted(fit_keys | held_keys)}


def _sample_key(run: CapturedRun, layer: str, old_keys: set, key: str, shapes: dict) -> set:
    """The merged part's input-sample key, its shape set in `shapes` (stats.merge_samples: min(rows, old + new)); none
    when either side lacks a sample (a merged sample must describe all rows)."""
    acc = run.accumulators[layer]
    if acc.sample is None or (old_keys and key not in old_keys):
        return set()
    new_rows = min(acc.n, acc.sample.shape[0])
    old_rows = shapes[key][0] if key in shapes else 0
    shapes[key] = (min(SAMPLE_ROWS, old_rows + new_rows) if old_rows else new_rows, run.plan.widths[layer])
    return {key}


def _check_layout(layer: str, stats: InputStats, keys: dict) -> None:
    from .file import stats_layout
    got = stats_layout(stats)
    if set(got) != set(keys):
        raise QuantError(f"capture: internal error: layer {layer} has statistics {sorted(got)}, planned {sorted(keys)}")
