"""Methods choose the codes for a weight on the scale grid its format chose.

Interface: `method.codes(fmt, grid, layer, stats=None) -> Tensor`, the chosen grid values in scaled units (same
shape as `grid.work`); the format packs them. `stats` (quant_core.calib.InputStats) describes the layer's inputs;
methods with `needs_stats = True` use it (RTN and learned rounding ignore it). A method may replace `grid.scale`
(per-row/per-tensor formats with `fmt.stores_grid_scale`) before choosing codes. Any method works with any format
through that one call. Each method's settings are one config record (`config_class`), declared with its flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from .gptq import GPTQ, GPTQConfig
from .learned import LearnedConfig, LearnedRounding
from .quip import QuIP, QuipConfig
from .rtn import RoundToNearest


@dataclass(frozen=True)
class MethodEntry:
    method_class: type
    config_class: type | None  # None: no settings
    help: str


METHODS = {
    "rtn": MethodEntry(RoundToNearest, None, "round-to-nearest: minimizes the weight error for the grid; no "
                                             "calibration"),
    "gptq": MethodEntry(GPTQ, GPTQConfig, "GPTQ: error-feedback rounding minimizing the output error on "
                                          "calibration inputs; needs real calibration data to beat RTN"),
    "quip": MethodEntry(QuIP, QuipConfig, "QuIP: incoherence rotation + LDLQ; stored in ComfyUI's ConvRot form with "
                                          "--quip-store-transformed, otherwise re-quantized in the original space "
                                          "(which loses most of the gain: docs/METHODS.md)"),
    "learned": MethodEntry(LearnedRounding, LearnedConfig, "SVD learned rounding (--optimizer original/adamw/radam): "
                                                           "not better than RTN on output error (docs/METHODS.md)"),
}


def make_method(name: str, config=None):
    """A method instance; `config` is the method's config record (None for RTN or the defaults)."""
    entry = METHODS[name]
    return entry.method_class(config) if config is not None else entry.method_class()


__all__ = ["METHODS", "MethodEntry", "make_method", "GPTQ", "GPTQConfig", "QuIP", "QuipConfig", "LearnedConfig",
           "LearnedRounding", "RoundToNearest"]
