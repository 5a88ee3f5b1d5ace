"""The quality report: per-layer weight MSE and SQNR (dB), worst layers first, a summary line, JSON output."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class LayerStats:
    layer: str
    format: str
    shape: tuple[int, int]
    mse: float
    sqnr_db: float  # 10·log10(‖W‖² / ‖W − Ŵ‖²); inf when exact
    rel_error: float  # ‖W − Ŵ‖ / ‖W‖
    note: str = ""
    output_sqnr_db: float | None = None  # 10·log10(E‖xWᵀ‖² / E‖x(W − Ŵ)ᵀ − Δb‖²) on held-out calibration inputs
    rtn_output_sqnr_db: float | None = None  # the same for round-to-nearest on the format's own scales
    bias_shift: float | None = None  # ‖Δb‖ of the bias correction (output units)
    calibration: str = ""  # where the layer's input statistics came from


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """10·log10(signal / noise): the one SQNR formula (inf when exact, -inf for no signal or infinite noise)."""
    if noise_energy == 0:
        return math.inf
    if signal_energy == 0:
        return -math.inf
    ratio = signal_energy / noise_energy
    return 10.0 * math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)


def sqnr_from_rel_error(rel_error: float) -> float:
    """SQNR (dB) of an approximation whose relative error ‖W − Ŵ‖ / ‖W‖ is `rel_error`."""
    return sqnr_db(1.0, rel_error * rel_error)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """‖Ŵ − W‖ / ‖W‖ (‖Ŵ‖ when W is zero) of fp32 tensors."""
    return safe_norm(approx - reference) / (safe_norm(reference) or 1.0)


def safe_norm(x: torch.Tensor) -> float:
    """‖x‖₂ as a Python float, without fp32 overflow for values near the fp32 limit."""
    norm = float(torch.linalg.vector_norm(x))
    if math.isfinite(norm) or not bool(torch.isfinite(x).all()):
        return norm
    scale = float(x.abs().max())
    return float(torch.linalg.vector_norm(x / scale)) * scale


def layer_stats(layer: str, fmt, weight: torch.Tensor, approx: torch.Tensor, note: str = "") -> LayerStats:
    """Error statistics of `approx` against `weight`. Consumes `approx` (the difference is formed in place)."""
    noise = safe_norm(approx.sub_(weight)) ** 2
    signal = safe_norm(weight) ** 2
    return LayerStats(layer, fmt.describe(), tuple(weight.shape), noise / max(weight.numel(), 1),
                      sqnr_db(signal, noise), math.sqrt(noise / signal) if signal else 0.0, note)


def output_noise(delta: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor | None,
                 bias_shift: torch.Tensor | None) -> float:
    """E‖x·Δᵀ − c‖² summed over outputs, for inputs with second moment H and mean μ: tr(ΔHΔᵀ) − 2cᵀΔμ + ‖c‖²,
    Δ = W − Ŵ [N, K], c the bias correction [N] (None: no correction)."""
    energy = float((delta @ hessian * delta).sum())
    if bias_shift is None or mean is None:
        return max(energy, 0.0)
    return max(energy - 2 * float(bias_shift @ (delta @ mean)) + float(bias_shift @ bias_shift), 0.0)


def output_sqnr_db(weight: torch.Tensor, delta: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor | None = None,
                   bias_shift: torch.Tensor | None = None) -> float:
    """Output SQNR (dB) of a layer for inputs with second moment `hessian` (and mean, with a bias correction)."""
    return sqnr_db(float((weight @ hessian * weight).sum()), output_noise(delta, hessian, mean, bias_shift))


class QualityReport:
    def __init__(self, layers: list[LayerStats], threshold_db: float = 30.0):
        self.layers = sorted(layers, key=lambda s: s.sqnr_db)  # worst first
        self.threshold_db = threshold_db

    def below_threshold(self) -> list[LayerStats]:
        return [s for s in self.layers if s.sqnr_db < self.threshold_db]

    def summary(self) -> str:
        if not self.layers:
            return "quality: no quantized layers"
        worst = self.layers[0]
        line = (f"quality: {len(self.layers)} layers, mean SQNR {self.mean_sqnr():.1f} dB, worst {worst.sqnr_db:.1f} dB "
                f"({worst.layer}), {len(self.below_threshold())} below {self.threshold_db:g} dB")
        return line + self.output_summary()

    def output_summary(self) -> str:
        """What the method bought on the layers' outputs (held-out calibration inputs), if measured."""
        pairs = [(s.output_sqnr_db, s.rtn_output_sqnr_db) for s in self.layers
                 if s.output_sqnr_db is not None and s.rtn_output_sqnr_db is not None
                 and math.isfinite(s.output_sqnr_db) and math.isfinite(s.rtn_output_sqnr_db)]
        if not pairs:
            return ""
        method = sum(p[0] for p in pairs) / len(pairs)
        rtn = sum(p[1] for p in pairs) / len(pairs)
        verdict = "better than" if method > rtn + 0.05 else "NOT better than"
        return (f"; output SQNR on held-out calibration inputs: {method:.2f} dB vs RTN {rtn:.2f} dB "
                f"({method - rtn:+.2f} dB, {verdict} RTN, mean of {len(pairs)} layers)")

    def mean_sqnr(self) -> float:
        finite = [s.sqnr_db for s in self.layers if math.isfinite(s.sqnr_db)]
        return sum(finite) / len(finite) if finite else math.inf

    def table(self, limit: int | None = 20) -> str:
        rows = self.layers if limit is None else self.layers[:limit]
        width = max([len(s.layer) for s in rows] + [5])
        outputs = any(s.output_sqnr_db is not None for s in rows)
        head = f"{'out dB':>8} {'RTN out':>8} {'‖Δb‖':>7}  " if outputs else ""
        lines = [f"{'layer':<{width}}  {'format':<28} {'SQNR dB':>8} {'MSE':>11}  {head}note"]
        for s in rows:
            flag = "  < threshold" if s.sqnr_db < self.threshold_db else ""
            cols = _output_columns(s) if outputs else ""
            lines.append(f"{s.layer:<{width}}  {s.format:<28} {s.sqnr_db:8.2f} {s.mse:11.4e}  {cols}{s.note}{flag}")
        if limit is not None and len(self.layers) > limit:
            lines.append(f"… {len(self.layers) - limit} more layers (see --report FILE.json)")
        return "\n".join(lines)

    def to_json(self, extra: dict | None = None) -> dict:
        return {"summary": self.summary(), "threshold_db": self.threshold_db, "mean_sqnr_db": _finite(self.mean_sqnr()),
                "layers": [_layer_json(s) for s in self.layers], **(extra or {})}


def _output_columns(s: LayerStats) -> str:
    def num(x, width, fmt):
        return f"{'-':>{width}}" if x is None else f"{x:{width}{fmt}}"
    return f"{num(s.output_sqnr_db, 8, '.2f')} {num(s.rtn_output_sqnr_db, 8, '.2f')} {num(s.bias_shift, 7, '.4f')}  "


def _finite(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _layer_json(s: LayerStats) -> dict:
    out = asdict(s)
    for key in ("sqnr_db", "output_sqnr_db", "rtn_output_sqnr_db"):
        if out[key] is not None:
            out[key] = _finite(out[key])
    return out
