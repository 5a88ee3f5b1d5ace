"""The per-layer activation ranges SmoothQuant and static activation scales read from a calibration file.

A view over the shared reader (`quant_core.calib.CalibrationFile`, which validates header, keys, shapes and values):
only `<layer>.input_absmax` and `<layer>.input_scale` are read, never a layer's [K,K] Hessian. The view checks again
what its consumers rely on (absmax a non-empty fp32 vector, input_scale one number, both finite and non-negative), so
a statistic that slipped through — or a view built directly from InputStats — fails here with one line, never later.
"""
from __future__ import annotations

import torch

from ..errors import QuantError
from .file import CalibrationFile
from .stats import InputStats

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class CalibrationStats:
    """Per-layer activation statistics; a layer or key that is absent gives None (callers fall back and say so)."""

    def __init__(self, path: str, layers: dict[str, InputStats]):
        self.path = path
        self._absmax: dict[str, torch.Tensor] = {}
        self._scale: dict[str, torch.Tensor] = {}
        for layer, stats in layers.items():
            if stats is None:
                continue
            self._absmax[layer] = _checked(path, layer, "input_absmax", stats.absmax, vector=True)
            if stats.input_scale is not None:
                self._scale[layer] = _checked(path, layer, "input_scale", stats.input_scale, vector=False)

    def input_absmax(self, layer: str) -> torch.Tensor | None:
        """max |x_k| over the calibration tokens, fp32 [K]."""
        return self._absmax.get(layer)

    def input_scale(self, layer: str) -> torch.Tensor | None:
        """The stored static activation scale, fp32 scalar."""
        return self._scale.get(layer)


def _checked(path: str, layer: str, name: str, value, vector: bool) -> torch.Tensor:
    """`value` as fp32 ([K] when `vector`, else a scalar), or a one-line QuantError naming the file and key."""
    where = f"--calibration-data {path}: {layer}.{name}"
    if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise QuantError(f"{where} is stored as {kind}; statistics must be float32, float64, float16 or bfloat16")
    if vector and (value.dim() != 1 or value.numel() == 0):
        raise QuantError(f"{where} has shape {list(value.shape)}; expected [K], one value per input feature (K > 0)")
    if not vector and value.numel() != 1:
        raise QuantError(f"{where} has shape {list(value.shape)}; expected one number")
    value = value.detach().float()
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise QuantError(f"{where} must hold finite, non-negative values")
    return value if vector else value.reshape(())


def read_calibration(path: str, model_layers: dict[str, int] | None = None,
                     needed: set[str] | None = None) -> CalibrationStats:
    """Read the activation ranges of every layer, named as in the model when `model_layers` (layer → K) is given
    (the file's names aligned with them, calib.align). Raises QuantError (one line) for a bad file."""
    reader = CalibrationFile(path)
    try:
        if model_layers is None:
            names = {layer: layer for layer in reader.layers}
        else:
            from .align import align_layers
            names = align_layers(reader.widths(), model_layers, f"--calibration-data {path}", needed)
        return CalibrationStats(path, {model: reader.get(layer, only=("input_scale",))
                                       for model, layer in names.items()})
    finally:
        reader.close()
