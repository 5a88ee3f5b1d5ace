"""The quantize stage for one layer: which device computes it, the method on the format's grid (kept only where it
beats round-to-nearest: `bias.Evaluation`), the marker, and the layer's error statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import QuantError
from ..report import layer_stats
from .bias import Evaluation, LayerCalibration, Outcome, weight_evaluation
from .formats import Format
from .formats.markers import MARKER_SUFFIX, marker_tensor
from .methods.rtn import RoundToNearest
from .runtime import runtime_fields

# --streaming-mode: layers with more weight elements than this are quantized on the CPU when the device is CUDA
STREAMING_THRESHOLDS = {"off": math.inf, "minimal": 100_000_000, "balanced": 50_000_000, "aggressive": 25_000_000}
AUTO_WORKING_COPIES = 16  # --streaming-mode auto: a layer may take ~16 fp32 copies of its weight on the GPU


def pick_device(settings) -> torch.device:
    """The device a job's `DeviceSettings` ask for."""
    if settings.low_memory or settings.device == "cpu":
        return torch.device("cpu")
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantError(f"--device {settings.device}: CUDA is not available on this machine")
    try:
        return torch.device(settings.device)
    except RuntimeError:
        raise QuantError(f"--device: unknown device {settings.device!r} (auto, cpu, cuda, cuda:N)") from None


def streaming_threshold(settings, device: torch.device) -> float:
    """Weight elements above which a layer is quantized on the CPU although the device is CUDA."""
    if settings.no_memory_limits or device.type != "cuda":
        return math.inf
    if settings.cpu_threshold is not None:
        return settings.cpu_threshold
    if settings.streaming_mode != "auto":
        return STREAMING_THRESHOLDS[settings.streaming_mode]
    free, _ = torch.cuda.mem_get_info(device)
    return free / (4 * AUTO_WORKING_COPIES)


def compute_dtype(numel: int, device: torch.device, config) -> torch.dtype:
    """--bf16-compute of learned rounding: the dtype of its matrix products for a layer of `numel` elements."""
    if config.bf16_compute == "off":
        return torch.float32
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if config.bf16_compute == "on":
        return torch.bfloat16 if bf16_ok else torch.float32
    return torch.bfloat16 if device.type == "cuda" and bf16_ok and numel >= config.bf16_threshold else torch.float32


@dataclass
class LayerRun:
    """How each layer is computed: method, device (with the streaming threshold), bf16, OOM fallback."""

    method: object
    device: torch.device
    no_memory_limits: bool
    path: str
    cpu_above: float  # weight elements above which the layer runs on the CPU
    notes: list
    runtime_gpu: str = "auto"  # the GPU class the report's "as computed" figures emulate (runtime.py)
    input_divisor: object = None  # layer → s of SmoothQuant (the layer's inputs are x / s) or None
    text_encoder: bool = False  # ComfyUI computes the model with dequantized weights (runtime.TEXT_ENCODER_PRESETS)

    def device_for(self, numel: int) -> torch.device:
        return torch.device("cpu") if numel > self.cpu_above else self.device

    def compute(self, decision, tensor: torch.Tensor, stats=None, method=None, guard: Evaluation | None = None):
        """(tensors to write, fp32 weight, fp32 reconstruction of what is written, Outcome or None) on the layer's
        device. `method` defaults to the run's; with `guard`, RTN's codes are computed too and the method's are
        written only if they beat them on it. An out-of-memory error on CUDA retries the layer on the CPU (unless
        --no-memory-limits) and says so."""
        method = method or self.method
        device = self.device_for(tensor.numel())
        try:
            return self._compute_on(device, decision, tensor, stats, method, guard)
        except torch.cuda.OutOfMemoryError:
            if device.type == "cpu":
                raise
            if self.no_memory_limits:
                raise QuantError(f"{self.path}: layer {decision.layer}: CUDA out of memory (--no-memory-limits: "
                                 "no CPU retry); drop --no-memory-limits or use --streaming-mode aggressive") from None
            torch.cuda.empty_cache()
            self.notes.append(f"{decision.layer}: CUDA out of memory; quantized on the CPU instead")
            return self._compute_on(torch.device("cpu"), decision, tensor, stats, method, guard)

    def _compute_on(self, device: torch.device, decision, tensor: torch.Tensor, stats, method, guard):
        weight = tensor.to(device=device, dtype=torch.float32, non_blocking=True)
        fmt: Format = decision.format
        if hasattr(method, "compute_dtype"):
            method.compute_dtype = compute_dtype(tensor.numel(), device, method.config)
        grid = fmt.grid(weight)
        if guard is None:
            codes = method.codes(fmt, grid, decision.layer, stats)
            packed = fmt.pack(codes, grid)
            return packed, weight, fmt.reconstruct(codes, grid), None
        own = replace(grid)  # methods may rebind grid.scale (GPTQ's scale search); RTN rounds on the format's own
        rtn_codes = RoundToNearest().codes(fmt, own, decision.layer)
        codes = method.codes(fmt, grid, decision.layer, stats)
        approx = fmt.reconstruct(codes.clone(), grid)
        rtn_approx = fmt.reconstruct(rtn_codes.clone(), own)
        outcome: Outcome = guard.compare(weight, approx, rtn_approx)
        if not outcome.kept:
            codes, grid, approx = rtn_codes, own, rtn_approx
        return fmt.pack(codes, grid), weight, approx, outcome


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN/Inf values of a tensor. One cheap pass: they propagate into the sum (which can also overflow on huge
    finite values: then count)."""
    return 0 if math.isfinite(float(tensor.sum(dtype=torch.float32))) else int((~torch.isfinite(tensor)).sum())


def layer_method(run: LayerRun, calibration: LayerCalibration, layer: str, stats):
    """(method, evaluation, guard) for one layer: a method that needs statistics is round-to-nearest without real
    ones (fitted to none or synthetic ones it is worse than RTN: METHODS.md); `evaluation` is what its codes are
    measured on, and `guard` the comparison with RTN's codes (None for RTN itself)."""
    method = run.method
    if method.needs_stats and stats is None:
        method = RoundToNearest()
    evaluation = calibration.evaluation(layer, stats)
    if evaluation is None and method.name != "rtn":
        evaluation = weight_evaluation()  # learned rounding without real statistics: judged on the weight error
    return method, evaluation, evaluation if method.name != "rtn" else None


def quantize_layer(decision, tensor: torch.Tensor, writer, run: LayerRun, calibration: LayerCalibration,
                   allow_nonfinite: bool, input_scale: torch.Tensor | None = None):
    """Quantize and write one layer (`decision`: its `select.plan.Decision`). Returns (marker conf, stats), or
    (None, why) if it was written unquantized instead."""
    bad = count_nonfinite(tensor)
    if bad:
        if not allow_nonfinite:
            raise QuantError(f"{run.path}: layer {decision.layer} has {bad} NaN/Inf values; fix the checkpoint or "
                             "pass --allow-nonfinite to keep such layers in high precision")
        writer.add(decision.key, tensor)
        return None, f"{bad} NaN/Inf values (--allow-nonfinite: kept in high precision)"
    stats, source_note = calibration.stats(decision.layer, tensor.shape[1])
    method, evaluation, guard = layer_method(run, calibration, decision.layer, stats)
    if method is not run.method:
        source_note = f"{source_note}: round-to-nearest"
    packed, weight, rebuilt, outcome = run.compute(decision, tensor, stats, method, guard)
    for suffix, value in packed.items():
        writer.add(f"{decision.layer}.{suffix}", value)
    if input_scale is not None:
        writer.add(f"{decision.layer}.input_scale", input_scale)
    fmt: Format = decision.format
    conf = dict(fmt.marker(), orig_dtype=str(tensor.dtype).removeprefix("torch."))
    if decision.full_precision_matrix_mult:
        conf["full_precision_matrix_mult"] = True
    writer.add(f"{decision.layer}.{MARKER_SUFFIX}", marker_tensor(conf))
    extra = calibration.after_layer(decision.layer, run.method.name, weight, rebuilt, evaluation, outcome)
    extra["calibration"] = "; ".join(filter(None, (source_note, extra.get("calibration"))))
    divisor = run.input_divisor(decision.layer) if run.input_divisor is not None else None
    extra.update(runtime_fields(decision.layer, conf, input_scale, stats, weight, rebuilt,
                                calibration.bias_shifts.get(decision.layer), run.runtime_gpu, divisor,
                                run.text_encoder))
    return conf, replace(layer_stats(decision.layer, fmt, weight, rebuilt, decision.reason), **extra)
