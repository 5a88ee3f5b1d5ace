"""`mxfp8`: FP8-E4M3 values in 32-element blocks along K with a power-of-two E8M0 scale per block (swizzled,
stored as U8 because ComfyUI's own parser has no F8_E8M0 tag). Byte-for-byte comfy-kitchen's reference layout."""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div
from .blocked import blocked_shape, from_blocked, pad_to, round_up, to_blocked
from .contract import Companion, FormatContract, kitchen_dequantize, stored_weight

BLOCK = 32
E4M3_MAX = 448.0
E8M0_BIAS = 127


def e8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes → fp32 powers of two (byte 0 reads as 0, as in comfy-kitchen)."""
    bits = exponents.to(torch.int32) << 23
    return torch.where(exponents == 0, torch.zeros_like(bits), bits).view(torch.float32)


def _block_scale_shapes(n: int, k: int, conf: dict):
    return [blocked_shape(round_up(n, BLOCK), round_up(k, BLOCK) // BLOCK)]  # one per 32 values, swizzled


def _kitchen(tensors: dict, conf: dict, shape) -> torch.Tensor:
    return kitchen_dequantize("TensorCoreMXFP8Layout", tensors["weight"], shape,
                              scale=tensors["weight_scale"].view(torch.float8_e8m0fnu))


CONTRACT = FormatContract(
    "mxfp8",
    (stored_weight("F8_E4M3"),
     Companion("weight_scale", ("U8",), _block_scale_shapes, values="e8m0"),  # ComfyUI has no F8_E8M0 tag
     Companion("input_scale", None, None, required=False, values="activation")),
    _kitchen, typical=0.08, block=BLOCK)


class MXFP8(Format):
    contract = CONTRACT
    label = "mxfp8"
    heur_block = BLOCK

    def grid(self, weight):
        n, k = weight.shape
        work = pad_to(weight, BLOCK, BLOCK)
        amax = work.reshape(work.shape[0], -1, BLOCK).abs().amax(dim=-1)
        needed = exact_div(amax, E4M3_MAX).clamp(min=2.0 ** -127)
        exponents = (torch.ceil(torch.log2(needed)).to(torch.int32) + E8M0_BIAS).clamp(0, 254).to(torch.uint8)
        zero = amax == 0
        block_scale = torch.where(zero, torch.ones_like(amax), e8m0_to_float(exponents))
        exponents = torch.where(zero, torch.zeros_like(exponents), exponents)
        # zero blocks divide by 1 (giving 0) but are stored with exponent byte 0, like the reference
        return Grid(work, block_scale.repeat_interleave(BLOCK, dim=1), {"shape": (n, k), "exponents": exponents})

    def round(self, scaled):
        return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()

    def pack(self, codes, grid):
        return {"weight": codes.to(torch.float8_e4m3fn), "weight_scale": to_blocked(grid.extra["exponents"])}

    def dequantize(self, tensors, shape):
        n, k = shape
        data = tensors["weight"]
        exponents = from_blocked(tensors["weight_scale"].view(torch.uint8), data.shape[0], data.shape[1] // BLOCK)
        scale = e8m0_to_float(exponents).repeat_interleave(BLOCK, dim=1)
        return (data.float() * scale)[:n, :k]
