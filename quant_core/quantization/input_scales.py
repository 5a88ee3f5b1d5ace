"""Static activation scales (`--static-activations`): `<layer>.input_scale`, written only for the formats ComfyUI
reads it for — fp8 (both kinds) and nvfp4 (FORMATS.md §2). Scales multiply, like the weight's:
x ≈ q × input_scale, so input_scale = absmax(x) / (largest code): 448 for E4M3, 57344 for E5M2, 448·6 for NVFP4
(comfy-kitchen's own per-tensor activation scale rules)."""
from __future__ import annotations

import math

import torch

from ..calib.ranges import CalibrationStats
from ..errors import QuantError

ACTIVATION_CODE_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "nvfp4": 448.0 * 6.0}


def static_input_scale(layer: str, format_name: str, stats: CalibrationStats,
                       smoothing_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
    """(fp32 scalar input_scale, '') or (None, why the layer stays dynamic).

    With SmoothQuant the layer sees x/s, so the scale comes from max_k(absmax_k / s_k), never from a stored
    input_scale (that one describes the unsmoothed x). `stats` hands out validated statistics (fp32, absmax [K],
    input_scale one number); a divisor that does not fit the absmax is refused with one line here."""
    code_max = ACTIVATION_CODE_MAX.get(format_name)
    if code_max is None:
        return None, f"ComfyUI reads no input_scale for {format_name}"
    absmax, stored = stats.input_absmax(layer), stats.input_scale(layer)
    if smoothing_divisor is not None and absmax is not None:
        if tuple(smoothing_divisor.shape) != tuple(absmax.shape):
            raise QuantError(f"--calibration-data {stats.path}: {layer}.input_absmax has shape {list(absmax.shape)} "
                             f"but the layer's SmoothQuant divisor {list(smoothing_divisor.shape)}")
        amax = float((absmax.float() / smoothing_divisor.float()).max())
    elif stored is not None and smoothing_divisor is None:
        value = float(stored.float().reshape(-1)[0])
        return (torch.tensor(value, dtype=torch.float32), "") if value > 0 else (None, "stored input_scale is 0")
    elif absmax is not None and absmax.numel():
        amax = float(absmax.float().max())
    else:
        return None, f"no input_scale or input_absmax in {stats.path}"
    if not amax > 0:
        return None, "its calibration activations are all zero"
    if not math.isfinite(amax / code_max):
        raise QuantError(f"--calibration-data {stats.path}: {layer}: the activation range {amax} gives no finite "
                         "input_scale")
    return torch.tensor(amax / code_max, dtype=torch.float32), ""
