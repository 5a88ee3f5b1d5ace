"""Formats of convert-to-quant that upstream ComfyUI refuses (KeyError on load): `int8_blockwise` (2-D tiles),
`float8_e4m3fn_rowwise` and `float8_e4m3fn_blockwise`. Some forks and custom nodes read them, so they are written
when the user asks for them explicitly; the CLI warns and `verify` marks them."""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div
from .contract import Companion, FormatContract, stored_weight
from .fp8 import Float8Tensorwise
from .int8 import Int8Tensorwise

MIN_SCALE = 1e-30
E4M3_MAX = 448.0


def tile_amax(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Max |w| of each block×block tile of an [N, K] matrix → [N/block, K/block]."""
    n, k = weight.shape
    return weight.reshape(n // block, block, k // block, block).abs().amax(dim=(1, 3))


def expand_tiles(scale: torch.Tensor, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)


def _group(conf: dict, n: int, k: int) -> int | None:
    """The tile size B of a blockwise marker, or None when it does not tile the [N, K] weight."""
    block = conf.get("group_size")
    return block if isinstance(block, int) and block >= 1 and not n % block and not k % block else None


def _group_problems(conf: dict, n: int, k: int) -> list[str]:
    if _group(conf, n, k) is None:
        return [f"group_size {conf.get('group_size')!r} does not tile the {n}×{k} weight"]
    return []


def _tile_scale_shapes(n: int, k: int, conf: dict):
    block = _group(conf, n, k)
    return None if block is None else [(n // block, k // block)]  # one per B×B tile


def _blockwise_contract(name: str, weight_tag: str, build, typical: float) -> FormatContract:
    """`build(B)`: the format object with tile size B, whose own rules dequantize."""
    return FormatContract(
        name, (stored_weight(weight_tag), Companion("weight_scale", ("F32",), _tile_scale_shapes)),
        lambda tensors, conf, shape: build(conf.get("group_size", 128)).dequantize(tensors, shape),
        typical=typical, upstream=False, fields=("group_size",), field_check=_group_problems)


INT8_BLOCKWISE = _blockwise_contract("int8_blockwise", "I8", lambda block: Int8Blockwise(block), typical=0.05)
FLOAT8_BLOCKWISE = _blockwise_contract("float8_e4m3fn_blockwise", "F8_E4M3", lambda block: Float8Blockwise(block),
                                       typical=0.08)
FLOAT8_ROWWISE = FormatContract(
    "float8_e4m3fn_rowwise",
    (stored_weight("F8_E4M3"), Companion("weight_scale", ("F32",), lambda n, k, conf: [(n, 1), (n,)])),
    lambda tensors, conf, shape: Float8Rowwise().dequantize(tensors, shape), typical=0.08, upstream=False)
CONTRACTS = {c.name: c for c in (INT8_BLOCKWISE, FLOAT8_ROWWISE, FLOAT8_BLOCKWISE)}


class _Tiled(Format):
    code_max: float

    def __init__(self, block_size: int):
        self.block = block_size
        self.heur_block = block_size

    def fit(self, shape):
        if _group(self.marker(), *shape) is None:
            return f"shape {list(shape)} is not divisible into {self.block}×{self.block} tiles"
        return None

    def grid(self, weight):
        scale = exact_div(tile_amax(weight, self.block), self.code_max).clamp(min=MIN_SCALE)
        return Grid(weight, expand_tiles(scale, self.block), {"shape": tuple(weight.shape), "tiles": scale})

    def pack(self, codes, grid):
        return {"weight": self._store(codes), "weight_scale": grid.extra["tiles"].float().contiguous()}

    def dequantize(self, tensors, shape):
        return tensors["weight"].float() * expand_tiles(tensors["weight_scale"].float(), self.block)

    def marker(self):
        return {"format": self.name, "group_size": self.block}


class Int8Blockwise(_Tiled):
    contract = INT8_BLOCKWISE
    code_max = 127.0

    @property
    def label(self):
        return f"int8_block{self.block}"

    def round(self, scaled):
        return scaled.round_().clamp_(-127.0, 127.0)

    def _store(self, codes):
        return codes.to(torch.int8)

    def fallback(self) -> Format:
        return Int8Tensorwise(per_row=True)


class Float8Blockwise(_Tiled):
    contract = FLOAT8_BLOCKWISE
    code_max = E4M3_MAX

    @property
    def label(self):
        return f"fp8_block{self.block}"

    def round(self, scaled):
        return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()

    def _store(self, codes):
        return codes.to(torch.float8_e4m3fn)

    def fallback(self) -> Format:
        return Float8Tensorwise("float8_e4m3fn")


class Float8Rowwise(Format):
    contract = FLOAT8_ROWWISE
    label = "fp8_row"

    def grid(self, weight):
        scale = exact_div(weight.abs().amax(dim=1, keepdim=True), E4M3_MAX).clamp(min=MIN_SCALE)
        return Grid(weight, scale, {"shape": tuple(weight.shape)})

    def round(self, scaled):
        return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()

    def pack(self, codes, grid):
        return {"weight": codes.to(torch.float8_e4m3fn), "weight_scale": grid.scale.float().contiguous()}

    def dequantize(self, tensors, shape):
        return tensors["weight"].float() * tensors["weight_scale"].float().reshape(-1, 1)

    def fallback(self) -> Format:
        return Float8Tensorwise("float8_e4m3fn")

