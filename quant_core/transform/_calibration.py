"""A minimal reader of the calibration statistics file (FORMATS.md §4) for SmoothQuant and static activation scales.

Private stand-in: the calibration package of the methods issue provides the shared `load_calibration(path)`; at merge
this module is replaced by it. Only the keys used here are read: `<layer>.input_absmax` [K] and `<layer>.input_scale`.
"""
from __future__ import annotations

import torch

from ..errors import QuantError
from ..io.reader import SafetensorsReader

FORMAT_TAG = "quant_calibration"


class CalibrationStats:
    """Per-layer activation statistics; a layer or key that is absent gives None (callers fall back and say so)."""

    def __init__(self, path: str, tensors: dict[str, torch.Tensor]):
        self.path = path
        self._tensors = tensors

    def input_absmax(self, layer: str) -> torch.Tensor | None:
        """max |x_k| over the calibration tokens, fp32 [K]."""
        return self._tensors.get(f"{layer}.input_absmax")

    def input_scale(self, layer: str) -> torch.Tensor | None:
        """The stored static activation scale, fp32 scalar."""
        return self._tensors.get(f"{layer}.input_scale")


def read_calibration(path: str) -> CalibrationStats:
    """Read and check a calibration file. Raises QuantError (one line) if it is not one."""
    with SafetensorsReader(path) as reader:
        tag = reader.metadata().get("format")
        if tag != FORMAT_TAG:
            raise QuantError(f"{path}: not a calibration statistics file (header format is {tag!r}, expected "
                             f"{FORMAT_TAG!r}; see FORMATS.md §4)")
        tensors = {}
        for key in reader.keys():
            if key.endswith((".input_absmax", ".input_scale")):
                tensors[key] = _checked(path, key, reader.get_tensor(key))
    return CalibrationStats(path, tensors)


def _checked(path: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    want_vector = key.endswith(".input_absmax")
    if not tensor.is_floating_point() or (tensor.dim() != 1 if want_vector else tensor.numel() != 1):
        raise QuantError(f"{path}: {key} must be a floating-point {'[K] vector' if want_vector else 'scalar'}, "
                         f"got {tensor.dtype} {list(tensor.shape)}")
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise QuantError(f"{path}: {key} has negative, NaN or Inf values")
    return tensor if want_vector else tensor.reshape(())
