"""The format registry: one table from (format family, scaling mode) to a format module.

Families are what users pick (`--format`); the table says which scaling modes each family has, which one is the
default, and which combinations only forks and custom nodes can load (written only on explicit request).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import Format, Grid, divide_by_scale
from .fp8 import Float8Tensorwise
from .int8 import Int8Tensorwise
from .legacy import Float8Blockwise, Float8Rowwise, Int8Blockwise
from .mxfp8 import MXFP8
from .nvfp4 import NVFP4


@dataclass(frozen=True)
class FormatChoice:
    build: Callable[[int, int], Format]  # (block_size, convrot_group) -> Format
    upstream: bool = True


SCALING_ALIASES = {"axis": "row"}  # the INT8 seed calls per-row scaling "axis"

FAMILIES: dict[str, dict[str, FormatChoice]] = {
    "int8": {
        "row": FormatChoice(lambda bs, g: Int8Tensorwise(per_row=True, convrot_group=g)),
        "tensor": FormatChoice(lambda bs, g: Int8Tensorwise(per_row=False, convrot_group=g)),
        "block": FormatChoice(lambda bs, g: Int8Blockwise(bs), upstream=False),
    },
    "fp8": {
        "tensor": FormatChoice(lambda bs, g: Float8Tensorwise("float8_e4m3fn")),
        "row": FormatChoice(lambda bs, g: Float8Rowwise(), upstream=False),
        "block": FormatChoice(lambda bs, g: Float8Blockwise(bs), upstream=False),
    },
    "fp8_e5m2": {"tensor": FormatChoice(lambda bs, g: Float8Tensorwise("float8_e5m2"))},
    "nvfp4": {"block": FormatChoice(lambda bs, g: NVFP4())},
    "mxfp8": {"block": FormatChoice(lambda bs, g: MXFP8())},
}
DEFAULT_SCALING = {"int8": "row", "fp8": "tensor", "fp8_e5m2": "tensor", "nvfp4": "block", "mxfp8": "block"}
FORMAT_FAMILIES = (*FAMILIES, "fp16")  # fp16 = plain cast, no quantization
UPSTREAM_NAMES = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8")
LEGACY_NAMES = ("int8_blockwise", "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise")


def resolve_scaling(family: str, scaling: str | None) -> str:
    if scaling is None:
        return DEFAULT_SCALING[family]
    scaling = SCALING_ALIASES.get(scaling, scaling)
    if scaling not in FAMILIES[family]:
        if family in ("nvfp4", "mxfp8"):
            raise ValueError(f"{family} has fixed per-block scales; --scaling_mode {scaling} does not apply")
        raise ValueError(f"{family} has no '{scaling}' scaling mode (choose from {', '.join(FAMILIES[family])})")
    return scaling


def make_format(family: str, scaling: str | None = None, block_size: int = 128, convrot_group: int = 0) -> Format:
    """Build the format for a family and scaling mode; ValueError with a user-facing message if impossible."""
    if family not in FAMILIES:
        raise ValueError(f"unknown format {family!r} (choose from {', '.join(FORMAT_FAMILIES)})")
    scaling = resolve_scaling(family, scaling)
    if convrot_group and (family, scaling) != ("int8", "row"):
        raise ValueError("ConvRot applies to INT8 with per-row scales only (--format int8 --scaling_mode row)")
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    return FAMILIES[family][scaling].build(block_size, convrot_group)


__all__ = ["Format", "Grid", "divide_by_scale", "make_format", "resolve_scaling", "FAMILIES", "FORMAT_FAMILIES",
           "DEFAULT_SCALING", "UPSTREAM_NAMES", "LEGACY_NAMES"]
