"""Which tensor becomes what: the per-layer plan, decided from the header alone before any data is read.

Order of rules for a candidate (a 2-D floating-point `.weight`), first decisive rule wins:
  1. a preset's `remove` patterns drop the tensor from the output (e.g. the T5 decoder);
  2. `--layer-config` rules (skip, or a per-layer format);
  3. `--exclude-layers REGEX`;
  4. preset `keep` patterns;
  5. default keeps: embedding/vocab tables, model input/output layers;
  6. `--heur` shape checks;
  7. shape fit of the chosen format, with a fallback (per-row INT8 / per-tensor FP8) or keep.
Data-dependent checks (NaN/Inf) happen while streaming, in `convert`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import QuantError
from ..quantization.formats import Format
from ..io.dtypes import FLOAT_TAGS
from ..io.reader import TensorInfo
from .layer_config import load_layer_config
from .presets import PRESETS, poor_shape_reason
from .rules import DEFAULT_KEEPS, compile_regex

QUANTIZE, KEEP, REMOVE = "quantize", "keep", "remove"


@dataclass
class Decision:
    key: str
    action: str
    reason: str = ""  # why kept / removed, or why the format fell back
    format: Format | None = None
    full_precision_matrix_mult: bool = False
    dtype: str = ""  # the source tensor's safetensors dtype

    @property
    def layer(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key


@dataclass
class Plan:
    decisions: dict[str, Decision]
    rules_unmatched: list[str] = field(default_factory=list)

    def of(self, action: str) -> list[Decision]:
        return [d for d in self.decisions.values() if d.action == action]

    def fallbacks(self) -> list[Decision]:
        return [d for d in self.of(QUANTIZE) if d.reason]


def is_candidate(info: TensorInfo) -> bool:
    """A weight ComfyUI can run quantized: a 2-D floating-point `.weight` (Linear layers)."""
    return info.name.endswith(".weight") and len(info.shape) == 2 and info.dtype in FLOAT_TAGS


def build_plan(infos: list[TensorInfo], job) -> Plan:
    """Decide every tensor's fate for a `quant_core.job.Job` (its select and quantize settings)."""
    main = job.main_format()
    select = job.select
    rules = load_layer_config(select.layer_config, job.quantize) if select.layer_config is not None else []
    exclude = compile_regex(select.exclude_layers, "--exclude-layers") if select.exclude_layers else None
    presets = [PRESETS[name] for name in select.presets]
    matched_rules: set[int] = set()
    decisions = {}
    for info in infos:
        decisions[info.name] = _decide(info, job, main, rules, exclude, presets, matched_rules)
        decisions[info.name].dtype = info.dtype
    return Plan(decisions, [r.describe() for r in rules if r.index not in matched_rules])


def _decide(info, job, main, rules, exclude, presets, matched_rules) -> Decision:
    for preset in presets:
        if preset.removes(info.name):
            return Decision(info.name, REMOVE, f"removed by --{preset.name}")
    if main is None or not is_candidate(info):
        return Decision(info.name, KEEP, _why_not_candidate(info))
    layer = info.name[: -len(".weight")]
    fpmm = job.quantize.full_precision_matrix_mult
    fmt = main
    rule = next((r for r in rules if r.pattern.search(layer)), None)
    if rule is not None:
        matched_rules.add(rule.index)
        if rule.skip:
            return Decision(info.name, KEEP, rule.describe())
        fmt = rule.format or main
        fpmm = fpmm if rule.full_precision_matrix_mult is None else rule.full_precision_matrix_mult
    else:
        reason = _keep_reason(layer, info, job.select, exclude, presets, fmt)
        if reason:
            return Decision(info.name, KEEP, reason)
    return _fit(info, fmt, fpmm)


def _why_not_candidate(info: TensorInfo) -> str:
    if info.dtype not in FLOAT_TAGS:
        return f"{info.dtype} tensor"
    if not info.name.endswith(".weight"):
        return "not a weight" if not info.name.endswith(".bias") else "bias"
    return f"{len(info.shape)}-D weight (only Linear weights are quantized)"


def _keep_reason(layer: str, info: TensorInfo, select, exclude, presets, fmt: Format) -> str:
    if exclude is not None and exclude.search(layer):
        return "--exclude-layers"
    for preset in presets:
        if preset.keeps(info.name):
            return f"kept by --{preset.name}"
    for keep in DEFAULT_KEEPS:
        if keep.applies(layer, select):
            return keep.reason
    if select.heur:
        why = poor_shape_reason(info.shape, fmt.heur_block)
        if why:
            return f"--heur: {why}"
    if 0 in info.shape:
        return "empty tensor"
    return ""


def _fit(info: TensorInfo, fmt: Format, fpmm: bool) -> Decision:
    why = fmt.fit(info.shape)
    if why is None:
        return Decision(info.name, QUANTIZE, "", fmt, fpmm)
    fallback = fmt.fallback()
    if fallback is not None and fallback.fit(info.shape) is None:
        return Decision(info.name, QUANTIZE, f"{fmt.describe()} does not fit ({why}); fell back to {fallback.describe()}",
                        fallback, fpmm)
    return Decision(info.name, KEEP, f"{fmt.describe()} does not fit ({why})")


def require_work(plan: Plan, path: str, fp16: bool = False) -> None:
    """Refuse a run that would quantize nothing (empty model or every layer excluded)."""
    if not plan.decisions:
        raise QuantError(f"{path}: the file holds no tensors")
    if fp16:
        if not any(d.action == KEEP and d.dtype in FLOAT_TAGS and d.dtype != "F16" for d in plan.decisions.values()):
            raise QuantError(f"{path}: nothing to convert to FP16 (no F32/BF16/F64 tensor)")
    elif not plan.of(QUANTIZE):
        raise QuantError(f"{path}: no quantizable layer (no 2-D F32/F16/BF16/F64 .weight, or all of them were kept "
                         "by presets, exclusions or shape rules)")
