"""Methods choose the codes for a weight on the scale grid its format chose.

Interface: `method.codes(fmt, grid, layer, stats=None) -> Tensor`, the chosen grid values in scaled units (same
shape as `grid.work`); the format packs them. `stats` (quant_core.calib.InputStats) describes the layer's inputs;
methods with `needs_stats = True` use it (RTN and learned rounding ignore it). A method may replace `grid.scale` (per-row/per-tensor
formats with `fmt.stores_grid_scale`) before choosing codes. Any method works with any format through that one call.
"""
from __future__ import annotations

from ..errors import QuantError
from .gptq import GPTQ, GPTQConfig
from .learned import LearnedConfig, LearnedRounding
from .quip import QuIP, QuipConfig
from .rtn import RoundToNearest

METHODS = {"rtn": RoundToNearest, "gptq": GPTQ, "quip": QuIP, "learned": LearnedRounding}
HELP = {
    "rtn": "round-to-nearest: minimizes the weight error for the grid; no calibration",
    "gptq": "GPTQ: error-feedback rounding minimizing the output error on calibration inputs; needs real "
            "calibration data to beat RTN (on synthetic N(0, I) inputs it is RTN). Measured on MiniLM outputs with 832 "
            "calibration tokens: +2.7 dB INT8, +2.3 FP8, +2.3 NVFP4, +2.5 MXFP8",
    "quip": "QuIP: incoherence rotation + LDLQ; with --quip-store-transformed stored in ComfyUI's ConvRot form "
            "(+7.0 dB over RTN INT8 on MiniLM); the original-space default re-quantizes and is WORSE than RTN "
            "there (-0.9 dB INT8, -2.0 dB FP8)",
    "learned": "SVD learned rounding (--optimizer original/adamw/radam): measured NOT better than RTN on MiniLM "
               "outputs (±0.0 dB INT8/NVFP4, -0.04 to -0.64 dB FP8/MXFP8); kept for compatibility with the seed",
}


def get_method(name: str, config=None):
    """A method instance; `config` is the method's config dataclass (GPTQConfig, QuipConfig, LearnedConfig) or None."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise QuantError(f"unknown method {name!r} (available: {', '.join(METHODS)})") from None
    return cls(config) if config is not None else cls()
