"""The per-layer activation ranges SmoothQuant and static activation scales read from a calibration file.

A view over the shared reader (`quant_core.calib.CalibrationFile`, which validates header, keys, shapes and values):
only `<layer>.input_absmax` and `<layer>.input_scale` are read, never a layer's [K,K] Hessian.
"""
from __future__ import annotations

import torch

from .file import CalibrationFile
from .stats import InputStats


class CalibrationStats:
    """Per-layer activation statistics; a layer or key that is absent gives None (callers fall back and say so)."""

    def __init__(self, path: str, layers: dict[str, InputStats]):
        self.path = path
        self._layers = layers

    def input_absmax(self, layer: str) -> torch.Tensor | None:
        """max |x_k| over the calibration tokens, fp32 [K]."""
        stats = self._layers.get(layer)
        return None if stats is None else stats.absmax

    def input_scale(self, layer: str) -> torch.Tensor | None:
        """The stored static activation scale, fp32 scalar."""
        stats = self._layers.get(layer)
        return None if stats is None or stats.input_scale is None else stats.input_scale.reshape(())


def read_calibration(path: str) -> CalibrationStats:
    """Read the activation ranges of every layer. Raises QuantError (one line) for a bad file."""
    reader = CalibrationFile(path)
    try:
        return CalibrationStats(path, {layer: reader.get(layer, only=("input_scale",)) for layer in reader.layers})
    finally:
        reader.close()
