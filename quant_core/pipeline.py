"""The conversion, stage by stage: read (streaming) → select → transform (LoRA, SmoothQuant) → quantize → write
(streaming, atomic) → verify → report.

Everything that can be refused is decided from the header and the settings before the first byte is written;
a failure or an interrupt after that leaves nothing under the output name.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .calib.source import build_source
from .errors import QuantError
from .io.reader import SafetensorsReader
from .io.source import ComputedSource, open_source
from .io.writer import StreamingWriter, check_target, header_reserve, write_file_atomic
from .job import Job
from .quantization.bias import LayerCalibration
from .quantization.formats.markers import MARKER, MARKER_SUFFIX, QUANT_METADATA_KEY, header_metadata
from .quantization.layer import LayerRun, pick_device, quantize_layer, streaming_threshold
from .quantization.methods import METHODS, make_method
from .quantization.runtime import TEXT_ENCODER_PRESETS
from .report import LayerStats, QualityReport
from .select.plan import KEEP, QUANTIZE, REMOVE, Plan, build_plan, require_work
from .version import __version__

FP16_MAX = 65504.0


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


def default_output_name(input_path: str, job: Job) -> str:
    """`<stem>_<method>_<format label>.safetensors` next to the input ("simple" = round-to-nearest)."""
    stem = os.path.splitext(input_path)[0]
    if job.auto.active:
        return f"{stem}_{'simple' if job.method == 'rtn' else job.method}_auto_{job.auto.target_gpu}.safetensors"
    if job.quantize.format == "fp16":
        return f"{stem}_fp16.safetensors"
    method = "simple" if job.method == "rtn" else job.method
    return f"{stem}_{method}_{job.main_format().label}.safetensors"


def convert(source, output_path: str | None, job: Job,
            on_layer: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Convert one safetensors file (`source` a path) or a computed model (`source` an `io.source.ComputedSource`,
    e.g. ComfyUI's patched MODEL; then `output_path` is required). Raises QuantError for bad input; leaves no output
    file on any failure.

    `on_layer(done, total)` is called after each layer is written (done counts layers, 1…total) and once with
    (0, total) before the first; it may raise to stop the conversion (ComfyUI's interrupt), which leaves no file.
    With --auto-bits/--auto-size-gb it is first called after each layer of the measuring pass (total: the layers
    measured)."""
    start = time.perf_counter()
    device = pick_device(job.device)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if output_path is None and not isinstance(source, str):
        raise QuantError(f"{getattr(source, 'path', source)}: name the output file (-o)")
    with open_source(source) as reader:
        input_path = reader.path
        _refuse_quantized_input(reader, input_path)
        plan = build_plan(reader.infos(), job)
        require_work(plan, input_path, fp16=job.quantize.format == "fp16")
        _refuse_name_collisions(reader, plan, input_path)
        output_path = output_path or default_output_name(input_path, job)
        _check_output_path(reader, output_path, job)
        merger = _lora_merger(reader, plan, job)
        calibration = _calibration(reader, plan, job)
        extras = _calibration_extras(reader, plan, job, merger)
        try:
            auto = _auto_choice(reader, plan, job, calibration, merger, extras, on_layer)
            result = _stream(reader, plan, output_path, job, device, merger, calibration, extras, on_layer)
        finally:
            calibration.close()
        result.input_bytes = reader.source_bytes
    result.seconds = time.perf_counter() - start
    result.output_bytes = os.path.getsize(result.output)
    if auto is not None:
        auto.attach(result.report, result.output_bytes)
    if on_cuda:
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    if job.output.report_path:
        _write_report(result, job, {
            "output": result.output, "method": job.method, "seconds": result.seconds, "device": str(device),
            "peak_gpu_bytes": result.peak_gpu_bytes, "notes": result.notes,
            "kept": {d.key: d.reason for d in plan.of(KEEP) if d.reason}})
    return result


def _auto_choice(reader: SafetensorsReader, plan: Plan, job: Job, calibration: LayerCalibration, merger,
                 extras: "CalibrationExtras", on_layer=None):
    """--auto-bits / --auto-size-gb: every selected layer's format chosen from measurements and written into the plan
    (select/auto.py); None otherwise."""
    if not job.auto.active:
        return None
    from .select.auto import choose_formats
    return choose_formats(reader, plan, job, calibration, _transform_chain(merger, extras), extras.notes, on_layer)


def _write_report(result: ConvertResult, job: Job, extra: dict) -> None:
    """The JSON report, written like the output (atomic; its place was checked before the conversion started)."""
    data = json.dumps(result.report.to_json(extra), indent=2).encode()
    try:
        write_file_atomic(job.output.report_path, data, overwrite=job.output.overwrite)
    except QuantError as e:
        raise QuantError(f"{e} (the converted file {result.output} is complete)") from None


def _lora_merger(reader: SafetensorsReader, plan: Plan, job: Job):
    """Validate and plan the LoRA merges (before anything is written), or None."""
    if not job.lora.loras:
        return None
    from .transform.lora.merge import LoraMerger
    shapes = {info.name: info.shape for info in reader.infos()}
    removed = {d.key for d in plan.of(REMOVE)}
    return LoraMerger(list(job.lora.loras), shapes, removed, job.lora.lora_mapping, job.lora.lora_max_unmatched)


def _calibration(reader: SafetensorsReader, plan: Plan, job: Job) -> LayerCalibration:
    """The calibration source (validated before anything is written) and the per-layer bias bookkeeping."""
    source = None
    if job.uses_statistics():
        source = build_source(job.calibration)
        source.bind(_layer_widths(reader), {d.layer for d in plan.of(QUANTIZE)})
    biased = {d.layer for d in plan.of(QUANTIZE) if f"{d.layer}.bias" in plan.decisions}
    # SmoothQuant divides the inputs by s: the file's E[x] no longer describes them, so no bias correction then
    return LayerCalibration(source, job.calibration.bias_correction and not job.smoothquant.smoothquant, biased)


def _layer_widths(reader: SafetensorsReader) -> dict[str, int]:
    """Input width K of every 2-D weight of the model, quantized or not (what a calibration file's layers are
    matched against: a capture records every Linear layer)."""
    return {i.name[: -len(".weight")]: i.shape[1] for i in reader.infos()
            if i.name.endswith(".weight") and len(i.shape) == 2}


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


def _calibration_extras(reader: SafetensorsReader, plan: Plan, job: Job, merger) -> CalibrationExtras:
    extras = CalibrationExtras()
    path = job.calibration.calibration_data
    if path is None or not (job.smoothquant.smoothquant or job.calibration.static_activations):
        return extras
    from .calib.ranges import read_calibration
    stats = read_calibration(path, _layer_widths(reader), {d.layer for d in plan.of(QUANTIZE)})
    layers = [d.layer for d in plan.of(QUANTIZE)]
    if job.smoothquant.smoothquant:
        from .transform.smoothquant import build_smoothing
        extras.smoothing = build_smoothing(reader, layers, stats, job.smoothquant.smoothquant_alpha,
                                           merger.apply if merger is not None else None)
        extras.notes += extras.smoothing.notes
    if job.calibration.static_activations:
        _static_scales(plan, stats, extras)
    return extras


def _static_scales(plan: Plan, stats, extras: CalibrationExtras) -> None:
    from .quantization.input_scales import static_input_scale
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


def _refuse_quantized_input(reader: SafetensorsReader, path: str) -> None:
    if any(key.endswith(MARKER) for key in reader.keys()):
        raise QuantError(f"{path}: this file is already quantized (it has {MARKER} markers); use the original weights")
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


def _user_files(reader, job: Job) -> list[tuple[str, str]]:
    """(role, path) of every file the run reads: none of them may be replaced by the output or the report."""
    files = list(reader.files) + [("calibration file", job.calibration.calibration_data)]
    files += [("LoRA", path) for path, _ in job.lora.loras]
    for role, value in (("layer config", job.select.layer_config), ("LoRA mapping", job.lora.lora_mapping)):
        if isinstance(value, str):
            files.append((role, value))
    return [(role, path) for role, path in files if path]


def _check_output_path(reader, output_path: str, job: Job) -> None:
    """The output and the report go where the rules allow (io.writer.check_target), decided before any work."""
    inputs = _user_files(reader, job)
    check_target(output_path, inputs, job.output.overwrite, what="output", flag="-o")
    if job.output.report_path:
        check_target(job.output.report_path, inputs + [("output", output_path)], job.output.overwrite,
                     what="report", flag="--report")


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
        yield f"{d.layer}.{MARKER_SUFFIX}", "U8", (256,)
        if d.layer in input_scales:
            yield f"{d.layer}.input_scale", "F32", ()


@dataclass
class _Run:
    """The state of one streaming pass: what it writes with, and what it has produced so far."""

    plan: Plan
    job: Job
    writer: StreamingWriter
    layer_run: LayerRun
    calibration: LayerCalibration
    extras: CalibrationExtras
    transform: Callable | None
    notes: list
    layers_conf: dict = field(default_factory=dict)
    stats: list = field(default_factory=list)
    layers_total: int = 0  # progress units of the stream (layers), for the callback
    cast_fp16: bool = True  # --format fp16 casts kept floats (not for a computed source: it gives the final dtypes)

    def handle(self, key: str, tensor: torch.Tensor) -> None:
        """Transform, then quantize (a selected weight) or write as kept (anything else), one tensor."""
        decision = self.plan.decisions[key]
        if self.transform is not None:
            tensor = self.transform(key, tensor)
        if decision.action != QUANTIZE:
            _write_kept(key, self.calibration.corrected_bias(key, tensor), self.writer, self.job, self.notes,
                        self.cast_fp16)
            return
        conf, layer_stat = quantize_layer(decision, tensor, self.writer, self.layer_run, self.calibration,
                                          self.job.quantize.allow_nonfinite,
                                          self.extras.input_scales.get(decision.layer))
        if conf is None:
            decision.action, decision.reason = KEEP, layer_stat
            self.notes.append(f"kept {decision.layer}: {layer_stat}")
        else:
            self.layers_conf[decision.layer] = conf
            self.stats.append(layer_stat)


def _stream(reader: SafetensorsReader, plan: Plan, output_path: str, job: Job, device: torch.device,
            merger=None, calibration: LayerCalibration | None = None, extras: CalibrationExtras | None = None,
            on_layer=None) -> ConvertResult:
    extras = extras or CalibrationExtras()
    calibration = calibration or LayerCalibration(None, False, set())
    notes: list[str] = list(extras.notes)
    metadata = reader.metadata()
    reserve = header_reserve(list(_planned_entries(reader, plan, extras.input_scales)),
                             {**metadata, QUANT_METADATA_KEY: json.dumps({"layers": {d.layer: {"format": "x" * 64}
                                                                          for d in plan.of(QUANTIZE)}})})
    keys = _biases_after_weights([k for k, d in plan.decisions.items() if d.action != REMOVE], calibration)
    ahead = 0 if job.device.low_memory else job.device.prefetch_bytes  # read-ahead and write-behind, bytes
    layer_run = LayerRun(make_method(job.method, job.method_config), device, job.device.no_memory_limits,
                         reader.path, streaming_threshold(job.device, device), notes, job.output.runtime_gpu,
                         extras.smoothing.input_divisor if extras.smoothing is not None else None,
                         any(p in TEXT_ENCODER_PRESETS for p in job.select.presets))
    transform = _transform_chain(merger, extras)
    with StreamingWriter(output_path, reserve, overwrite=job.output.overwrite, background_bytes=ahead) as writer:
        notes += [f"removed {path}, left by an interrupted run" for path in writer.stale_removed]
        run = _Run(plan, job, writer, layer_run, calibration, extras, transform, notes,
                   cast_fp16=not getattr(reader, "final_dtypes", False))
        _stream_tensors(reader, keys, run, ahead, on_layer)
        notes += filter(None, [calibration.skipped_note(), _no_statistics_note(job, calibration, len(run.stats))])
        writer.finish(_output_metadata(metadata, run.layers_conf, job, run.cast_fp16))
        still_wanted = (lambda: on_layer(run.layers_total, run.layers_total)) if on_layer is not None else None
        reference = reader if isinstance(reader, ComputedSource) else reader.path
        verification = _verify_temp(writer.temp, reference, job, transform, still_wanted)
        if still_wanted is not None:
            still_wanted()  # a cancel during the final checks still leaves no file
        writer.publish()
    report = QualityReport(run.stats, job.output.quality_threshold, job.method)
    return ConvertResult(output_path, plan, report, 0.0, 0, 0, notes, verification,
                         merger.report if merger is not None else None)


def _no_statistics_note(job: Job, calibration: LayerCalibration, layers: int) -> str | None:
    """The one line a run of GPTQ/QuIP without real statistics prints: every layer is round-to-nearest, and why."""
    if not layers or not METHODS[job.method].method_class.needs_stats or calibration.real:
        return None
    return (f"{job.method}: no recorded input statistics ({calibration.unreal_label()}); measured on held-out inputs, "
            f"methods fitted to such statistics are worse than round-to-nearest, so all {layers} layers are "
            "round-to-nearest. Record statistics with `python -m quant_core calibrate --hf-model` or the ComfyUI "
            "capture nodes and pass --calibration-data.")


def _stream_tensors(reader: SafetensorsReader, keys: list[str], run: _Run, ahead: int, on_layer) -> None:
    """Every tensor through `run.handle`, with the progress bar and the per-layer callback."""
    last_of_layer = {k.rpartition(".")[0]: k for k in keys}  # a layer ticks when its last tensor is done
    ticks = set(last_of_layer.values())
    run.layers_total = len(ticks)
    bar = tqdm(total=len(ticks), desc=os.path.basename(reader.path), unit="layer", disable=not run.job.output.progress,
               dynamic_ncols=True)
    done = 0
    if on_layer is not None:
        on_layer(0, len(ticks))
    for key, tensor in _tensors(reader, keys, run.plan, run.layer_run, ahead):
        run.handle(key, tensor)
        del tensor
        if key in ticks:
            bar.update(1)
            done += 1
            if on_layer is not None:
                on_layer(done, len(ticks))
    bar.close()


def _tensors(reader: SafetensorsReader, keys: list[str], plan: Plan, run: LayerRun, ahead: int):
    """The tensors in stream order. On CUDA (with read-ahead), the weights quantized there arrive as device tensors
    through pinned buffers, copied while the previous layer computes; everything else is read into host memory."""
    if isinstance(reader, ComputedSource):  # computed where its owner computes; quantized weights come unrounded
        return reader.iter_tensors(keys, exact=frozenset(d.key for d in plan.of(QUANTIZE)))
    if run.device.type != "cuda" or ahead <= 0 or not torch.cuda.is_available():
        return reader.iter_tensors(keys, prefetch_bytes=ahead)
    from .io.device_feed import DeviceFeed
    on_device = {d.key for d in plan.of(QUANTIZE) if run.device_for(reader.info(d.key).numel).type == "cuda"}
    return DeviceFeed(reader, run.device, ahead_bytes=ahead).iter_tensors(keys, on_device)


def _write_kept(key: str, tensor: torch.Tensor, writer: StreamingWriter, job: Job, notes: list[str],
                cast_fp16: bool = True):
    if cast_fp16 and job.quantize.format == "fp16" and tensor.dtype in (torch.float32, torch.bfloat16, torch.float64):
        if tensor.numel() and float(tensor.abs().max()) > FP16_MAX:
            notes.append(f"kept {key} in {str(tensor.dtype).removeprefix('torch.')}: values beyond the FP16 range")
        else:
            tensor = tensor.to(torch.float16)
    writer.add(key, tensor)


def _output_metadata(metadata: dict, layers_conf: dict, job: Job, cast_fp16: bool = True) -> dict:
    out = dict(metadata)
    if layers_conf:
        out[QUANT_METADATA_KEY] = header_metadata(layers_conf)
    fmt = job.quantize.format if cast_fp16 or job.quantize.format != "fp16" else "unquantized"
    out["quant_core"] = json.dumps({"version": __version__, "format": fmt, "method": job.method,
                                    **({"calibration": _calibration_label(job)} if job.uses_statistics() else {})})
    return out


def _calibration_label(job: Job) -> str:
    if job.calibration.calibration_data:
        return f"file {os.path.basename(job.calibration.calibration_data)}"
    return "synthetic N(0, I)"


def _verify_temp(temp_path: str, source, job: Job, transform=None, on_layer=None):
    if job.output.verify == "off":
        return None
    from .verify import verify_file
    # Legacy format names only come from an explicit request (scaling mode or layer config): mark, don't fail.
    # With LoRAs / SmoothQuant, the reference is the source with the same rewrites applied.
    result = verify_file(temp_path, reference=source if job.output.verify == "full" else None,
                         allow_legacy=True, reference_transform=transform, on_layer=on_layer)
    if not result.ok:
        raise QuantError(f"verify failed on the converted file (nothing written): {result.defects[0]}")
    return result
