"""Static activation scales (`--static-activations`): `<layer>.input_scale`, written only for the formats ComfyUI
reads it for — fp8 (both kinds) and nvfp4 (FORMATS.md §2). Scales multiply, like the weight's:
x ≈ q × input_scale, so input_scale = absmax(x) / (largest code): 448 for E4M3, 57344 for E5M2, 448·6 for NVFP4
(comfy-kitchen's own per-tensor activation scale rules)."""
from __future__ import annotations

import torch

from ..calib.ranges import CalibrationStats

ACTIVATION_CODE_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "nvfp4": 448.0 * 6.0}


def static_input_scale(layer: str, format_name: str, stats: CalibrationStats,
                       smoothing_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
    """(fp32 scalar input_scale, '') or (None, why the layer stays dynamic).

    With SmoothQuant the layer sees x/s, so the scale comes from max_k(absmax_k / s_k), never from a stored
    input_scale (that one describes the unsmoothed x)."""
    code_max = ACTIVATION_CODE_MAX.get(format_name)
    if code_max is None:
        return None, f"ComfyUI reads no input_scale for {format_name}"
    absmax = stats.input_absmax(layer)
    if smoothing_divisor is not None and absmax is not None:
        amax = float((absmax / smoothing_divisor).max())
    elif stats.input_scale(layer) is not None and smoothing_divisor is None:
        value = float(stats.input_scale(layer))
        return (torch.tensor(value, dtype=torch.float32), "") if value > 0 else (None, "stored input_scale is 0")
    elif absmax is not None:
        amax = float(absmax.max())
    else:
        return None, f"no input_scale or input_absmax in {stats.path}"
    if amax <= 0:
        return None, "its calibration activations are all zero"
    return torch.tensor(amax / code_max, dtype=torch.float32), ""
