"""SmoothQuant in the forms that keep the model's function exact.

For a group of consumers that share one input X (e.g. q/k/v after one norm), with per-channel activation absmax
a_k (calibration file) and weight column absmax w_k (max over the group's weights):

    s_k = a_k^α / w_k^(1−α),   W ← W·diag(s) for every consumer,   preceding layer ← its output × diag(1/s)

The preceding layer comes from the declaration table (`fold_pairs.py`). No other form is written: NVFP4's
`pre_quant_scale` would express 1/s without a preceding layer, but ComfyUI 0.29 never reads it
(docs/FORMATS.md) — a file relying on it computes a different function there — so layers without a
declared fold are left unsmoothed and listed, one note per layer, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import QuantError
from .fold_pairs import LINEAR, NORM, fold_source, why_not_foldable
from ..calib.ranges import CalibrationStats

MIN_STAT = 1e-5  # floor of activation and weight absmax (dead channels)
S_RANGE = (1e-5, 1e5)


@dataclass
class SmoothGroup:
    source: str  # preceding layer (its name without .weight)
    kind: str  # NORM or LINEAR
    consumers: list[str]
    scale: torch.Tensor | None = None  # s, fp32 [K]


@dataclass
class SmoothingPlan:
    """Per-tensor rewrites for the stream: `apply(key, tensor)` returns the smoothed tensor."""

    groups: list[SmoothGroup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _consumer_scale: dict = field(default_factory=dict)  # consumer layer -> s
    _source_scale: dict = field(default_factory=dict)  # source layer -> (kind, s)

    def finish(self) -> None:
        for g in self.groups:
            for layer in g.consumers:
                self._consumer_scale[layer] = g.scale
            self._source_scale[g.source] = (g.kind, g.scale)

    def input_divisor(self, layer: str) -> torch.Tensor | None:
        """s of a smoothed consumer (its activations are divided by it), else None."""
        return self._consumer_scale.get(layer)

    def apply(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        layer, _, suffix = key.rpartition(".")
        s = self._consumer_scale.get(layer)
        source = self._source_scale.get(layer)
        if (s is None or suffix != "weight") and source is None:
            return tensor
        out = tensor.float()
        if s is not None and suffix == "weight":
            out = out * s.to(out.device)
        if source is not None:
            kind, t = source
            t = t.to(out.device)
            if suffix == "bias" or (kind == NORM and suffix == "weight"):
                out = out / t
            elif kind == LINEAR and suffix == "weight":
                out = out / t[:, None]
        return out.to(tensor.dtype) if tensor.is_floating_point() else out


def build_smoothing(reader, quantized_layers: list[str], stats: CalibrationStats, alpha: float,
                    transform=None) -> SmoothingPlan:
    """Group the quantized layers by declared preceding layer, compute s from the calibration absmax and the
    weights' column absmax (one extra read of each consumer weight). Layers that cannot be smoothed get a note."""
    keys = set(reader.keys())
    plan = SmoothingPlan()
    groups: dict[str, SmoothGroup] = {}
    for layer in quantized_layers:
        rule, source = fold_source(layer)
        problem = _fold_problem(reader, keys, layer, rule, source)
        if problem:
            plan.notes.append(f"smoothquant: not applied to {layer}: {problem}")
            continue
        groups.setdefault(source, SmoothGroup(source, rule.kind, [])).consumers.append(layer)
    for group in groups.values():
        _add_siblings(group, keys)
        problem = _compute_scale(group, reader, stats, alpha, transform)
        if problem:
            plan.notes += [f"smoothquant: not applied to {layer}: {problem}" for layer in group.consumers]
        else:
            plan.groups.append(group)
    if not plan.groups:
        raise QuantError(f"--smoothquant: no layer can be smoothed exactly ({plan.notes[0] if plan.notes else 'none'})")
    plan.finish()
    plan.notes.insert(0, f"smoothquant: {sum(len(g.consumers) for g in plan.groups)} layers smoothed "
                         f"(α={alpha:g}), 1/s folded into {len(plan.groups)} preceding layers")
    return plan


def _fold_problem(reader, keys: set, layer: str, rule, source) -> str:
    if rule is None:
        return why_not_foldable(layer)
    if f"{source}.weight" not in keys:
        return f"its declared preceding layer {source} is not in the file"
    k = reader.get_shape(f"{layer}.weight")[1]
    source_shape = reader.get_shape(f"{source}.weight")
    width = source_shape[0] if source_shape else 0
    if (rule.kind == NORM and tuple(source_shape) != (k,)) or (rule.kind == LINEAR and width != k):
        return (f"{source} has shape {list(source_shape)}, which does not match its {k} input channels "
                "(e.g. grouped-query attention)")
    return ""


def _add_siblings(group: SmoothGroup, keys: set) -> None:
    """Every layer in the file fed by the same source must be rescaled, quantized or not (exactness)."""
    for key in keys:
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer and layer not in group.consumers and fold_source(layer)[1] == group.source:
            group.consumers.append(layer)
    group.consumers.sort()


def _compute_scale(group: SmoothGroup, reader, stats: CalibrationStats, alpha: float, transform) -> str:
    absmax = [stats.input_absmax(layer) for layer in group.consumers]
    absmax = [a for a in absmax if a is not None]
    if not absmax:
        return f"no input_absmax for it in {stats.path}"
    act = torch.stack(absmax).amax(dim=0)
    cols = []
    for layer in group.consumers:
        weight = reader.get_tensor(f"{layer}.weight")
        if transform is not None:
            weight = transform(f"{layer}.weight", weight)
        cols.append(weight.float().abs().amax(dim=0))
    if any(c.shape != act.shape for c in cols):
        return f"input_absmax has {act.numel()} channels, the weights {cols[0].numel()}"
    weight_absmax = torch.stack(cols).amax(dim=0)
    s = act.clamp(min=MIN_STAT).pow(alpha) / weight_absmax.clamp(min=MIN_STAT).pow(1 - alpha)
    group.scale = s.clamp(*S_RANGE)
    return ""
