"""What every format module provides.

A format knows bytes and layouts: how to choose a scale grid for a weight, which values the grid can represent,
how the integer codes and scales are packed into the tensors ComfyUI reads, and how to read them back.
Which code each weight gets on that grid is the method's business (`quant_core.methods`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .contract import FormatContract

OutputLayout = list[tuple[str, str, tuple[int, ...]]]  # (tensor suffix, safetensors dtype tag, shape)


@dataclass
class Grid:
    """The scale grid chosen for one weight.

    work:  the fp32 matrix the codes approximate (the weight, padded and/or rotated as the format needs), [Np, Kp]
    scale: per-element scale broadcastable to `work` (scales multiply: work ≈ codes × scale)
    extra: what `pack` needs besides the codes (stored scale tensors, original shape, …)
    """

    work: torch.Tensor
    scale: torch.Tensor
    extra: dict = field(default_factory=dict)


def exact_div(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """values / divisor, correctly rounded on every device. (CUDA turns a division by a Python number into a
    multiplication by its reciprocal, which can differ from the CPU's result in the last bit — and then in a code.)"""
    return values / torch.tensor(divisor, dtype=values.dtype, device=values.device)


def divide_by_scale(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values / scale (a new tensor), with 0 where the scale is 0 (all-zero blocks)."""
    if not bool((scale == 0).any()):
        return values / scale
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.zeros_like(values), values / safe)


class Format(ABC):
    """One on-disk format. Subclasses are stateless apart from their settings (block size, group size).
    What the file holds (dtypes, shapes, marker fields) is the format's `contract`, declared in its module."""

    contract: FormatContract  # the on-disk contract of the `format` string this writes
    label: str  # short label for file names and tables
    heur_block: int = 16  # dimension granularity `--heur` asks of a layer (GEMM tile alignment)
    stores_grid_scale: bool = False  # pack stores grid.scale as is, so a method may choose other per-row/tensor scales

    @property
    def name(self) -> str:
        """The `format` string written into `.comfy_quant`."""
        return self.contract.name

    @property
    def upstream(self) -> bool:
        """Loadable by upstream ComfyUI (v0.27+)."""
        return self.contract.upstream

    @property
    def layout_choice(self) -> dict[str, int] | None:
        """Which accepted shape of a companion this writes, where the contract accepts several (suffix → index)."""
        return None

    @property
    def rotation_group(self) -> int:
        """ConvRot group size G: the codes approximate W·Rᵀ, R the block Hadamard of size G that ComfyUI applies
        to the activations online (`int8.rotate`); 0 when the codes approximate W itself."""
        return 0

    def fit(self, shape: tuple[int, ...]) -> str | None:
        """Why this format cannot hold a weight of this shape, or None if it can."""
        return None

    def fallback(self) -> "Format | None":
        """The nearest upstream format that holds any shape, for layers this one does not fit (None: keep them)."""
        return None

    @abstractmethod
    def grid(self, weight: torch.Tensor) -> Grid:
        """Choose the scales for an fp32 [N, K] weight."""

    @abstractmethod
    def round(self, scaled: torch.Tensor) -> torch.Tensor:
        """Snap values already divided by the scale to the nearest representable code (returned as floats).
        May work in place on `scaled` (callers pass a tensor they own)."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, grid: Grid) -> dict[str, torch.Tensor]:
        """The tensors to store beside the layer name: suffix ('weight', 'weight_scale', …) → tensor."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """Read stored tensors back into an fp32 [N, K] weight (the inverse of pack, for verify and tests)."""

    def layout(self, shape: tuple[int, int]) -> OutputLayout:
        """The tensors `pack` will produce for a weight of this shape (planned before any data is read)."""
        return self.contract.layout(shape, self.marker(), self.layout_choice)

    def marker(self) -> dict:
        """The `.comfy_quant` entries besides `orig_dtype`."""
        return {"format": self.name}

    def reconstruct(self, codes: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The fp32 [N, K] weight the stored codes stand for (cheaper than pack + dequantize). Consumes `codes`:
        the result may be computed in its memory."""
        n, k = grid.extra["shape"]
        return codes.mul_(grid.scale)[:n, :k]

    def describe(self) -> str:
        return self.name
