"""A format's on-disk contract: the tensors a quantized layer of that format has (suffix, dtype tags, shape rule as a
function of the weight's logical [N, K] and the marker), the marker fields it reads, whether upstream ComfyUI loads
it, the error range of a healthy layer, and how its tensors are read back.

Each format module declares its own contract(s); `formats.CONTRACTS` collects them by `format` name. `verify`
checks files against them, the format classes derive their planned output layout from them, and `dequantize`,
`verify --reference` and the benchmark rebuild weights through `FormatContract.dequantize`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .blocked import round_up
from .markers import COMMON_FIELDS

Shape = tuple[int, ...]
ShapeRule = Callable[[int, int, dict], "list[Shape] | None"]  # (N, K, marker) → accepted shapes; None: unknown
ONE_ELEMENT: list[Shape] = [(), (1,)]


def one_element(n: int, k: int, conf: dict) -> list[Shape]:
    return ONE_ELEMENT


@dataclass(frozen=True)
class Companion:
    """One tensor `<layer>.<suffix>` of a quantized layer."""

    suffix: str
    dtypes: tuple[str, ...] | None  # accepted safetensors tags, the written one first; None: any
    shapes: ShapeRule | None = None  # accepted shapes, the written one first; None: any
    required: bool = True  # written by the format and required; False: accepted, checked when present
    values: str | None = "positive"  # the rule its stored values follow (VALUE_RULES); None: not checked

    def dtype_problems(self, info) -> list[str]:
        """Dtype problems of a present tensor (`info` has .dtype)."""
        if self.dtypes is not None and info.dtype not in self.dtypes:
            return [f"{self.suffix} is {info.dtype}, expected {' or '.join(self.dtypes)}"]
        return []

    def shape_problems(self, info, n: int, k: int, conf: dict) -> list[str]:
        shapes = None if self.shapes is None else self.shapes(n, k, conf)
        if shapes is not None and tuple(info.shape) not in shapes:
            expected = " or ".join(str(list(s)) for s in shapes)
            return [f"{self.suffix} has shape {list(info.shape)}, expected {expected}"]
        return []


def stored_weight(*dtypes: str) -> Companion:
    """The `.weight` companion: the codes, in one of `dtypes`, in the contract's stored shape (`stored_shape`)."""
    return Companion("weight", dtypes, values=None)


def _positive(values: torch.Tensor) -> str | None:
    return "scales must be positive" if bool((values <= 0).any()) else None


def _nonnegative(values: torch.Tensor) -> str | None:
    return "scales must not be negative" if bool((values < 0).any()) else None


def _activation(values: torch.Tensor) -> str | None:
    if bool((values <= 0).any()):
        return "a static activation scale must be positive (activations are divided by it)"
    return None


VALUE_RULES: dict[str, Callable[[torch.Tensor], str | None]] = {
    "positive": _positive,  # weight scales that multiply every code
    "nonnegative": _nonnegative,  # block scales: 0 encodes an all-zero block (and padding)
    "activation": _activation,  # static activation scales: activations are divided by them
    "finite": lambda values: None,  # only finite
}


def value_problem(rule: str, tensor: torch.Tensor) -> str | None:
    """Why a stored scale tensor breaks its value rule (a VALUE_RULES name, or "e8m0" for exponent bytes), or None."""
    if rule == "e8m0":  # power-of-two exponent bytes: any byte but 255 (NaN) is a value
        return "E8M0 byte 255 is NaN" if bool((tensor == 255).any()) else None
    values = tensor.float()
    if not bool(torch.isfinite(values).all()):
        return "has NaN/Inf values"
    return VALUE_RULES[rule](values)


Rebuild = Callable[[dict, dict, tuple], torch.Tensor]  # (tensors by suffix, marker, logical [N, K]) → fp32 [N, K]


@dataclass(frozen=True)
class FormatContract:
    name: str  # the `format` string of the marker
    companions: tuple[Companion, ...]  # the weight first, then the others in the order they are checked
    rebuild: Rebuild
    typical: float  # relative error ‖W−Ŵ‖/‖W‖ above which a layer is unusually poor (a warning)
    broken: float = 0.25  # ... and above which it is broken (a defect)
    upstream: bool = True  # stock ComfyUI loads it (others only forks and custom nodes)
    fields: tuple[str, ...] = ()  # marker keys it reads besides COMMON_FIELDS
    field_check: Callable[[dict, int, int], list[str]] | None = None  # (marker, N, K) → problems of its fields
    block: int = 1  # the stored weight is zero-padded to multiples of `block` in both dimensions
    pack: int = 1  # logical values per stored element along K
    # ComfyUI quantizes the activations with a static `input_scale` for this format: the largest activation code
    # (x ≈ code × input_scale); None: it reads no input_scale (one is never written)
    activation_code_max: float | None = None

    @property
    def weight(self) -> Companion:
        return self.companions[0]

    @property
    def suffixes(self) -> tuple[str, ...]:
        return tuple(c.suffix for c in self.companions)

    @property
    def marker_fields(self) -> tuple[str, ...]:
        return COMMON_FIELDS + self.fields

    def stored_shape(self, n: int, k: int) -> Shape:
        """The stored weight's shape for a logical [N, K] weight."""
        return round_up(n, self.block), round_up(k, self.block) // self.pack

    def logical_shape(self, rows: int, cols: int) -> Shape:
        """The largest logical [N, K] a stored [rows, cols] weight holds (what the checks use without a reference)."""
        return rows, cols * self.pack

    def layout(self, shape, conf: dict, choice: dict[str, int] | None = None) -> list[tuple[str, str, Shape]]:
        """The tensors the format writes for a logical [N, K] weight: (suffix, dtype tag, shape). `choice` picks
        an accepted shape other than the first (suffix → index)."""
        n, k = shape
        out = [("weight", self.weight.dtypes[0], self.stored_shape(n, k))]
        for c in self.companions[1:]:
            shapes = c.shapes(n, k, conf) if c.required else []
            if shapes is None:
                raise ValueError(f"{self.name} with {conf} cannot hold a {n}×{k} weight")
            out += [(c.suffix, c.dtypes[0], tuple(shapes[(choice or {}).get(c.suffix, 0)]))] if shapes else []
        return out

    def check(self, infos: dict, conf: dict, layer: str = "<layer>") -> list[str]:
        """Problems of one layer's tensors (`infos`: suffix → info with .dtype and .shape, for every tensor
        `<layer>.<suffix>` of the file) against this contract, without a reference (the stored shape decides)."""
        wshape = tuple(infos["weight"].shape)
        if len(wshape) != 2:
            return [f"quantized weight must be 2-D (Linear), got shape {list(wshape)}: a marker on a conv/norm is "
                    "an unexpected key"]
        n, k = self.logical_shape(*wshape)
        problems = self.weight.dtype_problems(infos["weight"])
        if self.stored_shape(n, k) != wshape:
            packed = "packed " if self.pack > 1 else ""
            problems.append(f"{packed}weight shape {list(wshape)} is not padded to {self.block}×{self.block}")
        for companion in self.companions[1:]:
            info = infos.get(companion.suffix)
            if info is None:
                problems += [f"missing {companion.suffix}"] if companion.required else []
            else:
                problems += companion.dtype_problems(info) + companion.shape_problems(info, n, k, conf)
        problems += self.field_check(conf, n, k) if self.field_check else []
        allowed = set(self.suffixes) | {"comfy_quant", "bias"}
        return problems + [f"unexpected tensor {layer}.{suffix} (ComfyUI reports it as an unexpected key)"
                           for suffix in infos if suffix not in allowed]

    def dequantize(self, tensors: dict[str, torch.Tensor], conf: dict, shape) -> torch.Tensor:
        """The fp32 logical [N, K] weight of a layer's stored tensors (suffix → tensor), as its loader computes it."""
        return self.rebuild(tensors, conf, tuple(shape))


def kitchen_dequantize(layout: str, qdata: torch.Tensor, shape, **params) -> torch.Tensor:
    """Rebuild through comfy-kitchen's layout class `layout` (the code ComfyUI runs), cropped to the logical
    [N, K] (nvfp4/mxfp8 store padding)."""
    import comfy_kitchen.tensor as ck
    cls = getattr(ck, layout)
    n, k = shape
    args = cls.Params(orig_dtype=torch.float32, orig_shape=tuple(shape), **params)
    return cls.dequantize(qdata, args).float()[:n, :k]
