"""Baking LoRAs into a checkpoint's weights while it streams past.

LoRA files are small: they are read once, validated (safetensors only, finite, every module matched, every shape
right) before the first output byte is written, and each base weight gets the sum of its deltas when it streams
by: W' = (W + Σ scale_i · ΔW_i) computed in fp32, stored back in W's dtype.

ΔW per module (fp32): LoRA / LoCon `up @ down · alpha/rank` (conv: over the flattened kernel), LoHa
`(w1a@w1b) ⊙ (w2a@w2b) · alpha/rank`, LoKr `kron(w1, w2)` (`· alpha/dim` when a factor is low-rank), `diff` as is.
alpha missing → rank (factor 1). Refused with a message: DoRA (`dora_scale`), Tucker factors (`lora_mid`,
`hada_t1/t2`, `lokr_t2`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ...errors import QuantError
from ...io.dtypes import FLOAT_TAGS, INTEGER_TAGS
from ...io.reader import SafetensorsReader, brief, open_regular
from .mapping import ModuleIndex, Target, split_key

DAMPEN = 0.9  # convert-to-quant's factor for each later LoRA of --merge-loras
BIAS_SUFFIX = "#bias"
UNSUPPORTED_PARTS = {
    "dora_scale": "DoRA (dora_scale) changes the weight's column norms, not a plain delta; merge it with its trainer",
    "lora_mid.weight": "LoCon Tucker factors (lora_mid) are not supported",
    "hada_t1": "LoHa Tucker factors (hada_t1/hada_t2) are not supported", "hada_t2": "LoHa Tucker factors are not supported",
    "lokr_t2": "LoKr Tucker factors (lokr_t2) are not supported",
}


@dataclass
class LoraModule:
    source: str  # file path
    module: str  # name without the style prefix (what is matched)
    parts: dict[str, torch.Tensor]
    scale: float
    raw: str = ""  # name as written in the file (what messages show)
    target: Target | None = None

    def delta_shape(self) -> tuple[int, ...]:
        p = self.parts
        if "diff" in p:
            return tuple(p["diff"].shape)
        if "lora_up.weight" in p:
            return (p["lora_up.weight"].shape[0], *p["lora_down.weight"].shape[1:])
        if "hada_w1_a" in p:
            return (p["hada_w1_a"].shape[0], *p["hada_w1_b"].shape[1:])
        w1, w2 = _lokr_factor_shape(p, "1"), _lokr_factor_shape(p, "2")
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def delta(self) -> torch.Tensor:
        """ΔW in fp32, including the file's scale and alpha/rank."""
        p = {k: v.float() for k, v in self.parts.items()}
        if "diff" in p:
            return p["diff"] * self.scale
        if "lora_up.weight" in p:
            up, down = p["lora_up.weight"], p["lora_down.weight"]
            rank = down.shape[0]
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(self.delta_shape())
        elif "hada_w1_a" in p:
            rank = p["hada_w1_b"].shape[0]
            delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        else:
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            rank = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None
            delta = torch.kron(w1.reshape(*w1.shape, *([1] * (w2.dim() - 2))), w2)
            if rank is None:
                return delta * self.scale
        alpha = float(p["alpha"]) if "alpha" in p else float(rank)
        return delta * (self.scale * alpha / rank)


def _lokr_factor_shape(parts: dict, which: str) -> tuple[int, ...]:
    if f"lokr_w{which}" in parts:
        return tuple(parts[f"lokr_w{which}"].shape)
    return (parts[f"lokr_w{which}_a"].shape[0], *parts[f"lokr_w{which}_b"].shape[1:])


REQUIRED = [({"lora_up.weight", "lora_down.weight"}, "LoRA"), ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, "LoHa"),
            ({"diff"}, "full delta")]


def _check_complete(module: LoraModule) -> None:
    parts = set(module.parts) - {"alpha"}
    for required, name in REQUIRED:
        if parts & required:
            if not required <= parts:
                raise QuantError(f"{module.source}: {name} module {module.raw!r} lacks {sorted(required - parts)}")
            return
    if any(p.startswith("lokr_w1") for p in parts) and any(p.startswith("lokr_w2") for p in parts):
        for which in "12":
            if f"lokr_w{which}" not in parts and not {f"lokr_w{which}_a", f"lokr_w{which}_b"} <= parts:
                raise QuantError(f"{module.source}: LoKr module {module.raw!r} lacks w{which}")
        return
    raise QuantError(f"{module.source}: module {module.raw!r} has no complete set of factors ({sorted(parts)})")


@dataclass
class MergeReport:
    styles: dict[str, int] = field(default_factory=dict)  # detected key styles → modules
    matched: int = 0
    unmatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # matched a tensor a preset removes
    relative_change: dict[str, float] = field(default_factory=dict)  # weight key → ‖ΔW‖/‖W‖

    def summary(self) -> str:
        changes = sorted(self.relative_change.values())
        spread = (f"; ‖ΔW‖/‖W‖ min {changes[0]:.3g}, median {changes[len(changes) // 2]:.3g}, max {changes[-1]:.3g}"
                  if changes else "")
        styles = ", ".join(f"{n} {s}" for s, n in self.styles.items())
        extra = f", {len(self.unmatched)} unmatched (allowed)" if self.unmatched else ""
        return f"LoRA: {self.matched} modules merged into {len(self.relative_change)} weights ({styles}){extra}{spread}"


class LoraMerger:
    """Plans and applies LoRA deltas for one checkpoint. Construction validates everything (raises QuantError)."""

    def __init__(self, loras: list[tuple[str, float]], weight_shapes: dict[str, tuple[int, ...]],
                 removed: set[str] = frozenset(), mapping: str | dict | None = None, max_unmatched: int = 0):
        self.report = MergeReport()
        self.index = ModuleIndex({k: s for k, s in weight_shapes.items() if k.endswith(".weight")})
        self.shapes = weight_shapes
        overrides = _load_mapping(mapping, weight_shapes) if mapping is not None else {}
        self.pending: dict[str, list[LoraModule]] = {}
        for path, scale in loras:
            for module in _read_lora(path, scale, self.report):
                self._plan(module, overrides, removed)
        if len(self.report.unmatched) > max_unmatched:
            names = ", ".join(self.report.unmatched[:5])
            styles = ", ".join(self.report.styles) or "none"
            raise QuantError(f"{len(self.report.unmatched)} LoRA modules match no weight of the model (e.g. {names}); "
                             f"detected style: {styles}; use --lora-mapping FILE.json, or --lora-max-unmatched N to "
                             "merge the rest anyway")

    def _plan(self, module: LoraModule, overrides: dict, removed: set[str]) -> None:
        is_bias = module.module.endswith(BIAS_SUFFIX)
        target = self.index.resolve(module.module.removesuffix(BIAS_SUFFIX), overrides)
        if target is not None and is_bias:
            bias_key = target.weight_key[: -len(".weight")] + ".bias"
            target = Target(bias_key) if bias_key in self.shapes and target.rows is None else None
        if target is None:
            self.report.unmatched.append(f"{module.raw} ({os.path.basename(module.source)})")
            return
        module.target = target
        self.report.matched += 1
        if target.weight_key in removed:
            self.report.dropped.append(target.weight_key)
            return
        weight_shape = tuple(self.shapes[target.weight_key])
        n = weight_shape[0] if weight_shape else 0
        if target.rows is not None and target.rows[1] > n or target.swap_halves and n % 2:
            raise QuantError(f"{module.source}: LoRA module {brief(module.raw)} maps to "
                             f"{'rows ' + str(list(target.rows)) if target.rows else 'the two halves'} of "
                             f"{target.weight_key}, which has shape {list(weight_shape)}")
        expected = weight_shape if target.rows is None else (target.rows[1] - target.rows[0], *weight_shape[1:])
        if module.delta_shape() != expected:
            raise QuantError(f"{module.source}: LoRA module {module.raw!r} gives a delta of shape "
                             f"{list(module.delta_shape())} but {target.weight_key} "
                             f"{'rows ' + str(list(target.rows)) + ' ' if target.rows else ''}has shape {list(expected)}")
        self.pending.setdefault(target.weight_key, []).append(module)

    def apply(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor with its LoRA deltas merged (unchanged if none target it)."""
        modules = self.pending.get(key)
        if not modules:
            return tensor
        weight = tensor.float()
        total = torch.zeros_like(weight)
        for module in modules:
            delta = module.delta().to(weight.device)
            target = module.target
            if target.swap_halves:
                half = delta.shape[0] // 2
                delta = torch.cat([delta[half:], delta[:half]])
            if target.rows is None:
                total += delta
            else:
                total[target.rows[0]:target.rows[1]] += delta
        norm = float(weight.norm())
        self.report.relative_change[key] = float(total.norm()) / norm if norm else math.inf
        merged = (weight + total).to(tensor.dtype)
        if not math.isfinite(float(merged.sum(dtype=torch.float32))) and math.isfinite(float(weight.sum())):
            self._refuse_overflow(key, modules, merged)
        return merged

    def _refuse_overflow(self, key: str, modules: list, merged: torch.Tensor) -> None:
        """A finite weight that the merge made non-finite: the LoRA strength's fault, said as such."""
        if bool(torch.isfinite(merged).all()):
            return  # only the sum overflowed; the values themselves are fine
        sources = ", ".join(sorted({f"{os.path.basename(m.source)} × {m.scale:g}" for m in modules}))
        raise QuantError(f"{key}: merging {sources} overflows {str(merged.dtype).removeprefix('torch.')} (Inf/NaN); "
                         "lower the LoRA strength")


def _read_lora(path: str, scale: float, report: MergeReport) -> list[LoraModule]:
    modules: dict[str, LoraModule] = {}
    with SafetensorsReader(path) as reader:
        for key in reader.keys():
            parsed = split_key(key)
            if parsed is None:
                raise QuantError(f"{path}: {key!r} is not a LoRA key this tool knows (no lora_up/lora_down, "
                                 "lora_A/lora_B, alpha, hada_*, lokr_* or diff part)")
            style, module, part, raw = parsed
            if part in UNSUPPORTED_PARTS:
                raise QuantError(f"{path}: module {raw!r}: {UNSUPPORTED_PARTS[part]}")
            _check_dtype(path, raw, part, reader.get_dtype(key))
            tensor = reader.get_tensor(key)
            if part == "diff_b":  # a full bias delta: its own module, aimed at the layer's bias
                module, part, raw = module + BIAS_SUFFIX, "diff", raw + ".diff_b"
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise QuantError(f"{path}: LoRA tensor {key!r} has NaN/Inf values")
            entry = modules.setdefault(module, LoraModule(path, module, {}, scale, raw))
            entry.parts[part] = tensor
            if len(entry.parts) == 1:
                report.styles[style] = report.styles.get(style, 0) + 1
    for module in modules.values():
        _check_complete(module)
        _check_factors(module)
    return list(modules.values())


def _check_dtype(path: str, raw: str, part: str, dtype: str) -> None:
    """Factors must be stored in a float type ΔW can be computed in (an FP8 or integer factor would need a scale
    this file does not give); alpha may be any number."""
    allowed = FLOAT_TAGS | INTEGER_TAGS if part == "alpha" else FLOAT_TAGS
    if dtype not in allowed:
        what = "alpha" if part == "alpha" else "factors"
        raise QuantError(f"{path}: LoRA module {brief(raw)}: {part} is stored as {dtype}; LoRA {what} must be "
                         f"{', '.join(sorted(allowed))}")


def _check_factors(module: LoraModule) -> None:
    """Shapes and ranks that make ΔW computable, checked while planning so that nothing fails mid-stream."""
    p, where = module.parts, f"{module.source}: LoRA module {brief(module.raw)}"
    if "alpha" in p and p["alpha"].numel() != 1:
        raise QuantError(f"{where}: alpha must be one number, got shape {list(p['alpha'].shape)}")
    empty = next((k for k, v in p.items() if k != "alpha" and v.numel() == 0), None)
    if empty is not None:
        raise QuantError(f"{where}: {empty} has shape {list(p[empty].shape)} (rank 0 or an empty dimension)")
    if "diff" in p:
        return
    if "lora_up.weight" in p:
        _check_pair(where, p, "lora_up.weight", "lora_down.weight", conv=True)
    elif "hada_w1_a" in p:
        for w in "12":
            _check_pair(where, p, f"hada_w{w}_a", f"hada_w{w}_b")
        one, two = ((p[f"hada_w{w}_a"].shape[0], p[f"hada_w{w}_b"].shape[1]) for w in "12")
        if one != two:
            raise QuantError(f"{where}: hada_w1_a @ hada_w1_b is {list(one)} but hada_w2_a @ hada_w2_b {list(two)}")
    else:
        for w, dims in (("1", (2,)), ("2", (2, 3, 4, 5))):
            if f"lokr_w{w}" not in p:
                _check_pair(where, p, f"lokr_w{w}_a", f"lokr_w{w}_b")
            elif p[f"lokr_w{w}"].dim() not in dims:
                raise QuantError(f"{where}: lokr_w{w} has shape {list(p[f'lokr_w{w}'].shape)}, expected "
                                 f"{'a matrix' if w == '1' else '2 to 5 dimensions'}")


def _check_pair(where: str, parts: dict, up_key: str, down_key: str, conv: bool = False) -> None:
    """up [out, rank] and down [rank, in] with the same rank (LoCon, `conv`: up [out, rank, 1, 1], down
    [rank, in, kh, kw])."""
    up, down = parts[up_key], parts[down_key]
    up_ok = up.dim() == 2 or conv and up.dim() > 2 and all(d == 1 for d in up.shape[2:])
    down_ok = down.dim() == 2 or conv and down.dim() > 2
    if not (up_ok and down_ok and up.shape[1] == down.shape[0]):
        raise QuantError(f"{where}: {up_key} has shape {list(up.shape)} and {down_key} {list(down.shape)}; expected "
                         "[out, rank] and [rank, in] with the same rank")


def _load_mapping(mapping, weight_shapes) -> dict[str, Target]:
    """`--lora-mapping FILE.json`: {"<lora module>": "<checkpoint weight key>" | {"weight": key, "rows": [a, b]}}."""
    where = mapping if isinstance(mapping, str) else "LoRA mapping"
    if isinstance(mapping, str):
        try:
            with open_regular(mapping, "--lora-mapping", "r", encoding="utf-8") as f:
                mapping = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            raise QuantError(f"{where}: cannot read the LoRA mapping: {' '.join(str(e).splitlines())[:200]}") from None
    if not isinstance(mapping, dict):
        raise QuantError(f"{where}: a LoRA mapping is a JSON object of module → weight key")
    return {module: _mapping_target(f"{where}: entry {brief(module)}", value, weight_shapes)
            for module, value in mapping.items()}


MAPPING_FORM = 'a weight key string or {"weight": key, "rows": [start, end]}'


def _mapping_target(where: str, value, weight_shapes) -> Target:
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"weight", "rows"}, key=str)
        if unknown:
            raise QuantError(f"{where}: unknown key {brief(unknown[0])} (an entry is {MAPPING_FORM})")
        key, rows = value.get("weight"), value.get("rows")
    elif isinstance(value, str):
        key, rows = value, None
    else:
        raise QuantError(f"{where}: got {brief(value)}; an entry is {MAPPING_FORM}")
    if not isinstance(key, str) or key not in weight_shapes:
        raise QuantError(f"{where}: {brief(key)} is not a weight of the model")
    if rows is None:
        return Target(key)
    shape = tuple(weight_shapes[key])
    n = shape[0] if shape else 0
    integers = isinstance(rows, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
    if not (integers and len(rows) == 2 and 0 <= rows[0] < rows[1] <= n):
        raise QuantError(f"{where}: 'rows' must be [start, end], integers within {key}'s {n} rows, got {brief(rows)}")
    return Target(key, (rows[0], rows[1]))


def lora_scales(single: str | None, several: tuple[str, ...], scale: float, dampen: bool) -> list[tuple[str, float]]:
    """convert-to-quant's semantics: --merge-lora FILE at --merge-lora-scale; --merge-loras A B C with the first at full
    scale and each later one at scale · 0.9^index unless dampening is off."""
    files = ([single] if single else []) + list(several)
    multiple = len(files) > 1
    return [(path, scale * (DAMPEN ** i if dampen and multiple else 1.0)) for i, path in enumerate(files)]


def check_lora(model_path: str, lora_path: str, strength: float) -> None:
    """Raise QuantError when a LoRA does not fit a model (reads the two headers and the LoRA's factors only)."""
    with SafetensorsReader(model_path, low_memory=True) as reader:
        shapes = {info.name: info.shape for info in reader.infos()}
    LoraMerger([(lora_path, strength)], shapes)
