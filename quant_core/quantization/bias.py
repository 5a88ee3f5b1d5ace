"""What calibration adds to one layer's quantization: its statistics, the comparison of the method's codes with
round-to-nearest (a layer keeps the method's codes only where they beat RTN's), the bias correction, and the output
SQNR of both for the report.

Only real statistics (a recorded or captured calibration file) count: measured on held-out text, GPTQ and QuIP
fitted to synthetic N(0, I) inputs are worse than RTN (docs/METHODS.md), so without real statistics a method that
needs them is round-to-nearest, and the others are compared with RTN on the weight error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib.source import CalibrationSource
from ..calib.stats import InputStats
from ..report import HELD_OUT, IN_SAMPLE, WEIGHTS, output_noise_energy, quadratic_energy, sqnr_db


@dataclass
class Evaluation:
    """What one layer's candidate reconstructions are compared on: the output error for inputs with second moment
    `second_moment` ([K, K], or its diagonal [K] for a diagonal-only layer) and mean `mean` (held-out inputs when
    the calibration file has them, else the fitting ones), or the weight error when `second_moment` is None."""

    compared_on: str  # report.HELD_OUT, IN_SAMPLE or WEIGHTS
    second_moment: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    correction_mean: torch.Tensor | None = None  # the fitting E[x] of a layer that gets a bias correction

    def energies(self, weight: torch.Tensor, approxes: list[torch.Tensor]) -> list[float]:
        """[signal, noise of each reconstruction] (output or weight energies, with each candidate's own bias
        correction), moved to the host in one transfer."""
        if self.second_moment is None:
            values = [weight.square().sum(dtype=torch.float64)]
            values += [(weight - a).square().sum(dtype=torch.float64) for a in approxes]
            return torch.stack(values).tolist()
        device = weight.device
        h = self.second_moment.to(device)
        mean = self.mean.to(device) if self.mean is not None else None
        correction = self.correction_mean.to(device) if self.correction_mean is not None else None
        values = [quadratic_energy(weight, h)]
        for approx in approxes:
            delta = weight - approx
            values.append(output_noise_energy(delta, h, mean, delta @ correction if correction is not None else None))
        return torch.stack(values).tolist()

    def compare(self, weight: torch.Tensor, method_approx: torch.Tensor, rtn_approx: torch.Tensor) -> "Outcome":
        """The method's reconstruction against RTN's: the method is kept only if its noise is lower."""
        signal, method_noise, rtn_noise = self.energies(weight, [method_approx, rtn_approx])
        return Outcome(method_noise < rtn_noise, sqnr_db(signal, method_noise), sqnr_db(signal, rtn_noise))


@dataclass
class Outcome:
    """One layer's comparison: whether the method's codes were written, and both SQNRs (dB) on the evaluation."""

    kept: bool
    method_db: float
    rtn_db: float


class LayerCalibration:
    """Per-conversion state: the source, and the bias corrections waiting for their bias tensor to be written."""

    def __init__(self, source: CalibrationSource | None, bias_correction: bool, biased_layers: set[str]):
        self.source = source
        self.bias_correction = bias_correction
        self.biased_layers = biased_layers
        self.bias_shifts: dict[str, torch.Tensor] = {}  # layer → Δb [N] (CPU, fp32)
        self.no_mean: list[str] = []  # biased layers whose statistics have no E[x]: no correction possible

    @property
    def real(self) -> bool:
        """Whether the statistics describe the model's real inputs (a recorded or captured file)."""
        return self.source is not None and self.source.real

    def unreal_label(self) -> str:
        """What the statistics are when they are not real."""
        if self.source is not None and self.source.file is not None:
            return f"calibration file of {self.source.file.inputs} inputs"
        return "synthetic N(0, I)"

    def stats(self, layer: str, k: int) -> tuple[InputStats | None, str]:
        """(real statistics of the layer or None, what they are). Synthetic statistics are never returned: nothing
        is fitted to them."""
        if self.source is None:
            return None, ""
        if not self.source.real:
            return None, self.unreal_label()
        return self.source.stats(layer, k)

    def evaluation(self, layer: str, stats: InputStats | None) -> Evaluation | None:
        """What the layer's codes are measured on (the held-out statistics when present, else the fitting ones);
        None without real statistics."""
        if stats is None:
            return None
        second_moment, mean, compared_on = None, None, IN_SAMPLE
        if stats.has_heldout:
            second_moment = stats.heldout_hessian if stats.heldout_hessian is not None else stats.heldout_mean_sq
            mean, compared_on = stats.heldout_mean, HELD_OUT
        if second_moment is None:
            second_moment, mean, compared_on = (stats.hessian if stats.hessian is not None else stats.mean_sq,
                                                None, IN_SAMPLE)
        corrected = self.bias_correction and layer in self.biased_layers
        return Evaluation(compared_on, second_moment, mean if mean is not None else stats.mean,
                          stats.mean if corrected else None)

    def after_layer(self, layer: str, method: str, weight: torch.Tensor, approx: torch.Tensor,
                    evaluation: Evaluation | None, outcome: Outcome | None) -> dict:
        """Record the bias correction of a quantized layer (`approx`: what was written) and measure it; returns
        LayerStats fields."""
        if evaluation is None:
            return {}
        if evaluation.second_moment is None:  # compared on the weight error (no real statistics)
            return {"compared_on": WEIGHTS, "method_kept": outcome.kept, "method_sqnr_db": outcome.method_db,
                    "calibration": _verdict(method, WEIGHTS, outcome)} if outcome is not None else {}
        fields, notes = {}, []
        if self.bias_correction and layer in self.biased_layers:
            if evaluation.correction_mean is None:
                self.no_mean.append(layer)
                notes.append("bias correction skipped: the calibration file has no input_mean")
            else:
                shift = (weight - approx) @ evaluation.correction_mean.to(weight.device)
                self.bias_shifts[layer] = shift.float().cpu()
                fields["bias_shift"] = float(shift.norm())
        if outcome is None:  # RTN itself: one candidate
            signal, noise = evaluation.energies(weight, [approx])
            written_db = rtn_db = sqnr_db(signal, noise)
        else:
            written_db = outcome.method_db if outcome.kept else outcome.rtn_db
            rtn_db = outcome.rtn_db
            fields.update(method_kept=outcome.kept, method_sqnr_db=outcome.method_db)
            notes.append(_verdict(method, evaluation.compared_on, outcome))
        tokens = "held-out" if evaluation.compared_on == HELD_OUT else "the same (in-sample)"
        notes.insert(0, f"output SQNR on {tokens} tokens")
        fields.update(output_sqnr_db=written_db, rtn_output_sqnr_db=rtn_db, compared_on=evaluation.compared_on,
                      calibration="; ".join(notes))
        return fields

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


def _verdict(method: str, compared_on: str, outcome: Outcome) -> str:
    """'gptq not better than RTN on held-out inputs (31.2 vs 31.9 dB): round-to-nearest'."""
    figures = f"({outcome.method_db:.2f} vs {outcome.rtn_db:.2f} dB)"
    if outcome.kept:
        return f"{method} better than RTN on {compared_on} {figures}: kept"
    return f"{method} not better than RTN on {compared_on} {figures}: round-to-nearest"


def weight_evaluation() -> Evaluation:
    """The comparison for a method that needs no inputs (learned rounding) when no real statistics exist."""
    return Evaluation(WEIGHTS)

