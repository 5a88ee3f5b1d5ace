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

from dataclasses import dataclass

import torch

from ...calib.stats import InputStats
from ...declare import option
from ..formats.base import Format, Grid
from .hessian import rescalable, search_scales, work_hessian
from .sweep import SweepConfig, sweep
from .rtn import RoundToNearest


@dataclass
class SweepSettings:
    """Settings of the error-feedback sweep that GPTQ and QuIP share."""

    gptq_damp: float = option(0.1, "--gptq-damp", low=0.0, high=1.0,
                              help="Hessian dampening, a fraction of mean(diag H); docs/METHODS.md says how the "
                                   "default was chosen")
    gptq_block_size: int = option(128, "--gptq-block-size", low=1, help="columns per lazy batch update")
    scale_search: bool = option(True, "--scale-search", negatable=True,
                                help="INT8/FP8: per-row (per-tensor) clip factor minimizing the E[x²]-weighted error")


@dataclass
class GPTQConfig(SweepSettings):
    """GPTQ (--optimizer gptq)."""

    gptq_actorder: bool = option(True, "--gptq-actorder", negatable=True,
                                 help="quantize the columns with the largest E[x²] first")

    def sweep_config(self) -> SweepConfig:
        return SweepConfig(self.gptq_damp, self.gptq_block_size, self.gptq_actorder)


class GPTQ:
    name = "gptq"
    needs_stats = True

    def __init__(self, config: GPTQConfig | None = None, sweep: SweepConfig | None = None):
        self.config = config or GPTQConfig()
        self._sweep = sweep or self.config.sweep_config()

    def codes(self, fmt: Format, grid: Grid, layer: str, stats: InputStats | None = None) -> torch.Tensor:
        if stats is None:
            return RoundToNearest().codes(fmt, grid, layer)
        hessian = work_hessian(fmt, grid, stats.second_moment())
        if self.config.scale_search and rescalable(fmt, grid):
            grid.scale = search_scales(fmt, grid, torch.diagonal(hessian))
        if stats.hessian is None:
            return RoundToNearest().codes(fmt, grid, layer)
        return sweep(grid.work, grid.scale, hessian, fmt.round, self._sweep)
