"""`float8_e4m3fn` / `float8_e5m2`: FP8 weights with one fp32 scale per tensor."""
from __future__ import annotations

import torch

from ...io.dtypes import torch_dtype
from .base import Format, Grid, exact_div
from .contract import Companion, FormatContract, kitchen_dequantize, one_element, stored_weight

MIN_SCALE = 1e-30


def _kitchen(tensors: dict, conf: dict, shape) -> torch.Tensor:
    return kitchen_dequantize("TensorCoreFP8Layout", tensors["weight"], shape, scale=tensors["weight_scale"])


def _contract(name: str, weight_tag: str, typical: float, broken: float, code_max: float) -> FormatContract:
    return FormatContract(
        name,
        (stored_weight(weight_tag),
         Companion("weight_scale", ("F32",), one_element),  # a per-row scale breaks ComfyUI's FP8 matmul
         Companion("input_scale", ("F32",), one_element, required=False, values="activation")),
        _kitchen, typical=typical, broken=broken, activation_code_max=code_max)


CONTRACTS = {
    "float8_e4m3fn": _contract("float8_e4m3fn", "F8_E4M3", typical=0.08, broken=0.25, code_max=448.0),
    "float8_e5m2": _contract("float8_e5m2", "F8_E5M2", typical=0.15, broken=0.3, code_max=57344.0),
}


class Float8Tensorwise(Format):
    stores_grid_scale = True

    def __init__(self, name: str = "float8_e4m3fn"):
        self.contract = CONTRACTS[name]
        self.dtype = torch_dtype(self.contract.weight.dtypes[0])
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
