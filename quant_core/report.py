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
    output_sqnr_db: float | None = None  # 10·log10(E‖xWᵀ‖² / E‖x(W − Ŵ)ᵀ − Δb‖²) of the written codes
    rtn_output_sqnr_db: float | None = None  # the same for round-to-nearest on the format's own scales
    bias_shift: float | None = None  # ‖Δb‖ of the bias correction (output units)
    calibration: str = ""  # where the layer's input statistics came from, and what the comparison with RTN chose
    compared_on: str = ""  # what the figures and the comparison with RTN use: one of COMPARED_ON, "" if nothing
    method_kept: bool | None = None  # the method's codes were written (True) or RTN's (False: not better than
    #                                  RTN on `compared_on`); None: no comparison (RTN itself, or no statistics)
    method_sqnr_db: float | None = None  # the method's own codes on `compared_on`, written or not (dB)
    threshold_db: float | None = None  # the format's warning level (quantization.runtime.FORMAT_QUALITY; None: 30)
    # run time (quantization/runtime.py): output SQNR as ComfyUI computes the layer on `runtime_gpu` — activations
    # quantized too — and of the dequantized weights alone on the same input rows; None where that GPU class
    # dequantizes the weights (the same as weights only)
    runtime_sqnr_db: float | None = None
    runtime_weights_db: float | None = None
    runtime_gpu: str = ""  # the GPU class, e.g. "Blackwell (RTX 50, B200)", or "every GPU class"
    runtime_note: str = ""  # how ComfyUI computes it there, and on which rows it was measured
    runtime_threshold_db: float | None = None  # the level under which the as-computed figure is flagged


HELD_OUT, IN_SAMPLE, WEIGHTS = "held-out inputs", "in-sample inputs", "the weight error"
COMPARED_ON = (HELD_OUT, IN_SAMPLE, WEIGHTS)


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


def quadratic_energy(m: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """E‖x·mᵀ‖² = tr(m H mᵀ) for m [N, K] and inputs with second moment H [K, K], or its diagonal [K] (a
    diagonal-only layer: no [K, K] matrix is formed). A 0-dim tensor on m's device (no host sync)."""
    if second_moment.dim() == 1:
        return ((m * m) @ second_moment).sum()
    return (m @ second_moment * m).sum()


def output_noise_energy(delta: torch.Tensor, second_moment: torch.Tensor, mean: torch.Tensor | None,
                        bias_shift: torch.Tensor | None) -> torch.Tensor:
    """E‖x·Δᵀ − c‖² summed over outputs, for inputs with second moment H and mean μ: tr(ΔHΔᵀ) − 2cᵀΔμ + ‖c‖²,
    Δ = W − Ŵ [N, K], c the bias correction [N] (None: no correction). A 0-dim tensor, clamped at 0."""
    energy = quadratic_energy(delta, second_moment)
    if bias_shift is not None and mean is not None:
        energy = energy - 2 * (bias_shift @ (delta @ mean)) + bias_shift @ bias_shift
    return energy.clamp(min=0.0)


def output_noise(delta: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor | None,
                 bias_shift: torch.Tensor | None) -> float:
    """`output_noise_energy` as a float."""
    return float(output_noise_energy(delta, hessian, mean, bias_shift))


def output_sqnr_db(weight: torch.Tensor, delta: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor | None = None,
                   bias_shift: torch.Tensor | None = None) -> float:
    """Output SQNR (dB) of a layer for inputs with second moment `hessian` (and mean, with a bias correction)."""
    return sqnr_db(float(quadratic_energy(weight, hessian)), output_noise(delta, hessian, mean, bias_shift))


DEFAULT_THRESHOLD_DB = 30.0  # a layer without its format's level (legacy formats)


class QualityReport:
    def __init__(self, layers: list[LayerStats], threshold_db: float | None = None, method: str = "rtn"):
        self.layers = sorted(layers, key=lambda s: s.sqnr_db)  # worst first
        self.threshold_db = threshold_db  # one level for every layer; None: each layer's format's own
        self.method = method  # the method asked for; its per-layer outcome against RTN is counted in the summary
        self.auto = None  # select.auto.AutoChoice of an --auto-bits / --auto-size-gb run

    def threshold_of(self, s: LayerStats) -> float:
        """The SQNR (dB) under which layer `s` is flagged."""
        if self.threshold_db is not None:
            return self.threshold_db
        return s.threshold_db if s.threshold_db is not None else DEFAULT_THRESHOLD_DB

    def below_threshold(self) -> list[LayerStats]:
        return [s for s in self.layers if s.sqnr_db < self.threshold_of(s)]

    def threshold_text(self) -> str:
        """'30 dB', or each format's level ('their format's level: nvfp4 15 dB, int8_tensorwise 30 dB')."""
        if self.threshold_db is not None:
            return f"{self.threshold_db:g} dB"
        levels = {s.format.split(" ")[0]: self.threshold_of(s) for s in self.layers}
        if len(levels) == 1:
            return f"{next(iter(levels.values())):g} dB ({next(iter(levels))}'s level)"
        return "their format's level (" + ", ".join(f"{f} {db:g} dB" for f, db in levels.items()) + ")"

    def summary(self) -> str:
        if not self.layers:
            return "quality: no quantized layers" + (f"; {self.auto.summary()}" if self.auto is not None else "")
        worst = self.layers[0]
        line = (f"quality: {len(self.layers)} layers, mean SQNR {self.mean_sqnr():.1f} dB, worst {worst.sqnr_db:.1f} dB "
                f"({worst.layer}), {len(self.below_threshold())} below {self.threshold_text()}")
        auto = f"; {self.auto.summary()}" if self.auto is not None else ""
        return line + self.output_summary() + self.runtime_summary() + self.method_summary() + auto

    def runtime_groups(self) -> dict[str, dict]:
        """Per GPU class of the run-time figures: layers measured as computed (activations quantized), their mean
        SQNR as computed and weights only on the same rows (dB), the rows, and layers that class dequantizes."""
        groups: dict[str, dict] = {}
        for s in self.layers:
            if not s.runtime_gpu:
                continue
            group = groups.setdefault(s.runtime_gpu, {"layers": 0, "computed_db": [], "weights_db": [], "rows": set(),
                                                      "dequantized": 0, "below": 0})
            if s.runtime_sqnr_db is None:
                group["dequantized"] += 1
                continue
            group["layers"] += 1
            group["computed_db"].append(s.runtime_sqnr_db)
            group["weights_db"].append(s.runtime_weights_db)
            group["rows"].add(s.runtime_note.rpartition("; on ")[2].split(" ", 1)[-1])
            group["below"] += s.runtime_threshold_db is not None and s.runtime_sqnr_db < s.runtime_threshold_db
        return {gpu: {"layers": g["layers"], "computed_db": _mean(g["computed_db"]) if g["layers"] else None,
                      "weights_db": _mean(g["weights_db"]) if g["layers"] else None, "rows": sorted(g["rows"]),
                      "dequantized": g["dequantized"], "below_threshold": g["below"]} for gpu, g in groups.items()}

    def runtime_summary(self) -> str:
        """'; as computed on Blackwell (RTX 50, B200): 14.20 dB vs 17.90 dB weights only (output SQNR of 152 layers
        on held-out calibration rows)': what ComfyUI's kernels make of the file where they quantize activations."""
        parts = []
        for gpu, g in self.runtime_groups().items():
            if g["layers"]:
                rows = g["rows"][0] if len(g["rows"]) == 1 else "; ".join(g["rows"])
                part = (f"as computed on {gpu}: {g['computed_db']:.2f} dB vs {g['weights_db']:.2f} dB weights only "
                        f"(output SQNR of {_layers(g['layers'])} on {rows}; {g['below_threshold']} below their "
                        "format's level as computed)")
                if g["dequantized"]:
                    part += f", {g['dequantized']} more dequantized there (= weights only)"
            else:
                part = f"as computed on {gpu}: weights dequantized, the same as weights only"
            parts.append(part)
        return "".join(f"; {p}" for p in parts)

    def _measured(self) -> list[LayerStats]:
        return [s for s in self.layers if s.output_sqnr_db is not None and s.rtn_output_sqnr_db is not None
                and math.isfinite(s.output_sqnr_db) and math.isfinite(s.rtn_output_sqnr_db)]

    def output_basis(self) -> str | None:
        """Which inputs the output figures are measured on: "held-out", "in-sample", "mixed", or None."""
        measured = self._measured()
        if not measured:
            return None
        held = sum(s.compared_on == HELD_OUT for s in measured)
        return "held-out" if held == len(measured) else "in-sample" if held == 0 else "mixed"

    def output_summary(self) -> str:
        """What the written file buys over RTN on the layers' outputs, if measured, and on which inputs: held-out
        only when every measured layer had held-out statistics (in-sample figures flatter a fitted method)."""
        measured = self._measured()
        if not measured:
            return ""
        method = sum(s.output_sqnr_db for s in measured) / len(measured)
        rtn = sum(s.rtn_output_sqnr_db for s in measured) / len(measured)
        verdict = "better than" if method > rtn + 0.05 else "NOT better than"
        basis = self.output_basis()
        if basis == "held-out":
            where = "on held-out calibration inputs"
        elif basis == "in-sample":
            where = "in-sample (the calibration file has no held-out part; these figures flatter the method)"
        else:
            held = sum(s.compared_on == HELD_OUT for s in measured)
            where = (f"on held-out inputs for {held} of {len(measured)} layers, in-sample for the other "
                     f"{len(measured) - held} (those figures flatter the method)")
        if self.method == "rtn":  # nothing to compare: the file is round-to-nearest
            return f"; output SQNR {where}: {method:.2f} dB (mean of {len(measured)} layers)"
        return (f"; output SQNR {where}: {method:.2f} dB vs RTN {rtn:.2f} dB "
                f"({method - rtn:+.2f} dB, {verdict} RTN, mean of {len(measured)} layers)")

    def method_counts(self) -> dict | None:
        """How many layers kept the method's codes and how many were written as round-to-nearest, and why (None
        for RTN itself)."""
        if self.method == "rtn" or not self.layers:
            return None
        fell_back = {}
        for basis in COMPARED_ON:
            layers = [s for s in self.layers if s.method_kept is False and s.compared_on == basis]
            if layers:
                fell_back[basis] = {"layers": len(layers), "method_db": _mean(s.method_sqnr_db for s in layers),
                                    "rtn_db": _mean(_rtn_db(s) for s in layers)}
        return {"kept": sum(s.method_kept is True for s in self.layers),
                "round_to_nearest": sum(s.method_kept is not True for s in self.layers),
                "not_better_than_rtn": fell_back,
                "without_statistics": sum(s.method_kept is None for s in self.layers)}

    def method_summary(self) -> str:
        """'; gptq kept on 140 layers, round-to-nearest on 12 (not better than RTN on held-out inputs: 31.20 vs
        31.90 dB mean)': what the comparison with RTN chose, with the rejected codes' mean figure."""
        counts = self.method_counts()
        if counts is None:
            return ""
        fell_back = counts["not_better_than_rtn"]
        reasons = [f"not better than RTN on {basis}: {f['method_db']:.2f} vs {f['rtn_db']:.2f} dB mean"
                   for basis, f in fell_back.items()]
        if counts["without_statistics"]:
            reasons.append("no recorded input statistics")
        if len(reasons) > 1:
            numbers = [f["layers"] for f in fell_back.values()] + [counts["without_statistics"]]
            reasons = [f"{n} {why}" for n, why in zip(numbers, reasons)]
        why = f" ({'; '.join(reasons)})" if reasons else ""
        if not counts["kept"]:
            return f"; {self.method}: round-to-nearest on all {_layers(counts['round_to_nearest'])}{why}"
        return f"; {self.method} kept on {_layers(counts['kept'])}, round-to-nearest on {counts['round_to_nearest']}{why}"

    def mean_sqnr(self) -> float:
        finite = [s.sqnr_db for s in self.layers if math.isfinite(s.sqnr_db)]
        return sum(finite) / len(finite) if finite else math.inf

    def table(self, limit: int | None = 20) -> str:
        rows = self.layers if limit is None else self.layers[:limit]
        width = max([len(s.layer) for s in rows] + [5])
        outputs = any(s.output_sqnr_db is not None for s in rows)
        computed = any(s.runtime_sqnr_db is not None for s in rows)
        head = f"{'out dB':>8} {'RTN out':>8} {'‖Δb‖':>7}  " if outputs else ""
        head += f"{'as comp.':>8} {'(w only)':>8}  " if computed else ""
        lines = [f"{'layer':<{width}}  {'format':<28} {'SQNR dB':>8} {'MSE':>11}  {head}note"]
        for s in rows:
            flag = f"  < {self.threshold_of(s):g} dB" if s.sqnr_db < self.threshold_of(s) else ""
            cols = _output_columns(s) if outputs else ""
            cols += _runtime_columns(s) if computed else ""
            note = "; ".join(filter(None, (s.note, s.calibration)))
            lines.append(f"{s.layer:<{width}}  {s.format:<28} {s.sqnr_db:8.2f} {s.mse:11.4e}  {cols}{note}{flag}")
        if limit is not None and len(self.layers) > limit:
            lines.append(f"… {len(self.layers) - limit} more layers (see --report FILE.json)")
        return "\n".join(lines)

    def to_json(self, extra: dict | None = None) -> dict:
        return {"summary": self.summary(), "threshold_db": self.threshold_db, "mean_sqnr_db": _finite(self.mean_sqnr()),
                "output_sqnr_basis": self.output_basis(), "method_layers": _json_safe(self.method_counts()),
                "runtime": _json_safe(self.runtime_groups()), "layers": [_layer_json(s) for s in self.layers],
                **({"auto": self.auto.to_json()} if self.auto is not None else {}), **(extra or {})}


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def _mean(values) -> float:
    """The mean of the finite values (inf when none is: exact)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def _rtn_db(s: LayerStats) -> float | None:
    """RTN's figure on the layer's `compared_on` (for the weight error: the written layer's, which is RTN's)."""
    return s.sqnr_db if s.compared_on == WEIGHTS else s.rtn_output_sqnr_db


def _output_columns(s: LayerStats) -> str:
    def num(x, width, fmt):
        return f"{'-':>{width}}" if x is None else f"{x:{width}{fmt}}"
    return f"{num(s.output_sqnr_db, 8, '.2f')} {num(s.rtn_output_sqnr_db, 8, '.2f')} {num(s.bias_shift, 7, '.4f')}  "


def _runtime_columns(s: LayerStats) -> str:
    def num(x):
        return f"{'-':>8}" if x is None else f"{x:8.2f}"
    return f"{num(s.runtime_sqnr_db)} {num(s.runtime_weights_db)}  "


def _finite(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _json_safe(value):
    """`value` with every non-finite float written as "inf" / "-inf" (JSON has no infinities)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return _finite(value) if isinstance(value, float) else value


def _layer_json(s: LayerStats) -> dict:
    out = asdict(s)
    for key in ("sqnr_db", "output_sqnr_db", "rtn_output_sqnr_db", "method_sqnr_db", "runtime_sqnr_db",
                "runtime_weights_db"):
        if out[key] is not None:
            out[key] = _finite(out[key])
    return out
