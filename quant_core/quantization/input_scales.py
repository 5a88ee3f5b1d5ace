"""Static activation scales (`--static-activations`): `<layer>.input_scale`, written only for the formats ComfyUI
reads it for (their contract's `activation_code_max`: fp8 of both kinds and nvfp4, docs/FORMATS.md). Scales multiply,
like the weight's: x ≈ q × input_scale, so input_scale = absmax(x) / (largest code). A calibration file's stored
`input_scale` is absmax / 448 (E4M3, docs/CALIBRATION.md): for another format it is rescaled to that format's code."""
from __future__ import annotations

import math

import torch

from ..calib.ranges import CalibrationStats
from ..errors import QuantError
from .formats import CONTRACTS

STORED_SCALE_CODE_MAX = 448.0  # the code a calibration file's input_scale is made for (E4M3)


def static_input_scale(layer: str, format_name: str, stats: CalibrationStats,
                       smoothing_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
    """(fp32 scalar input_scale, '') or (None, why the layer stays dynamic).

    With SmoothQuant the layer sees x/s, so the scale comes from max_k(absmax_k / s_k), never from a stored
    input_scale (that one describes the unsmoothed x). `stats` hands out validated statistics (fp32, absmax [K],
    input_scale one number); a divisor that does not fit the absmax is refused with one line here."""
    code_max = CONTRACTS[format_name].activation_code_max if format_name in CONTRACTS else None
    if code_max is None:
        return None, f"ComfyUI reads no input_scale for {format_name}"
    absmax, stored = stats.input_absmax(layer), stats.input_scale(layer)
    if smoothing_divisor is not None and absmax is not None:
        if tuple(smoothing_divisor.shape) != tuple(absmax.shape):
            raise QuantError(f"--calibration-data {stats.path}: {layer}.input_absmax has shape {list(absmax.shape)} "
                             f"but the layer's SmoothQuant divisor {list(smoothing_divisor.shape)}")
        amax = float((absmax.float() / smoothing_divisor.float()).max())
    elif stored is not None and smoothing_divisor is None:
        value = float(stored.float().reshape(-1)[0]) * STORED_SCALE_CODE_MAX / code_max
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
