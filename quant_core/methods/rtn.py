"""Round-to-nearest (`--simple`): for a fixed scale grid it minimizes the plain weight error."""
from __future__ import annotations

import torch

from ..formats.base import Format, Grid, divide_by_scale


class RoundToNearest:
    name = "rtn"

    def codes(self, fmt: Format, grid: Grid, layer: str) -> torch.Tensor:
        return fmt.round(divide_by_scale(grid.work, grid.scale))
