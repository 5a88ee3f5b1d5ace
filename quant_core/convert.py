"""The conversion pipeline: read (streaming) → select → quantize → write (streaming, atomic) → verify / report."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from . import __version__
from .calib.layer import LayerCalibration
from .calib.source import build_source
from .errors import QuantError
from .formats import Format
from .io.reader import SafetensorsReader
from .io.writer import StreamingWriter, header_reserve
from .methods import get_method
from .options import STREAMING_THRESHOLDS, QuantOptions
from .report import LayerStats, QualityReport, layer_stats
from .select.plan import KEEP, QUANTIZE, REMOVE, Decision, Plan, build_plan, require_work

QUANT_METADATA_KEY = "_quantization_metadata"
FP16_MAX = 65504.0
AUTO_WORKING_COPIES = 16  # --streaming-mode auto: a layer may take ~16 fp32 copies of its weight on the GPU


@dataclass
class ConvertResult:
    output: str
    plan: Plan
    report: QualityReport
    seconds: float
    input_bytes: int
    output_bytes: int
    notes: list[str] = field(default_factory=list)  # what happened while streaming (data-dependent keeps, cleanup)
    verify: object = None
    lora: object = None  # MergeReport when LoRAs were merged
    peak_gpu_bytes: int | None = None  # torch's peak allocation on the CUDA device, None when it ran on the CPU


def default_output_name(input_path: str, options: QuantOptions) -> str:
    """`<stem>_<method>_<format label>.safetensors` next to the input, like the seed ("simple" = RTN)."""
    stem = os.path.splitext(input_path)[0]
    if options.format == "fp16":
        return f"{stem}_fp16.safetensors"
    method = "simple" if options.method == "rtn" else options.method
    return f"{stem}_{method}_{options.main_format().label}.safetensors"


def pick_device(options: QuantOptions) -> torch.device:
    if options.low_memory or options.device == "cpu":
        return torch.device("cpu")
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantError(f"--device {options.device}: CUDA is not available on this machine")
    try:
        return torch.device(options.device)
    except RuntimeError:
        raise QuantError(f"--device: unknown device {options.device!r} (auto, cpu, cuda, cuda:N)") from None


def convert(input_path: str, output_path: str | None, options: QuantOptions,
            on_layer: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert one safetensors file. Raises QuantError for bad input; leaves no output file on any failure.

    `on_layer(done, total)` is called after each layer is written (done counts layers, 1…total) and once with
    (0, total) before the first; it may raise to stop the conversion (ComfyUI's interrupt), which leaves no file."""
    options.validate()
    start = time.perf_counter()
    device = pick_device(options)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with SafetensorsReader(input_path, low_memory=True) as reader:
        _refuse_quantized_input(reader, input_path)
        plan = build_plan(reader.infos(), options)
        require_work(plan, input_path, fp16=options.format == "fp16")
        _refuse_name_collisions(reader, plan, input_path)
        output_path = output_path or default_output_name(input_path, options)
        _check_output_path(input_path, output_path)
        merger = _lora_merger(reader, plan, options)
        calibration = _calibration(reader, plan, options)
        extras = _calibration_extras(reader, plan, options, merger)
        try:
            result = _stream(reader, plan, output_path, options, device, merger, calibration, extras, on_layer)
        finally:
            calibration.close()
    result.seconds = time.perf_counter() - start
    result.input_bytes = os.path.getsize(input_path)
    result.output_bytes = os.path.getsize(result.output)
    if on_cuda:
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    if options.report_path:
        result.report.write_json(options.report_path, {"output": result.output, "method": options.method,
                                                       "seconds": result.seconds, "device": str(device),
                                                       "peak_gpu_bytes": result.peak_gpu_bytes,
                                                       "notes": result.notes, "kept": {
                                                           d.key: d.reason for d in plan.of(KEEP) if d.reason}})
    return result


def _lora_merger(reader: SafetensorsReader, plan: Plan, options: QuantOptions):
    """Validate and plan the LoRA merges (before anything is written), or None."""
    loras = options.lora_files()
    if not loras:
        return None
    from .lora.merge import LoraMerger
    shapes = {info.name: info.shape for info in reader.infos()}
    removed = {d.key for d in plan.of(REMOVE)}
    return LoraMerger(loras, shapes, removed, options.lora_mapping, options.lora_max_unmatched)


def _calibration(reader: SafetensorsReader, plan: Plan, options: QuantOptions) -> LayerCalibration:
    """The calibration source (validated before anything is written) and the per-layer bias bookkeeping."""
    source = None
    if options.uses_calibration():
        source = build_source(options, {info.name: info.shape for info in reader.infos()})
    biased = {d.layer for d in plan.of(QUANTIZE) if f"{d.layer}.bias" in plan.decisions}
    # SmoothQuant divides the inputs by s: the file's E[x] no longer describes them, so no bias correction then
    return LayerCalibration(source, options.bias_correction and not options.smoothquant, biased)


def _biases_after_weights(keys: list[str], calibration: LayerCalibration) -> list[str]:
    """Stream order with each corrected layer's bias right after its weight (its correction is known then)."""
    moved = {f"{layer}.bias" for layer in calibration.biased_layers} & set(keys)
    if not moved or calibration.source is None or not calibration.source.real or not calibration.bias_correction:
        return keys
    ordered = []
    for key in keys:
        if key in moved:
            continue
        ordered.append(key)
        bias = f"{key[: -len('.weight')]}.bias" if key.endswith(".weight") else None
        if bias in moved:
            ordered.append(bias)
    return ordered


@dataclass
class CalibrationExtras:
    """What the calibration file adds: SmoothQuant rewrites, static input scales, and notes about both."""

    smoothing: object = None  # transform.smoothquant.SmoothingPlan
    input_scales: dict = field(default_factory=dict)  # layer -> fp32 scalar
    notes: list = field(default_factory=list)


def _calibration_extras(reader: SafetensorsReader, plan: Plan, options: QuantOptions, merger) -> CalibrationExtras:
    extras = CalibrationExtras()
    if options.static_activations and options.calibration_data is None:
        extras.notes.append("WARNING: --static-activations without --calibration-data: no input_scale written, "
                            "activations are scaled dynamically")
    if options.calibration_data is None or not (options.smoothquant or options.static_activations):
        return extras
    from .transform._calibration import read_calibration
    stats = read_calibration(options.calibration_data)
    layers = [d.layer for d in plan.of(QUANTIZE)]
    if options.smoothquant:
        from .transform.smoothquant import build_smoothing
        extras.smoothing = build_smoothing(reader, layers, stats, options.smoothquant_alpha,
                                           merger.apply if merger is not None else None)
        extras.notes += extras.smoothing.notes
    if options.static_activations:
        _static_scales(plan, stats, extras)
    return extras


def _static_scales(plan: Plan, stats, extras: CalibrationExtras) -> None:
    from .transform.activations import static_input_scale
    dynamic: dict[str, list[str]] = {}
    for d in plan.of(QUANTIZE):
        divisor = extras.smoothing.input_divisor(d.layer) if extras.smoothing is not None else None
        scale, why = static_input_scale(d.layer, d.format.name, stats, divisor)
        if scale is None:
            dynamic.setdefault(why, []).append(d.layer)
        else:
            extras.input_scales[d.layer] = scale
    extras.notes.append(f"static activations: input_scale written for {len(extras.input_scales)} layers")
    for why, layers in dynamic.items():
        extras.notes.append(f"static activations: {len(layers)} layers stay dynamic ({why}): {', '.join(layers)}")


def _transform_chain(merger, extras: CalibrationExtras):
    """(key, tensor) -> tensor: LoRA merge, then SmoothQuant; None if neither applies."""
    steps = [f for f in (merger.apply if merger is not None else None,
                         extras.smoothing.apply if extras.smoothing is not None else None) if f is not None]
    if not steps:
        return None

    def apply(key, tensor):
        for step in steps:
            tensor = step(key, tensor)
        return tensor
    return apply


def streaming_threshold(options: QuantOptions, device: torch.device) -> float:
    """Weight elements above which a layer is quantized on the CPU although the device is CUDA."""
    if options.no_memory_limits or device.type != "cuda":
        return math.inf
    if options.stream_hadamard_threshold is not None:
        return options.stream_hadamard_threshold
    if options.streaming_mode != "auto":
        return STREAMING_THRESHOLDS[options.streaming_mode]
    free, _ = torch.cuda.mem_get_info(device)
    return free / (4 * AUTO_WORKING_COPIES)


def compute_dtype(numel: int, device: torch.device, options: QuantOptions) -> torch.dtype:
    """--bf16-compute: the dtype of a method's matrix products for a layer of `numel` elements."""
    if options.bf16_compute == "off":
        return torch.float32
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if options.bf16_compute == "on":
        return torch.bfloat16 if bf16_ok else torch.float32
    return torch.bfloat16 if device.type == "cuda" and bf16_ok and numel >= options.bf16_threshold else torch.float32


def _refuse_quantized_input(reader: SafetensorsReader, path: str) -> None:
    if any(key.endswith(".comfy_quant") for key in reader.keys()):
        raise QuantError(f"{path}: this file is already quantized (it has .comfy_quant markers); use the original weights")
    if QUANT_METADATA_KEY in reader.metadata():
        raise QuantError(f"{path}: this file is already quantized (its header has {QUANT_METADATA_KEY}); "
                         "use the original weights")


def _refuse_name_collisions(reader: SafetensorsReader, plan: Plan, path: str) -> None:
    """A float weight that already has scale tensors beside it (a partly quantized export) would be written twice."""
    keys = set(reader.keys())
    for d in plan.of(QUANTIZE):
        for suffix, _, _ in d.format.layout(reader.info(d.key).shape):
            name = f"{d.layer}.{suffix}"
            if name != d.key and name in keys:
                raise QuantError(f"{path}: {name} already exists beside the floating-point weight {d.key} (a partly "
                                 "quantized export?); use the original weights or --exclude-layers for that layer")


def _check_output_path(input_path: str, output_path: str) -> None:
    if os.path.abspath(output_path) == os.path.abspath(input_path) or (
            os.path.exists(output_path) and os.path.samefile(output_path, input_path)):
        raise QuantError(f"{output_path}: output path equals the input; choose another -o")
    if os.path.isdir(output_path):
        raise QuantError(f"{output_path}: is a directory; give a file name for the output")
    directory = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(directory):
        raise QuantError(f"{output_path}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise QuantError(f"{output_path}: output directory {directory} is not writable")


def _planned_entries(reader: SafetensorsReader, plan: Plan, input_scales: dict):
    """(name, dtype tag, shape) of every tensor the output will hold, for the header reservation."""
    for d in plan.decisions.values():
        info = reader.info(d.key)
        if d.action == REMOVE:
            continue
        if d.action == KEEP:
            yield d.key, info.dtype, info.shape
            continue
        for suffix, tag, shape in d.format.layout(info.shape):
            yield f"{d.layer}.{suffix}", tag, shape
        yield f"{d.layer}.comfy_quant", "U8", (256,)
        if d.layer in input_scales:
            yield f"{d.layer}.input_scale", "F32", ()


def _stream(reader: SafetensorsReader, plan: Plan, output_path: str, options: QuantOptions, device: torch.device,
            merger=None, calibration: LayerCalibration | None = None, extras: CalibrationExtras | None = None,
            on_layer=None) -> ConvertResult:
    extras = extras or CalibrationExtras()
    calibration = calibration or LayerCalibration(None, False, set())
    method = get_method(options.method, options.method_config())
    transform = _transform_chain(merger, extras)
    metadata = reader.metadata()
    layers_conf: dict[str, dict] = {}
    stats: list[LayerStats] = []
    notes: list[str] = list(extras.notes)
    if options.method == "learned":
        from .methods.learned import VERDICT
        notes.append(f"note: {VERDICT}")
    reserve = header_reserve(list(_planned_entries(reader, plan, extras.input_scales)),
                             {**metadata, QUANT_METADATA_KEY: json.dumps({"layers": {d.layer: {"format": "x" * 64}
                                                                          for d in plan.of(QUANTIZE)}})})
    keys = _biases_after_weights([k for k, d in plan.decisions.items() if d.action != REMOVE], calibration)
    ahead = 0 if options.low_memory else options.prefetch_bytes  # read-ahead and write-behind budget, bytes
    layer_run = LayerRun(method, device, options, reader.path, streaming_threshold(options, device), notes)
    with StreamingWriter(output_path, reserve, overwrite=options.overwrite, background_bytes=ahead) as writer:
        notes += [f"removed {path}, left by an interrupted run" for path in writer.stale_removed]
        last_of_layer = {k.rpartition(".")[0]: k for k in keys}  # a layer ticks when its last tensor is done
        ticks = set(last_of_layer.values())
        bar = tqdm(total=len(ticks), desc=os.path.basename(reader.path), unit="layer", disable=not options.progress,
                   dynamic_ncols=True)
        done = 0
        if on_layer is not None:
            on_layer(0, len(ticks))
        for key, tensor in _tensors(reader, keys, plan, layer_run, ahead):
            decision = plan.decisions[key]
            if transform is not None:
                tensor = transform(key, tensor)
            if decision.action == QUANTIZE:
                conf, layer_stat = _quantize_layer(decision, tensor, writer, layer_run, calibration,
                                                   extras.input_scales.get(decision.layer))
                if conf is None:
                    notes.append(f"kept {decision.layer}: {layer_stat}")
                else:
                    layers_conf[decision.layer] = conf
                    stats.append(layer_stat)
            else:
                _write_kept(key, calibration.corrected_bias(key, tensor), writer, options, notes)
            del tensor
            if key in ticks:
                bar.update(1)
                done += 1
                if on_layer is not None:
                    on_layer(done, len(ticks))
        bar.close()
        writer.finish(_output_metadata(metadata, layers_conf, options))
        verification = _verify_temp(writer.temp, reader.path, options, transform)
        writer.publish()
    report = QualityReport(stats, options.quality_threshold)
    return ConvertResult(output_path, plan, report, 0.0, 0, 0, notes, verification,
                         merger.report if merger is not None else None)


def _tensors(reader: SafetensorsReader, keys: list[str], plan: Plan, run: "LayerRun", ahead: int):
    """The tensors in stream order. On CUDA (with read-ahead), the weights quantized there arrive as device tensors
    through pinned buffers, copied while the previous layer computes; everything else is read into host memory."""
    if run.device.type != "cuda" or ahead <= 0 or not torch.cuda.is_available():
        return reader.iter_tensors(keys, prefetch_bytes=ahead)
    from .io.device_feed import DeviceFeed
    on_device = {d.key for d in plan.of(QUANTIZE) if run.device_for(reader.info(d.key).numel).type == "cuda"}
    return DeviceFeed(reader, run.device, ahead_bytes=ahead).iter_tensors(keys, on_device)


@dataclass
class LayerRun:
    """How each layer is computed: method, device (with the streaming threshold), bf16, OOM fallback."""

    method: object
    device: torch.device
    options: QuantOptions
    path: str
    cpu_above: float  # weight elements above which the layer runs on the CPU
    notes: list

    def device_for(self, numel: int) -> torch.device:
        return torch.device("cpu") if numel > self.cpu_above else self.device

    def compute(self, decision: Decision, tensor: torch.Tensor, stats=None):
        """(tensors to write, fp32 weight, fp32 reconstruction) on the layer's device; an out-of-memory error on
        CUDA retries the layer on the CPU (unless --no-memory-limits) and says so."""
        device = self.device_for(tensor.numel())
        try:
            return self._compute_on(device, decision, tensor, stats)
        except torch.cuda.OutOfMemoryError:
            if device.type == "cpu":
                raise
            if self.options.no_memory_limits:
                raise QuantError(f"{self.path}: layer {decision.layer}: CUDA out of memory (--no-memory-limits: "
                                 "no CPU retry); drop --no-memory-limits or use --streaming-mode aggressive") from None
            torch.cuda.empty_cache()
            self.notes.append(f"{decision.layer}: CUDA out of memory; quantized on the CPU instead")
            return self._compute_on(torch.device("cpu"), decision, tensor, stats)

    def _compute_on(self, device: torch.device, decision: Decision, tensor: torch.Tensor, stats):
        weight = tensor.to(device=device, dtype=torch.float32, non_blocking=True)
        fmt: Format = decision.format
        if hasattr(self.method, "compute_dtype"):
            self.method.compute_dtype = compute_dtype(tensor.numel(), device, self.options)
        grid = fmt.grid(weight)
        codes = self.method.codes(fmt, grid, decision.layer, stats)
        packed = fmt.pack(codes, grid)
        return packed, weight, fmt.reconstruct(codes, grid)


def _quantize_layer(decision: Decision, tensor: torch.Tensor, writer: StreamingWriter, run: LayerRun,
                    calibration: LayerCalibration, input_scale: torch.Tensor | None = None):
    """Quantize and write one layer. Returns (marker conf, stats), or (None, why) if it was kept instead."""
    options = run.options
    # One cheap pass: NaN and Inf propagate into the sum (which can also overflow on huge finite values: recount).
    bad = 0 if math.isfinite(float(tensor.sum(dtype=torch.float32))) else int((~torch.isfinite(tensor)).sum())
    if bad:
        if not options.allow_nonfinite:
            raise QuantError(f"{run.path}: layer {decision.layer} has {bad} NaN/Inf values; fix the checkpoint or "
                             "pass --allow-nonfinite to keep such layers in high precision")
        writer.add(decision.key, tensor)
        decision.action, decision.reason = KEEP, f"{bad} NaN/Inf values (--allow-nonfinite: kept in high precision)"
        return None, decision.reason
    stats, source_note = calibration.stats(decision.layer, tensor.shape[1])
    if stats is None and run.method.needs_stats:
        source_note = f"{source_note}: round-to-nearest"
    packed, weight, rebuilt = run.compute(decision, tensor, stats)
    for suffix, value in packed.items():
        writer.add(f"{decision.layer}.{suffix}", value)
    if input_scale is not None:
        writer.add(f"{decision.layer}.input_scale", input_scale)
    fmt: Format = decision.format
    conf = dict(fmt.marker(), orig_dtype=str(tensor.dtype).removeprefix("torch."))
    if decision.full_precision_matrix_mult:
        conf["full_precision_matrix_mult"] = True
    writer.add(f"{decision.layer}.comfy_quant", marker_tensor(conf))
    extra = calibration.after_layer(decision.layer, fmt, weight, rebuilt, stats)
    extra["calibration"] = "; ".join(filter(None, (source_note, extra.get("calibration"))))
    return conf, replace(layer_stats(decision.layer, fmt, weight, rebuilt, decision.reason), **extra)


def marker_tensor(conf: dict) -> torch.Tensor:
    """The `.comfy_quant` marker: a 1-D uint8 tensor holding the UTF-8 bytes of the JSON object."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _write_kept(key: str, tensor: torch.Tensor, writer: StreamingWriter, options: QuantOptions, notes: list[str]):
    if options.format == "fp16" and tensor.dtype in (torch.float32, torch.bfloat16, torch.float64):
        if tensor.numel() and float(tensor.abs().max()) > FP16_MAX:
            notes.append(f"kept {key} in {str(tensor.dtype).removeprefix('torch.')}: values beyond the FP16 range")
        else:
            tensor = tensor.to(torch.float16)
    writer.add(key, tensor)


def _output_metadata(metadata: dict, layers_conf: dict, options: QuantOptions) -> dict:
    out = dict(metadata)
    if layers_conf:
        out[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers_conf})
    out["quant_core"] = json.dumps({"version": __version__, "format": options.format, "method": options.method,
                                    **({"calibration": _calibration_label(options)} if options.uses_calibration() else {})})
    return out


def _calibration_label(options: QuantOptions) -> str:
    if options.calibration_data:
        return f"file {os.path.basename(options.calibration_data)}"
    if options.calibration_lora:
        return f"LoRA {os.path.basename(options.calibration_lora)}"
    return "synthetic N(0, I)"


def _verify_temp(temp_path: str, source_path: str, options: QuantOptions, transform=None):
    if options.verify == "off":
        return None
    from .verify import verify_file
    # Legacy format names only come from an explicit request (scaling mode or layer config): mark, don't fail.
    # With LoRAs / SmoothQuant, the reference is the source with the same rewrites applied.
    result = verify_file(temp_path, reference=source_path if options.verify == "full" else None, allow_legacy=True,
                         reference_transform=transform)
    if not result.ok:
        raise QuantError(f"verify failed on the converted file (nothing written): {result.defects[0]}")
    return result

