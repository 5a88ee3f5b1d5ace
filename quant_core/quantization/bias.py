"""What calibration adds to one layer's quantization: its statistics, the bias correction, and the output SQNR of
the method and of round-to-nearest on held-out calibration inputs (for the report)."""
from __future__ import annotations

import torch

from .formats.base import Format
from .methods.rtn import RoundToNearest
from ..report import output_sqnr_db
from ..calib.stats import InputStats
from ..calib.source import CalibrationSource


class LayerCalibration:
    """Per-conversion state: the source, and the bias corrections waiting for their bias tensor to be written."""

    def __init__(self, source: CalibrationSource | None, bias_correction: bool, biased_layers: set[str]):
        self.source = source
        self.bias_correction = bias_correction
        self.biased_layers = biased_layers
        self.bias_shifts: dict[str, torch.Tensor] = {}  # layer → Δb [N] (CPU, fp32)
        self.no_mean: list[str] = []  # biased layers whose statistics have no E[x]: no correction possible

    def stats(self, layer: str, k: int) -> tuple[InputStats | None, str]:
        if self.source is None:
            return None, ""
        return self.source.stats(layer, k)

    def after_layer(self, layer: str, fmt: Format, weight: torch.Tensor, approx: torch.Tensor,
                    stats: InputStats | None) -> dict:
        """Record the bias correction of a quantized layer and measure it; returns LayerStats fields."""
        if stats is None or not self.source.real:
            return {}
        mean = stats.mean.to(weight.device) if stats.mean is not None else None
        fields = {}
        shift = None
        if self.bias_correction and layer in self.biased_layers:
            if mean is None:
                self.no_mean.append(layer)
                fields["calibration"] = "bias correction skipped: the calibration file has no input_mean"
            else:
                shift = (weight - approx) @ mean
                self.bias_shifts[layer] = shift.float().cpu()
        if stats.hessian is not None:
            note = fields.pop("calibration", "")
            fields.update(self._output_sqnr(fmt, weight, approx, stats, shift))
            fields["calibration"] = "; ".join(filter(None, (fields["calibration"], note)))
        if shift is not None:
            fields["bias_shift"] = float(shift.norm())
        return fields

    def _output_sqnr(self, fmt, weight, approx, stats: InputStats, shift) -> dict:
        heldout = stats.heldout_hessian is not None
        hessian = (stats.heldout_hessian if heldout else stats.hessian).to(weight.device)
        mean_source = stats.heldout_mean if heldout and stats.heldout_mean is not None else stats.mean
        mean = mean_source.to(weight.device) if mean_source is not None else None
        grid = fmt.grid(weight)
        rtn = fmt.reconstruct(RoundToNearest().codes(fmt, grid, ""), grid)
        rtn_shift = (weight - rtn) @ stats.mean.to(weight.device) if shift is not None else None
        method_db = output_sqnr_db(weight, weight - approx, hessian, mean, shift)
        rtn_db = output_sqnr_db(weight, weight - rtn, hessian, mean, rtn_shift)
        return {"output_sqnr_db": method_db, "rtn_output_sqnr_db": rtn_db,
                "calibration": "output SQNR on " + ("held-out" if heldout else "the same (in-sample)") + " tokens"}

    def skipped_note(self) -> str | None:
        """What the run must say when bias correction was on but could not be computed for some layers."""
        if not self.no_mean:
            return None
        return (f"bias correction skipped for {len(self.no_mean)} layers with a bias (e.g. {self.no_mean[0]}): the "
                "calibration file has no input_mean (E[x]); record it with `calibrate`, or pass --no-bias-correction")

    def close(self) -> None:
        if self.source is not None and self.source.file is not None:
            self.source.file.close()

    def corrected_bias(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The bias with its layer's correction added (unchanged if none is pending)."""
        shift = self.bias_shifts.pop(key[: -len(".bias")], None) if key.endswith(".bias") else None
        if shift is None or not tensor.is_floating_point() or tuple(tensor.shape) != tuple(shift.shape):
            return tensor
        return (tensor.float() + shift).to(tensor.dtype)

