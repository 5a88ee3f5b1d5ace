"""Calibration sources for conversion: a file, or synthetic inputs.

Synthetic inputs are x ~ N(0, I_K): the exact expectations H = I, E[x] = 0. They carry no information about the
model; only a recorded or captured file is real (`CalibrationSource.real`), and without one the methods that need
statistics write round-to-nearest and say so.
"""
from __future__ import annotations

import torch

from .file import CalibrationFile
from .stats import InputStats


def synthetic_stats(k: int) -> InputStats:
    """Exact statistics of x ~ N(0, I_K). absmax is the 99.9th percentile of |N(0,1)| (3.29): a nominal value."""
    return InputStats(absmax=torch.full((k,), 3.29), mean_sq=torch.ones(k), n_tokens=1,
                      hessian=torch.eye(k), mean=torch.zeros(k))


class CalibrationSource:
    """Where a conversion gets each layer's input statistics. `kind` is "file" or "synthetic"."""

    def __init__(self, kind: str, path: str | None = None):
        self.kind = kind
        self.file = CalibrationFile(path) if kind == "file" else None
        self.names: dict[str, str] | None = None  # model layer → file layer, once bound to a model

    def bind(self, model_layers: dict[str, int], needed: set[str] | None = None) -> None:
        """Align the file's layer names with the model's (`model_layers`: every 2-D weight's layer → K; `needed`:
        the layers to quantize); refuses a file recorded on another model (calib.align)."""
        if self.file is not None:
            from .align import align_layers
            self.names = align_layers(self.file.widths(), model_layers, f"--calibration-data {self.file.path}", needed)

    def stats(self, layer: str, k: int) -> tuple[InputStats | None, str]:
        """(statistics, what they are) for a layer with K input features; None when a file lacks the layer."""
        if self.file is not None:
            name = layer if self.names is None else self.names.get(layer)
            found = self.file.get(name, k) if name is not None else None
            if found is None:
                return None, "not in the calibration file"
            return found, f"calibration file, {found.n_tokens} tokens" + ("" if found.hessian is not None
                                                                         else ", diagonal only")
        return synthetic_stats(k), "synthetic N(0, I)"

    @property
    def real(self) -> bool:
        """Whether the statistics describe the model's real inputs (a recorded or captured file, not synthetic)."""
        return self.file is not None and self.file.recorded


def build_source(settings) -> CalibrationSource:
    """The calibration source a job's `CalibrationSettings` ask for: the file, else synthetic inputs."""
    if settings.calibration_data is not None:
        return CalibrationSource("file", settings.calibration_data)
    return CalibrationSource("synthetic")
