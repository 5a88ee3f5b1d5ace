"""GPTQ (`--optimizer gptq`, Frantar et al. 2022): round columns one at a time and push each rounding error onto
the columns not yet rounded, weighted by the inverse Hessian of the layer's output error, so that
E‖x(W − Ŵ)ᵀ‖² over the calibration inputs is minimized instead of ‖W − Ŵ‖².

Scales are fixed before the sweep: for formats that store one scale per row or per tensor (INT8, FP8), the clip
factor per row/tensor minimizing the diag(H)-weighted rounding error (`search_scales`); block formats (NVFP4, MXFP8)
keep their block scales. With ConvRot the sweep runs in the rotated basis with the rotated Hessian.
Without a full Hessian for a layer (diagonal-only statistics) there is nothing to propagate: the result is
round-to-nearest on the searched scales.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calib.stats import InputStats
from ..formats.base import Format, Grid
from .hessian import rescalable, search_scales, work_hessian
from .ldlq import SweepConfig, sweep
from .rtn import RoundToNearest


@dataclass
class GPTQConfig:
    sweep: SweepConfig = field(default_factory=SweepConfig)
    scale_search: bool = True


class GPTQ:
    name = "gptq"
    needs_stats = True

    def __init__(self, config: GPTQConfig | None = None):
        self.config = config or GPTQConfig()

    def codes(self, fmt: Format, grid: Grid, layer: str, stats: InputStats | None = None) -> torch.Tensor:
        if stats is None:
            return RoundToNearest().codes(fmt, grid, layer)
        hessian = work_hessian(fmt, grid, stats.second_moment())
        if self.config.scale_search and rescalable(fmt, grid):
            grid.scale = search_scales(fmt, grid, torch.diagonal(hessian))
        if stats.hessian is None:
            return RoundToNearest().codes(fmt, grid, layer)
        return sweep(grid.work, grid.scale, hessian, fmt.round, self.config.sweep)
