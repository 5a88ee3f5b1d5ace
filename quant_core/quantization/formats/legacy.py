"""Formats of the seed tool that upstream ComfyUI refuses (KeyError on load): `int8_blockwise` (2-D tiles),
`float8_e4m3fn_rowwise` and `float8_e4m3fn_blockwise`. Some forks and custom nodes read them, so they are written
when the user asks for them explicitly; the CLI warns and `verify` marks them."""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div

MIN_SCALE = 1e-30
E4M3_MAX = 448.0


def tile_amax(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Max |w| of each block×block tile of an [N, K] matrix → [N/block, K/block]."""
    n, k = weight.shape
    return weight.reshape(n // block, block, k // block, block).abs().amax(dim=(1, 3))


def expand_tiles(scale: torch.Tensor, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)


class _Tiled(Format):
    upstream = False
    code_max: float
    weight_tag: str

    def __init__(self, block_size: int):
        self.block = block_size
        self.heur_block = block_size

    def fit(self, shape):
        if shape[0] % self.block or shape[1] % self.block:
            return f"shape {list(shape)} is not divisible into {self.block}×{self.block} tiles"
        return None

    def grid(self, weight):
        scale = exact_div(tile_amax(weight, self.block), self.code_max).clamp(min=MIN_SCALE)
        return Grid(weight, expand_tiles(scale, self.block), {"shape": tuple(weight.shape), "tiles": scale})

    def pack(self, codes, grid):
        return {"weight": self._store(codes), "weight_scale": grid.extra["tiles"].float().contiguous()}

    def dequantize(self, tensors, shape):
        return tensors["weight"].float() * expand_tiles(tensors["weight_scale"].float(), self.block)

    def layout(self, shape):
        return [("weight", self.weight_tag, tuple(shape)),
                ("weight_scale", "F32", (shape[0] // self.block, shape[1] // self.block))]

    def marker(self):
        return {"format": self.name, "group_size": self.block}


class Int8Blockwise(_Tiled):
    name = "int8_blockwise"
    code_max = 127.0
    weight_tag = "I8"

    @property
    def label(self):
        return f"int8_block{self.block}"

    def round(self, scaled):
        return scaled.round_().clamp_(-127.0, 127.0)

    def _store(self, codes):
        return codes.to(torch.int8)


class Float8Blockwise(_Tiled):
    name = "float8_e4m3fn_blockwise"
    code_max = E4M3_MAX
    weight_tag = "F8_E4M3"

    @property
    def label(self):
        return f"fp8_block{self.block}"

    def round(self, scaled):
        return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()

    def _store(self, codes):
        return codes.to(torch.float8_e4m3fn)


class Float8Rowwise(Format):
    name = "float8_e4m3fn_rowwise"
    upstream = False
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

    def layout(self, shape):
        return [("weight", "F8_E4M3", tuple(shape)), ("weight_scale", "F32", (shape[0], 1))]
