"""The input second moment H = E[x xᵀ] in a format's work basis, and a Hessian-aware choice of scales."""
from __future__ import annotations

import torch

from ..formats.base import Format, Grid, divide_by_scale
from ..formats.int8 import rotate

CLIP_FACTORS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70)


def work_hessian(fmt: Format, grid: Grid, hessian: torch.Tensor) -> torch.Tensor:
    """H in the basis of `grid.work`: rotated like the weight for ConvRot formats (int8 ConvRot, int4: work =
    W·Rᵀ, so x' = x·R, H' = R·H·Rᵀ), zero-padded (identity on the diagonal) to the padded width of block formats."""
    h = hessian.to(device=grid.work.device, dtype=torch.float32)
    group = fmt.rotation_group
    if group:
        h = rotate(rotate(h, group).T.contiguous(), group)
    pad = grid.work.shape[1] - h.shape[0]
    if pad > 0:
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
        h[-pad:, -pad:] += torch.eye(pad, device=h.device)
    return h


def rescalable(fmt: Format, grid: Grid) -> bool:
    """Whether the format stores exactly `grid.scale` (per row or per tensor), so a method may choose another."""
    return getattr(fmt, "stores_grid_scale", False) and grid.scale.numel() in (1, grid.work.shape[0])


def search_scales(fmt: Format, grid: Grid, diag: torch.Tensor) -> torch.Tensor:
    """Per-row (or per-tensor) scale = clip factor × the format's absmax scale, the factor minimizing the
    round-to-nearest error weighted by diag(H) = E[x_k²] (the output error a column's rounding causes on its own).
    Tried factors: CLIP_FACTORS. Returns the new scale, shaped like `grid.scale`."""
    weights = diag.to(grid.work.device).clamp(min=0).unsqueeze(0)
    per_row = grid.scale.numel() > 1
    best_error, best_scale = None, grid.scale
    for factor in CLIP_FACTORS:
        scale = grid.scale * factor
        codes = fmt.round(divide_by_scale(grid.work, scale))
        error = ((grid.work - codes * scale) ** 2 * weights).sum(dim=1, keepdim=True)
        if not per_row:
            error = error.sum()
        if best_error is None:
            best_error, best_scale = error, scale
            continue
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.minimum(error, best_error)
    return best_scale.reshape(grid.scale.shape)
