"""The format registries: one table from (format family, scaling mode) to a format module, and one from the
on-disk `format` name of a marker to that format's contract (`CONTRACTS`).

Families are what users pick (`--format`); the table says which scaling modes each family has and which one is the
default. Whether a combination only forks and custom nodes can load (written only on explicit request) is its
format's contract's `upstream`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import fp8, int4, int8, legacy, mxfp8, nvfp4
from .base import Format, Grid, divide_by_scale
from .contract import Companion, FormatContract
from .fp8 import Float8Tensorwise
from .int4 import ConvRotW4A4
from .int8 import Int8Tensorwise
from .legacy import Float8Blockwise, Float8Rowwise, Int8Blockwise
from .mxfp8 import MXFP8
from .nvfp4 import NVFP4

# on-disk `format` name → contract, upstream formats first
CONTRACTS: dict[str, FormatContract] = {**fp8.CONTRACTS, int8.CONTRACT.name: int8.CONTRACT,
                                        int4.CONTRACT.name: int4.CONTRACT, nvfp4.CONTRACT.name: nvfp4.CONTRACT,
                                        mxfp8.CONTRACT.name: mxfp8.CONTRACT, **legacy.CONTRACTS}
UPSTREAM_NAMES = tuple(name for name, c in CONTRACTS.items() if c.upstream)
LEGACY_NAMES = tuple(name for name, c in CONTRACTS.items() if not c.upstream)
# every `<layer>.<suffix>` some format stores besides the weight, in the order checks report them
COMPANION_SUFFIXES = tuple(dict.fromkeys(c.suffix for contract in CONTRACTS.values() for c in contract.companions[1:]))
# the dtype tags of quantized weights
WEIGHT_TAGS = tuple(dict.fromkeys(tag for contract in CONTRACTS.values() for tag in contract.weight.dtypes))


@dataclass(frozen=True)
class FormatChoice:
    build: Callable[[int, int, str], Format]  # (block_size, convrot_group, int4 linear dtype) -> Format

    @property
    def upstream(self) -> bool:
        return self.build(128, 0, "int4").upstream


SCALING_ALIASES = {"axis": "row"}  # the INT8 seed calls per-row scaling "axis"

FAMILIES: dict[str, dict[str, FormatChoice]] = {
    "int8": {
        "row": FormatChoice(lambda bs, g, a: Int8Tensorwise(per_row=True, convrot_group=g)),
        "tensor": FormatChoice(lambda bs, g, a: Int8Tensorwise(per_row=False, convrot_group=g)),
        "block": FormatChoice(lambda bs, g, a: Int8Blockwise(bs)),
    },
    "int4": {"row": FormatChoice(lambda bs, g, a: ConvRotW4A4(g or int4.DEFAULT_GROUP, a))},  # always ConvRot
    "fp8": {
        "tensor": FormatChoice(lambda bs, g, a: Float8Tensorwise("float8_e4m3fn")),
        "row": FormatChoice(lambda bs, g, a: Float8Rowwise()),
        "block": FormatChoice(lambda bs, g, a: Float8Blockwise(bs)),
    },
    "fp8_e5m2": {"tensor": FormatChoice(lambda bs, g, a: Float8Tensorwise("float8_e5m2"))},
    "nvfp4": {"block": FormatChoice(lambda bs, g, a: NVFP4())},
    "mxfp8": {"block": FormatChoice(lambda bs, g, a: MXFP8())},
}
DEFAULT_SCALING = {"int8": "row", "int4": "row", "fp8": "tensor", "fp8_e5m2": "tensor", "nvfp4": "block",
                   "mxfp8": "block"}
FORMAT_FAMILIES = (*FAMILIES, "fp16")  # fp16 = plain cast, no quantization
FORMAT_ALIASES = {"convrot_w4a4": "int4"}  # other names --format accepts: ComfyUI's name of the int4 format


def resolve_scaling(family: str, scaling: str | None) -> str:
    if scaling is None:
        return DEFAULT_SCALING[family]
    scaling = SCALING_ALIASES.get(scaling, scaling)
    if scaling not in FAMILIES[family]:
        if family in ("nvfp4", "mxfp8"):
            raise ValueError(f"{family} has fixed per-block scales; --scaling_mode {scaling} does not apply")
        if family == "int4":
            raise ValueError(f"int4 has one scale per output row; --scaling_mode {scaling} does not apply")
        raise ValueError(f"{family} has no '{scaling}' scaling mode (choose from {', '.join(FAMILIES[family])})")
    return scaling


def make_format(family: str, scaling: str | None = None, block_size: int = 128, convrot_group: int = 0,
                int4_linear_dtype: str = "int4") -> Format:
    """Build the format for a family and scaling mode; ValueError with a user-facing message if impossible.
    `convrot_group` is int8's ConvRot group (0: none) and int4's rotation group (0: the default, 256)."""
    family = FORMAT_ALIASES.get(family, family)
    if family not in FAMILIES:
        raise ValueError(f"unknown format {family!r} (choose from {', '.join(FORMAT_FAMILIES)})")
    scaling = resolve_scaling(family, scaling)
    if convrot_group and (family, scaling) not in (("int8", "row"), ("int4", "row")):
        raise ValueError("ConvRot applies to INT8 with per-row scales only (--format int8 --scaling_mode row)")
    if int4_linear_dtype != "int4" and family != "int4":
        raise ValueError("the INT4 linear dtype applies to --format int4 only")
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    return FAMILIES[family][scaling].build(block_size, convrot_group, int4_linear_dtype)


__all__ = ["Format", "Grid", "divide_by_scale", "make_format", "resolve_scaling", "FAMILIES", "FORMAT_FAMILIES",
           "DEFAULT_SCALING", "FORMAT_ALIASES", "CONTRACTS", "FormatContract", "Companion", "UPSTREAM_NAMES",
           "LEGACY_NAMES", "COMPANION_SUFFIXES", "WEIGHT_TAGS"]
