"""Round-to-nearest (`--simple`): for a fixed scale grid it minimizes the plain weight error."""
from __future__ import annotations

import torch

from ..formats.base import Format, Grid, divide_by_scale

CHUNK_ELEMENTS = 1 << 22  # rows are rounded in slices of about this many elements, bounding temporaries


class RoundToNearest:
    name = "rtn"
    needs_stats = False

    def codes(self, fmt: Format, grid: Grid, layer: str, stats=None) -> torch.Tensor:
        work, scale = grid.work, grid.scale
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(work.shape[1], 1))
        if work.shape[0] <= rows_per_chunk:
            return fmt.round(divide_by_scale(work, scale))
        codes = torch.empty_like(work)
        per_row_scale = scale.dim() == 2 and scale.shape[0] == work.shape[0]
        for start in range(0, work.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            codes[rows] = fmt.round(divide_by_scale(work[rows], scale[rows] if per_row_scale else scale))
        return codes
