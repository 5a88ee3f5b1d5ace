"""Calibration sources for conversion: a file, synthetic inputs, or the input directions of a LoRA.

Synthetic inputs are x ~ N(0, I_K) (every layer, seeded by the layer name and `seed`): they carry no information
about the model, so H = I, E[x] = 0, and GPTQ/QuIP reduce to round-to-nearest on them (with QuIP's rotation still
spreading outliers). The statistics are the exact expectations, not a sample, so no sampling noise leaks into the
weights. LoRA-informed inputs concentrate half the energy in the span of the LoRA's down-projection rows (the input
directions the fine-tune reads): H = ½·I + ½·K·AᵀA/‖A‖²_F, E[x] = 0.
"""
from __future__ import annotations

import torch

from .file import CalibrationFile
from .stats import InputStats


def synthetic_stats(k: int) -> InputStats:
    """Exact statistics of x ~ N(0, I_K). absmax is the 99.9th percentile of |N(0,1)| (3.29): a nominal value."""
    return InputStats(absmax=torch.full((k,), 3.29), mean_sq=torch.ones(k), n_tokens=1,
                      hessian=torch.eye(k), mean=torch.zeros(k))


def lora_stats(down: torch.Tensor) -> InputStats:
    """Statistics of inputs whose energy is half isotropic, half in the row span of `down` [r, K]."""
    down = down.float().reshape(down.shape[0], -1)
    k = down.shape[1]
    energy = float((down * down).sum())
    hessian = 0.5 * torch.eye(k)
    if energy > 0:
        hessian += (0.5 * k / energy) * (down.T @ down)
    diag = torch.diagonal(hessian).clone()
    return InputStats(absmax=3.29 * diag.sqrt(), mean_sq=diag, n_tokens=1, hessian=hessian, mean=torch.zeros(k))


class CalibrationSource:
    """Where a conversion gets each layer's input statistics. `kind` is "file", "lora" or "synthetic"."""

    def __init__(self, kind: str, path: str | None = None, lora_downs: dict[str, torch.Tensor] | None = None):
        self.kind = kind
        self.file = CalibrationFile(path) if kind == "file" else None
        self.lora_downs = lora_downs or {}
        self.names: dict[str, str] | None = None  # model layer → file layer, once bound to a model

    def bind(self, model_layers: dict[str, int]) -> None:
        """Align the file's layer names with the model's (layer → K of the layers to quantize); refuses a file
        recorded on another model (calib.align)."""
        if self.file is not None:
            from .align import align_layers
            self.names = align_layers(self.file.widths(), model_layers, f"--calibration-data {self.file.path}")

    def stats(self, layer: str, k: int) -> tuple[InputStats | None, str]:
        """(statistics, what they are) for a layer with K input features; None when a file lacks the layer."""
        if self.file is not None:
            name = layer if self.names is None else self.names.get(layer)
            found = self.file.get(name, k) if name is not None else None
            if found is None:
                return None, "not in the calibration file"
            return found, f"calibration file, {found.n_tokens} tokens" + ("" if found.hessian is not None
                                                                         else ", diagonal only")
        if layer in self.lora_downs:
            return lora_stats(self.lora_downs[layer]), "LoRA-informed"
        return synthetic_stats(k), "synthetic N(0, I)"

    @property
    def real(self) -> bool:
        """Whether the statistics describe the model's real inputs (a recorded or captured file, not synthetic)."""
        return self.file is not None and self.file.recorded


def build_source(settings, lora_downs: dict[str, torch.Tensor] | None = None) -> CalibrationSource:
    """The calibration source a job's `CalibrationSettings` ask for: the file, else the LoRA's input directions
    (`lora_downs`, layer → [r, K]), else synthetic inputs."""
    if settings.calibration_data is not None:
        return CalibrationSource("file", settings.calibration_data)
    if settings.calibration_lora is not None:
        return CalibrationSource("lora", lora_downs=lora_downs)
    return CalibrationSource("synthetic")
