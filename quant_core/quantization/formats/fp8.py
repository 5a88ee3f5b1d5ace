"""`float8_e4m3fn` / `float8_e5m2`: FP8 weights with one fp32 scale per tensor."""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div

MIN_SCALE = 1e-30

FP8_DTYPES = {
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
}


class Float8Tensorwise(Format):
    stores_grid_scale = True

    def __init__(self, name: str = "float8_e4m3fn"):
        self.name = name
        self.dtype, self.tag = FP8_DTYPES[name]
        self.max = torch.finfo(self.dtype).max
        self.label = "fp8" if name == "float8_e4m3fn" else "fp8_e5m2"

    def grid(self, weight):
        scale = exact_div(weight.abs().amax(), self.max).clamp(min=MIN_SCALE)
        return Grid(weight, scale, {"shape": tuple(weight.shape)})

    def round(self, scaled):
        return scaled.clamp_(-self.max, self.max).to(self.dtype).float()

    def pack(self, codes, grid):
        return {"weight": codes.to(self.dtype), "weight_scale": grid.scale.float().reshape(())}

    def dequantize(self, tensors, shape):
        return tensors["weight"].float() * tensors["weight_scale"].float()

    def layout(self, shape):
        return [("weight", self.tag, tuple(shape)), ("weight_scale", "F32", ())]
