"""`nvfp4`: E2M1 codes in 16-element blocks along K, an FP8-E4M3 scale per block (swizzled) and one fp32
global scale. Element 2i goes in the high nibble. Byte-for-byte the layout of comfy-kitchen's reference quantizer."""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div
from .blocked import blocked_shape, from_blocked, pad_to, round_up, to_blocked
from .contract import Companion, FormatContract, kitchen_dequantize, one_element, stored_weight

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """fp32 values (already within ±6) → 4-bit codes (uint8, bit 3 = sign), round to nearest even.

    The grid has step 0.5 below 2, step 1 up to 4 and step 2 up to 6, and its code is the index of the value, so
    in each range the code is an offset plus round-half-even of the magnitude in that range's steps — which also
    sends every midpoint to the even code."""
    magnitude = scaled.abs()
    code = torch.where(magnitude < 2, torch.round(magnitude * 2),
                       torch.where(magnitude < 4, torch.round(magnitude) + 2, torch.round(magnitude * 0.5) + 4))
    return code.to(torch.uint8) | (torch.signbit(scaled).to(torch.uint8) << 3)


_SIGNED_VALUES = torch.cat([E2M1_VALUES, -E2M1_VALUES])  # indexed by the 4-bit code


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    flat = _SIGNED_VALUES.to(codes.device).index_select(0, codes.reshape(-1).int())
    return flat.reshape(codes.shape)


def _block_scale_shapes(n: int, k: int, conf: dict):
    return [blocked_shape(round_up(n, BLOCK), round_up(k, BLOCK) // BLOCK)]  # one per 16 values, swizzled


def _kitchen(tensors: dict, conf: dict, shape) -> torch.Tensor:
    return kitchen_dequantize("TensorCoreNVFP4Layout", tensors["weight"], shape, scale=tensors["weight_scale_2"],
                              block_scale=tensors["weight_scale"])


CONTRACT = FormatContract(
    "nvfp4",
    (stored_weight("U8"),  # two E2M1 codes per byte
     Companion("weight_scale", ("F8_E4M3",), _block_scale_shapes, values="nonnegative"),  # 0: an all-zero block
     Companion("weight_scale_2", ("F32",), one_element, values="nonnegative"),
     Companion("input_scale", ("F32",), one_element, required=False, values="activation"),
     Companion("pre_quant_scale", None, None, required=False, values="finite")),
    _kitchen, typical=0.2, block=BLOCK, pack=2,
    activation_code_max=448.0 * 6.0)  # the global activation scale spans E4M3 block scales × E2M1 codes


class NVFP4(Format):
    contract = CONTRACT
    label = "nvfp4"

    def grid(self, weight, global_scale: torch.Tensor | None = None):
        n, k = weight.shape
        work = pad_to(weight, BLOCK, BLOCK)
        blocks = work.reshape(work.shape[0], -1, BLOCK)
        if global_scale is None:
            global_scale = exact_div(weight.abs().amax(), E4M3_MAX * E2M1_MAX).clamp(min=1e-30)
        global_scale = global_scale.float().reshape(())
        block_scale = exact_div(blocks.abs().amax(dim=-1), E2M1_MAX)
        block_fp8 = (block_scale / global_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
        total = global_scale * block_fp8.float()
        scale = total.repeat_interleave(BLOCK, dim=1)
        return Grid(work, scale, {"shape": (n, k), "block_fp8": block_fp8, "global": global_scale})

    def round(self, scaled):
        return e2m1_values(e2m1_codes(scaled.clamp_(-E2M1_MAX, E2M1_MAX)))

    def pack(self, codes, grid):
        packed = torch.empty((codes.shape[0], codes.shape[1] // 2), dtype=torch.uint8, device=codes.device)
        rows_per_chunk = max(1, (1 << 22) // codes.shape[1])  # bounds the temporaries of the code computation
        for start in range(0, codes.shape[0], rows_per_chunk):
            nibbles = e2m1_codes(codes[start:start + rows_per_chunk])
            packed[start:start + rows_per_chunk] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        return {
            "weight": packed,
            "weight_scale": to_blocked(grid.extra["block_fp8"]),
            "weight_scale_2": grid.extra["global"].reshape(()),
        }

    def dequantize(self, tensors, shape):
        n, k = shape
        packed = tensors["weight"]
        np_, kp = packed.shape[0], packed.shape[1] * 2
        nibbles = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(np_, kp)
        block_fp8 = from_blocked(tensors["weight_scale"], np_, kp // BLOCK)
        total = tensors["weight_scale_2"].float() * block_fp8.float()
        return (e2m1_values(nibbles) * total.repeat_interleave(BLOCK, dim=1))[:n, :k]
