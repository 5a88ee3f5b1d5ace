"""`convrot_w4a4` (`--format int4`): ConvRot-rotated symmetric INT4 weights with one scale per output row.

The stored codes quantize W·Rᵀ, R the block-diagonal normalized Hadamard of the ConvRot group size G — the rotation
of int8's ConvRot (`int8.rotate`). ComfyUI (since July 2026) rotates each activation by the same R online and
quantizes it to INT4 (W4A4 on INT4 tensor cores, Turing and later) or, with `linear_dtype: "int8"`, to INT8 (W4A8).
Codes are in [−7, 7], two per byte with the even column in the low nibble; the scale is fp32 [N], max|row| / 7 of
the rotated row. Round-to-nearest on the fp32 weight is byte-identical to comfy-kitchen's
`quantize_convrot_w4a4_weight` (which, given a bf16/fp16 tensor, would rotate and scale in that dtype instead).
"""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div
from .contract import Companion, FormatContract, kitchen_dequantize, stored_weight
from .int8 import Int8Tensorwise, is_power_of_4, rotate

INT4_MAX = 7.0  # symmetric codes: −8 fits a nibble but is never written (comfy-kitchen's quantizer range)
MIN_ABSMAX = 1e-10  # comfy-kitchen clamps each row's absmax here before dividing by 7 (all-zero rows)
ACTIVATION_GROUP = 64  # comfy-kitchen's quant_group_size: the INT4 GEMM needs K to be a multiple of it
DEFAULT_GROUP = 256  # ComfyUI's convrot_groupsize when the marker has none
LINEAR_DTYPES = ("int4", "int8")  # marker `linear_dtype`: the activations' type in ComfyUI's GEMM (default int4)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer-valued codes in [−8, 7] → [N, K/2] int8, column 2j in the low nibble of byte j."""
    q = codes.to(torch.int8)
    return (q[:, 0::2] & 0x0F) | (q[:, 1::2] << 4)  # int8 arithmetic: the high nibble's shift wraps as intended


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] int8 → [N, K] int8 codes, each nibble read as a signed 4-bit number."""
    low = (packed << 4) >> 4  # arithmetic shift: sign-extends the low nibble
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def _groupsize(conf: dict):
    return conf.get("convrot_groupsize", DEFAULT_GROUP)


def _marker_problems(conf: dict, n: int, k: int) -> list[str]:
    problems = []
    group = _groupsize(conf)
    if not isinstance(group, int) or isinstance(group, bool) or not is_power_of_4(group) or k % group:
        problems.append(f"convrot_groupsize {group!r} must be a power of 4 dividing K={k}")
    if k % ACTIVATION_GROUP:
        problems.append(f"K={k} must be a multiple of {ACTIVATION_GROUP} (the INT4 kernel's group size)")
    if conf.get("linear_dtype", "int4") not in LINEAR_DTYPES:
        problems.append(f"linear_dtype {conf['linear_dtype']!r} must be 'int4' or 'int8' (comfy-kitchen refuses "
                        "any other value and the model does not load)")
    return problems


def _kitchen(tensors: dict, conf: dict, shape) -> torch.Tensor:
    return kitchen_dequantize("TensorCoreConvRotW4A4Layout", tensors["weight"], shape, scale=tensors["weight_scale"],
                              convrot_groupsize=_groupsize(conf), linear_dtype=conf.get("linear_dtype", "int4"))


CONTRACT = FormatContract(
    "convrot_w4a4",
    (stored_weight("I8"),  # as comfy-kitchen's serializer writes it (ComfyUI casts the weight to int8 on load)
     Companion("weight_scale", ("F32",), lambda n, k, conf: [(n,)])),  # 1-D: comfy-kitchen's kernels require it
    _kitchen, typical=0.25, broken=0.5,  # Gaussian weights: ~0.16; a wrong nibble order or scale: > 1
    fields=("convrot_groupsize", "linear_dtype"), field_check=_marker_problems, pack=2)


class ConvRotW4A4(Format):
    contract = CONTRACT
    stores_grid_scale = True

    def __init__(self, group: int = DEFAULT_GROUP, linear_dtype: str = "int4"):
        if not is_power_of_4(group):
            raise ValueError(f"ConvRot group size must be a power of 4 (4, 16, 64, 256, …), got {group}")
        if linear_dtype not in LINEAR_DTYPES:
            raise ValueError(f"int4 linear dtype must be one of {', '.join(LINEAR_DTYPES)}, got {linear_dtype!r}")
        self.group = group
        self.linear_dtype = linear_dtype
        self.label = "int4" + ("" if group == DEFAULT_GROUP else f"_g{group}") + ("_a8" if linear_dtype == "int8" else "")

    @property
    def rotation_group(self) -> int:
        return self.group

    def fit(self, shape):
        k = shape[1]
        if k % self.group:
            return f"K={k} is not a multiple of the ConvRot group size {self.group}"
        if k % ACTIVATION_GROUP:
            return f"K={k} is not a multiple of {ACTIVATION_GROUP}, the INT4 kernel's group size"
        return None

    def fallback(self) -> Format:
        return Int8Tensorwise(per_row=True)

    def grid(self, weight):
        work = rotate(weight, self.group)
        amax = work.abs().amax(dim=1, keepdim=True).clamp(min=MIN_ABSMAX)
        return Grid(work, exact_div(amax, INT4_MAX), {"shape": tuple(weight.shape)})

    def round(self, scaled):
        return scaled.round_().clamp_(-INT4_MAX, INT4_MAX)

    def pack(self, codes, grid):
        return {"weight": pack_int4(codes), "weight_scale": grid.scale.reshape(-1).float().contiguous()}

    def dequantize(self, tensors, shape):
        codes = unpack_int4(tensors["weight"]).float()
        return rotate(codes * tensors["weight_scale"].float().reshape(-1, 1), self.group)

    def reconstruct(self, codes, grid):
        return rotate(codes.mul_(grid.scale), self.group)

    def marker(self):
        conf = {"format": self.name, "convrot_groupsize": self.group}
        if self.linear_dtype != "int4":  # as ComfyUI's own state_dict writes it
            conf["linear_dtype"] = self.linear_dtype
        return conf

    def describe(self):
        return f"{self.name} (G={self.group}{', W4A8' if self.linear_dtype == 'int8' else ''})"
