"""`int8_tensorwise`: symmetric INT8 with one scale per tensor ([]) or per output row ([N, 1]); optional ConvRot.

ConvRot stores W·Hᵀ, H the block-diagonal normalized Hadamard of size G (Kronecker power of a 4×4 Hadamard);
ComfyUI rotates the activations online by the same H, so the product is unchanged and outliers are spread.
"""
from __future__ import annotations

import torch

from .base import Format, Grid, exact_div
from .contract import Companion, FormatContract, kitchen_dequantize, stored_weight

INT8_MAX = 127.0
MIN_SCALE = 1e-30  # an all-zero row/tensor still gets a finite, positive scale

_HADAMARD_4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)


def is_power_of_4(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


def hadamard(size: int, device=None) -> torch.Tensor:
    """Normalized Hadamard of `size` (a power of 4), symmetric and orthogonal, fp32."""
    if not is_power_of_4(size):
        raise ValueError(f"ConvRot group size must be a power of 4 (4, 16, 64, 256, …), got {size}")
    h = _HADAMARD_4
    while h.shape[0] < size:
        h = torch.kron(h, _HADAMARD_4)
    return (h / size ** 0.5).to(device=device, dtype=torch.float32)


def rotate(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W·Hᵀ applied to each group of `group_size` input columns. Its own inverse (H is symmetric, orthogonal)."""
    n, k = weight.shape
    h = hadamard(group_size, weight.device)
    return (weight.reshape(n, k // group_size, group_size) @ h.T).reshape(n, k)


def _scale_shapes(n: int, k: int, conf: dict):
    return [(), (1,), (n, 1)]  # per tensor, the same as a 1-element vector, per output row


PER_TENSOR, PER_ROW = 0, 2  # which of _scale_shapes the format writes


def _convrot_problems(conf: dict, n: int, k: int) -> list[str]:
    group = conf.get("convrot_groupsize")
    if conf.get("convrot") and (not isinstance(group, int) or not is_power_of_4(group) or k % group):
        return [f"convrot_groupsize {group!r} must be a power of 4 dividing K={k}"]
    return []


def _kitchen(tensors: dict, conf: dict, shape) -> torch.Tensor:
    return kitchen_dequantize("TensorWiseINT8Layout", tensors["weight"], shape, scale=tensors["weight_scale"],
                              convrot=bool(conf.get("convrot")), convrot_groupsize=conf.get("convrot_groupsize", 256))


CONTRACT = FormatContract(
    "int8_tensorwise",
    (stored_weight("I8"),
     Companion("weight_scale", ("F32",), _scale_shapes)),
    _kitchen, typical=0.05, broken=0.6,  # per-tensor INT8 of a weight with outliers can legitimately reach ~0.4
    fields=("convrot", "convrot_groupsize", "per_row"),  # per_row: tolerated (ComfyUI ignores it)
    field_check=_convrot_problems)


class Int8Tensorwise(Format):
    contract = CONTRACT
    stores_grid_scale = True

    def __init__(self, per_row: bool = True, convrot_group: int = 0):
        if convrot_group and not per_row:
            raise ValueError("ConvRot needs per-row INT8 scales (--scaling_mode row)")
        if convrot_group and not is_power_of_4(convrot_group):
            raise ValueError(f"ConvRot group size must be a power of 4 (4, 16, 64, 256, …), got {convrot_group}")
        self.per_row = per_row
        self.convrot_group = convrot_group
        self.label = "int8_row" if per_row else "int8_tensor"
        if convrot_group:
            self.label = f"int8_convrot{convrot_group}"

    @property
    def rotation_group(self) -> int:
        return self.convrot_group

    def fallback(self) -> Format:
        return Int8Tensorwise(per_row=True)

    def fit(self, shape):
        if self.convrot_group and shape[1] % self.convrot_group:
            return f"K={shape[1]} is not a multiple of the ConvRot group size {self.convrot_group}"
        return None

    def grid(self, weight):
        work = rotate(weight, self.convrot_group) if self.convrot_group else weight
        if self.per_row:
            amax = work.abs().amax(dim=1, keepdim=True)
        else:
            amax = work.abs().amax()
        scale = exact_div(amax, INT8_MAX).clamp(min=MIN_SCALE)
        return Grid(work, scale, {"shape": tuple(weight.shape)})

    def round(self, scaled):
        return scaled.round_().clamp_(-INT8_MAX, INT8_MAX)

    def pack(self, codes, grid):
        return {"weight": codes.to(torch.int8), "weight_scale": grid.scale.float().contiguous()}

    def dequantize(self, tensors, shape):
        weight = tensors["weight"].float() * tensors["weight_scale"].float()
        return rotate(weight, self.convrot_group) if self.convrot_group else weight

    def reconstruct(self, codes, grid):
        weight = codes.mul_(grid.scale)
        return rotate(weight, self.convrot_group) if self.convrot_group else weight

    @property
    def layout_choice(self):
        return {"weight_scale": PER_ROW if self.per_row else PER_TENSOR}

    def marker(self):
        conf = {"format": self.name}
        if self.convrot_group:
            conf.update(convrot=True, convrot_groupsize=self.convrot_group)
        return conf

    def describe(self):
        kind = "per-row" if self.per_row else "per-tensor"
        return f"{self.name} ({kind}{f', ConvRot G={self.convrot_group}' if self.convrot_group else ''})"
