"""What a conversion should do: one config record per stage, composed into a `Job`.

Every setting is declared once (`quant_core.declare.option`) in the record of the stage that reads it; the CLI
flags, the library keywords and the node inputs come from those declarations. `Job.build(settings, given)` checks
each value, refuses a setting that has no effect with the others (a GPTQ setting without GPTQ, an alpha without
SmoothQuant …) and returns the composed job. Building a job reads no file: paths are checked by the stage that
opens them, before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .declare import Spec, check, option, specs
from .errors import QuantError
from .quantization.formats import FAMILIES, FORMAT_ALIASES, FORMAT_FAMILIES, make_format, resolve_scaling
from .quantization.formats.int4 import LINEAR_DTYPES
from .quantization.formats.int8 import is_power_of_4
from .quantization.methods import METHODS
from .quantization.runtime import AUTO_CLASS, RUNTIME_GPUS, TEXT_ENCODER_PRESETS
from .select.layer_config import load_layer_config
from .select.auto import TARGET_GPUS, TARGETS, target_help
from .select.presets import PRESETS
from .select.rules import compile_regex

VERIFY_LEVELS = ("off", "cheap", "full")
STREAMING_MODES = ("off", "minimal", "balanced", "aggressive", "auto")


def _resolved_scaling(settings: dict) -> str | None:
    if settings["format"] not in FAMILIES:
        return None
    try:
        return resolve_scaling(settings["format"], settings["scaling_mode"])
    except ValueError:
        return None


def _block_scaling(settings: dict) -> str | None:
    if _resolved_scaling(settings) == "block" and settings["format"] in ("int8", "fp8") or settings["layer_config"]:
        return None
    return "applies to --scaling_mode block (int8, fp8) or to rules of --layer-config"


def _auto(settings: dict) -> bool:
    return settings.get("auto_bits") is not None or settings.get("auto_size_gb") is not None


def _auto_formats(settings: dict) -> tuple:
    return TARGETS[settings.get("target_gpu", "any")].formats if _auto(settings) else ()


def _rotation(settings: dict) -> str | None:
    if settings["convrot"] or settings.get("quip_store_transformed") or settings["layer_config"] or \
            settings["format"] == "int4" or {"int8_convrot", "int4"} & set(_auto_formats(settings)):
        return None
    return ("applies with --convrot, --quip-store-transformed, --format int4, rules of --layer-config or an "
            "--auto-bits/--auto-size-gb target with rotated formats")


def _int8_rotation(settings: dict) -> str | None:
    if settings["format"] == "int4":
        return "does not apply to --format int4, which is always rotated (--convrot-group-size sets its group)"
    return None


def _int4(settings: dict) -> str | None:
    return None if settings["format"] == "int4" or settings["layer_config"] or "int4" in _auto_formats(settings) else \
        "applies to --format int4, to int4 rules of --layer-config or to an --auto-bits/--auto-size-gb target with int4"


@dataclass
class QuantizeSettings:
    """Format and method: what each selected layer becomes."""

    format: str = option("int8", "--format", choices=FORMAT_FAMILIES, help="target format")
    scaling_mode: str | None = option(
        None, "--scaling_mode", "--scaling-mode", kind=str, choices=("tensor", "axis", "row", "block"),
        help="int8: row (default; = axis) or tensor; fp8: tensor (default). 'block' (2-D tiles) and fp8 'row' "
             "write formats upstream ComfyUI cannot load: only on explicit request, with a warning")
    block_size: int = option(128, "--block_size", "--block-size", low=1, needs=_block_scaling,
                             help="tile size of --scaling_mode block (elements)")
    convrot: bool = option(False, "--convrot", needs=_int8_rotation,
                           help="INT8 per-row with a ConvRot block-Hadamard rotation (ComfyUI rotates the "
                                "activations online)")
    convrot_group_size: int = option(256, "--convrot-group-size", "--convrot_group_size", needs=_rotation,
                                     help="ConvRot group size, a power of 4 (also int4's rotation group); layers "
                                          "whose K it does not divide fall back to plain per-row INT8")
    int4_linear_dtype: str = option("int4", "--int4-linear-dtype", choices=LINEAR_DTYPES, needs=_int4,
                                    help="int4: the activations' type in ComfyUI's GEMM (the marker's linear_dtype): "
                                         "int4 (W4A4, INT4 tensor cores) or int8 (W4A8: more accurate, INT8 speed)")
    full_precision_matrix_mult: bool = option(
        False, "--full_precision_matrix_mult", "--full-precision-matrix-mult", "-fpmm",
        help="mark layers full_precision_matrix_mult: quantized storage, matmul in the compute dtype")
    method: str = option("rtn", kind=str, choices=tuple(METHODS),
                         help="how codes are chosen (CLI: --optimizer; --simple = rtn)")
    allow_nonfinite: bool = option(False, "--allow-nonfinite",
                                   help="keep layers with NaN/Inf weights in high precision instead of failing")

    def main_format(self, rotation_group: int = 0):
        """The format module for layers no rule overrides (None for the plain FP16 cast)."""
        if self.format == "fp16":
            return None
        linear_dtype = self.int4_linear_dtype if self.format == "int4" else "int4"  # else: for int4 layer rules
        return make_format(self.format, self.scaling_mode, self.block_size, rotation_group, linear_dtype)

    def is_legacy(self) -> bool:
        if self.format == "fp16":
            return False
        return not FAMILIES[self.format][resolve_scaling(self.format, self.scaling_mode)].upstream


@dataclass
class SelectSettings:
    """Which layers are quantized."""

    presets: tuple = option((), help="model presets (CLI: --flux2, --t5xxl, …)", choices=tuple(PRESETS))
    exclude_layers: str | None = option(None, "--exclude-layers", "--exclude_layers", kind=str, metavar="REGEX",
                                        help="keep layers matching REGEX unquantized")
    layer_config: object = option(None, "--layer-config", "--layer_config", kind=object, metavar="FILE.json",
                                  help="per-layer rules (a path, or the parsed JSON object; see README)")
    heur: bool = option(False, "--heur", help="keep layers with poor shapes for quantization in high precision")
    quantize_embeddings: bool = option(False, "--quantize-embeddings", help="also quantize embedding/vocabulary "
                                                                            "tables")
    quantize_io_layers: bool = option(False, "--quantize-io-layers", help="also quantize model input/output layers")


def _file_given(settings: dict) -> str | None:
    return None if settings["calibration_data"] else "needs --calibration-data FILE"


def _not_recorded(settings: dict) -> str:
    return ("is refused: LoRA-informed directions are not recorded inputs; gptq/quip fitted to them measured worse "
            "than RTN, so they would run as RTN. Record statistics instead (`python -m quant_core calibrate "
            "--hf-model`, or the ComfyUI capture nodes) and pass --calibration-data")


@dataclass
class CalibrationSettings:
    """Calibration: the per-layer input statistics the methods, bias correction and static scales read."""

    calibration_data: str | None = option(
        None, "--calibration-data", "--calibration_data", kind=str, metavar="CALIB.safetensors",
        help="per-layer input statistics (docs/CALIBRATION.md; make one with `calibrate`)")
    calibration_lora: str | None = option(
        None, "--calibration-lora", "--calibration_lora", kind=str, metavar="LORA.safetensors", needs=_not_recorded,
        help="refused: LoRA-informed directions are not recorded inputs (GPTQ/QuIP on them measured worse than RTN)")
    bias_correction: bool = option(True, "--bias-correction", negatable=True, needs=_file_given,
                                   help="b' = b + (W - Ŵ)·E[x] for layers with a bias, from the file's means")
    static_activations: bool = option(False, "--static-activations", needs=_file_given,
                                      help="write input_scale for fp8 and nvfp4 layers (the only formats ComfyUI "
                                           "reads it for) from the calibration file")

    def uses_statistics(self, method: str) -> bool:
        """Whether a conversion reads per-layer input statistics (a method, bias correction or the report)."""
        return METHODS[method].method_class.needs_stats or bool(self.calibration_data)


def _smoothing(settings: dict) -> str | None:
    return None if settings["smoothquant"] else "applies with --smoothquant"


@dataclass
class SmoothQuantSettings:
    """SmoothQuant: move activation outliers into the weights where a preceding layer can absorb 1/s exactly."""

    smoothquant: bool = option(False, "--smoothquant", needs=_file_given,
                               help="SmoothQuant, only where it keeps the model's function exact: 1/s folded into a "
                                    "declared preceding layer; other layers are left unsmoothed and listed")
    smoothquant_alpha: float = option(0.5, "--smoothquant-alpha", low=0.0, high=1.0, needs=_smoothing,
                                      help="migration strength α: s = absmax(x)^α / absmax(w)^(1−α)")


def _loras_given(settings: dict) -> str | None:
    return None if settings["loras"] else "applies when LoRAs are merged"


@dataclass
class LoraSettings:
    """LoRAs merged into the weights before quantization."""

    loras: tuple = option((), help="(path, strength) pairs, merged in order (CLI: --merge-lora, --merge-loras)")
    lora_mapping: object = option(None, "--lora-mapping", kind=object, metavar="FILE.json", needs=_loras_given,
                                  help='LoRA module → weight key overrides: {"module": "key.weight" | {"weight": '
                                       'key, "rows": [a, b]}}')
    lora_max_unmatched: int = option(0, "--lora-max-unmatched", low=0, metavar="N", needs=_loras_given,
                                     help="allow up to N LoRA modules that match no weight")


def _may_use_cuda(settings: dict) -> str | None:
    if settings["low_memory"] or settings["device"] == "cpu":
        return "applies to a CUDA device (not with --device cpu or --low-memory)"
    return None


def _streaming_auto(settings: dict) -> str | None:
    return _may_use_cuda(settings) or (None if settings["cpu_threshold"] is None else
                                       "has no effect with --cpu-threshold, which sets the threshold itself")


@dataclass
class DeviceSettings:
    """Where layers are computed and how much is read ahead."""

    device: str = option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:N")
    low_memory: bool = option(False, "--low-memory", "--low_memory", "-lm",
                              help="no read-ahead, CPU only: RAM stays near the largest tensor plus a constant")
    streaming_mode: str = option("auto", "--streaming-mode", choices=STREAMING_MODES, needs=_streaming_auto,
                                 help="with a CUDA device, quantize layers above a size threshold on the CPU: off "
                                      "(never), minimal (100M elements), balanced (50M), aggressive (25M), auto "
                                      "(from free GPU memory)")
    cpu_threshold: int | None = option(None, "--cpu-threshold", "--stream-hadamard-threshold", kind=int, low=0,
                                       metavar="ELEMENTS", needs=_may_use_cuda,
                                       help="with a CUDA device, quantize layers of more weight elements than this "
                                            "on the CPU (overrides --streaming-mode)")
    no_memory_limits: bool = option(False, "--no-memory-limits", needs=_may_use_cuda,
                                    help="every layer on the GPU: no size threshold, and an out-of-memory error "
                                         "stops the run instead of retrying that layer on the CPU")
    prefetch_bytes: int = option(512 << 20, low=0,
                                 help="read-ahead, and writes waiting on the writer thread (bytes)",
                                 needs=lambda s: "has no effect with --low-memory" if s["low_memory"] else None)


def _runtime_varies(settings: dict) -> str | None:
    """--runtime-gpu acts only where ComfyUI computes a format differently by GPU class (docs/RUNTIME.md)."""
    fmt, scaling = settings["format"], _resolved_scaling(settings)
    if _auto(settings):
        return "has no effect with --auto-bits/--auto-size-gb: the report emulates --target-gpu's class"
    encoders = [p for p in settings["presets"] if p in TEXT_ENCODER_PRESETS]
    if encoders:
        return (f"has no effect with --{encoders[0]}: ComfyUI computes text encoders with the dequantized weights on "
                "every GPU class")
    if settings["layer_config"] or fmt in ("nvfp4", "mxfp8") or fmt in ("fp8", "fp8_e5m2") and scaling == "tensor" \
            or fmt == "int4" and settings["int4_linear_dtype"] == "int4":
        return None
    return ("applies to formats ComfyUI computes differently by GPU class (fp8, nvfp4, mxfp8, int4 with "
            f"--int4-linear-dtype int4, or rules of --layer-config); --format {fmt} is computed the same way on every "
            "class")


@dataclass
class OutputSettings:
    """The written file, its checks and the report."""

    verify: str = option("cheap", "--verify", choices=VERIFY_LEVELS,
                         help="check the written file: cheap (header, markers, scales) or full (also every layer "
                              "against the input through comfy-kitchen)")
    report_quality: bool = option(False, "--report-quality", help="print every layer's MSE and SQNR, worst first")
    quality_threshold: float | None = option(
        None, "--quality-threshold", kind=float,
        help="SQNR warning threshold (dB) for every layer (default: each format's own level, docs/RUNTIME.md)")
    runtime_gpu: str = option(
        "auto", "--runtime-gpu", choices=RUNTIME_GPUS, needs=_runtime_varies,
        help="the GPU class whose kernels the report's 'as computed' figures emulate (activations quantized as "
             "ComfyUI does there; docs/RUNTIME.md); auto: per format the most common class that runs it natively ("
             + ", ".join(f"{f} {c}" for f, c in AUTO_CLASS.items() if not f.startswith("float8_e5")) + ")")
    report_path: str | None = option(None, "--report", kind=str, metavar="FILE.json",
                                     help="write the quality report as JSON")
    overwrite: bool = option(False, "--overwrite", help="replace an existing output file")
    progress: bool = option(True, "--no-progress", inverted=True, help="no progress bar")


def _auto_given(settings: dict) -> str | None:
    return None if _auto(settings) else "applies with --auto-bits or --auto-size-gb"


@dataclass
class AutoSettings:
    """Automatic mixed precision: every layer's format chosen from measurements under a size budget (docs/AUTO.md)."""

    auto_bits: float | None = option(
        None, "--auto-bits", kind=float, low=0.5, metavar="BITS",
        help="choose each layer's format (or keep it) for the least output error as computed on --target-gpu, with "
             "at most BITS stored bits per weight on average over the selected layers (scales and markers included)")
    auto_size_gb: float | None = option(
        None, "--auto-size-gb", kind=float, low=0.0, metavar="GB",
        help="as --auto-bits, with the whole output file at most GB (10^9 bytes)")
    target_gpu: str = option("any", "--target-gpu", choices=TARGET_GPUS, needs=_auto_given,
                             help="the GPU class the file is made for: which formats --auto-bits/--auto-size-gb may "
                                  "choose, and whose computation the errors are measured as. " + target_help())

    @property
    def active(self) -> bool:
        return self.auto_bits is not None or self.auto_size_gb is not None


SECTIONS = {"quantize": QuantizeSettings, "select": SelectSettings, "calibration": CalibrationSettings,
            "smoothquant": SmoothQuantSettings, "lora": LoraSettings, "device": DeviceSettings,
            "output": OutputSettings, "auto": AutoSettings}  # Job attribute → the stage's config record
STAGES = tuple(SECTIONS.values())
METHOD_CONFIGS = tuple(dict.fromkeys(e.config_class for e in METHODS.values() if e.config_class is not None))


def _declared() -> dict[str, tuple[Spec, object]]:
    table: dict[str, tuple[Spec, object]] = {}
    for cls in STAGES + METHOD_CONFIGS:
        for name, entry in specs(cls).items():
            table.setdefault(name, entry)  # settings a method config inherits are declared once, in its base
    return table


SETTINGS = _declared()  # name → (Spec, default) of every setting


@dataclass
class Job:
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    select: SelectSettings = field(default_factory=SelectSettings)
    method_config: object = None  # the chosen method's config record (None for round-to-nearest)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    smoothquant: SmoothQuantSettings = field(default_factory=SmoothQuantSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    auto: AutoSettings = field(default_factory=AutoSettings)

    @classmethod
    def build(cls, settings: dict | None = None, given=None) -> "Job":
        """A checked job from setting values (name → value). `given` names the settings the user set (default: every
        key of `settings`); each of them must have an effect with the others, or the build is refused."""
        settings = dict(settings or {})
        if settings.get("format") in FORMAT_ALIASES:  # e.g. convrot_w4a4, ComfyUI's name of int4
            settings["format"] = FORMAT_ALIASES[settings["format"]]
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise QuantError(f"unknown setting {unknown[0]!r} (settings: {', '.join(sorted(SETTINGS))})")
        values = {name: check(name, spec, settings.get(name, default)) for name, (spec, default) in SETTINGS.items()}
        given = set(settings) if given is None else set(given)
        _refuse_inert(values, given)
        job = cls(**{name: _record(record, values) for name, record in SECTIONS.items()})
        method_class = METHODS[values["method"]].config_class
        job.method_config = None if method_class is None else _record(method_class, values)
        _check_job(job)
        return job

    @property
    def method(self) -> str:
        return self.quantize.method

    def rotation_group(self) -> int:
        """The ConvRot group size of the main format (0: no rotation)."""
        stored = getattr(self.method_config, "quip_store_transformed", False)
        rotated = self.quantize.convrot or stored or self.quantize.format == "int4"
        return self.quantize.convrot_group_size if rotated else 0

    def main_format(self):
        return self.quantize.main_format(self.rotation_group())

    def uses_statistics(self) -> bool:
        return self.calibration.uses_statistics(self.method)


def _record(cls, values: dict):
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


def _refuse_inert(values: dict, given: set[str]) -> None:
    method_class = METHODS[values["method"]].config_class
    method_fields = {f.name for f in dataclasses.fields(method_class)} if method_class else set()
    for name in SETTINGS:
        if name not in given:
            continue
        spec = SETTINGS[name][0]
        owner = next(cls for cls in STAGES + METHOD_CONFIGS if name in specs(cls))
        if owner in METHOD_CONFIGS and name not in method_fields:
            users = [m for m, e in METHODS.items() if e.config_class and name in specs(e.config_class)]
            raise QuantError(f"{spec.label(name)} applies to --optimizer {' or '.join(_cli_methods(users))} "
                             f"(the method is {values['method']})")
        why = spec.needs(values) if spec.needs is not None else None
        if why:
            raise QuantError(f"{spec.label(name)} {why}")


def _cli_methods(methods: list[str]) -> list[str]:
    return ["original|adamw|radam" if m == "learned" else m for m in methods]


def _check_job(job: Job) -> None:
    q = job.quantize
    if getattr(job.method_config, "quip_store_transformed", False) and q.format == "int4":
        raise QuantError("--quip-store-transformed has no effect with --format int4: int4 weights are always stored "
                         "in ComfyUI's rotated basis, where QuIP chooses its codes")
    if getattr(job.method_config, "quip_store_transformed", False) and (
            q.format != "int8" or resolve_scaling("int8", q.scaling_mode) != "row"):
        raise QuantError("--quip-store-transformed: ComfyUI can load rotated weights only as INT8 per-row ConvRot "
                         "(--format int8 --scaling_mode row); other formats would need a custom loader")
    if q.format != "fp16":
        try:
            job.main_format()
        except ValueError as e:
            raise QuantError(str(e)) from None
    if job.rotation_group() and not is_power_of_4(q.convrot_group_size):
        raise QuantError(f"--convrot-group-size must be a power of 4 (4, 16, 64, 256, 1024), got {q.convrot_group_size}")
    if job.select.exclude_layers is not None:
        compile_regex(job.select.exclude_layers, "--exclude-layers")
    if job.select.layer_config is not None and not isinstance(job.select.layer_config, str):
        load_layer_config(job.select.layer_config, q)  # an object is checked now; a path when the run reads it
    unknown = [p for p in job.select.presets if p not in PRESETS]
    if unknown:
        raise QuantError(f"unknown preset {unknown[0]!r} (choose from {', '.join(PRESETS)})")
    _check_calibration(job)
    _check_auto(job)
    _check_loras(job.lora.loras)
    if job.method_config is not None and hasattr(job.method_config, "validate"):
        job.method_config.validate()


def _check_calibration(job: Job) -> None:
    if job.smoothquant.smoothquant and job.method in ("gptq", "quip"):
        raise QuantError(f"--smoothquant with --optimizer {job.method}: the calibration Hessian describes the "
                         "unsmoothed inputs; use one of the two")


def _check_auto(job: Job) -> None:
    """--auto-bits/--auto-size-gb choose every selected layer's format: settings that choose formats themselves, or
    that the chooser cannot measure, are refused. The report then emulates the target's GPU class."""
    auto, q = job.auto, job.quantize
    if not auto.active:
        return
    if auto.auto_bits is not None and auto.auto_size_gb is not None:
        raise QuantError("--auto-bits and --auto-size-gb are two budgets; give one")
    conflicts = [(job.select.layer_config is not None, "--layer-config (auto chooses every layer's format; keep "
                  "layers with --exclude-layers)"),
                 (q.format != SETTINGS["format"][1], f"--format {q.format} (--target-gpu decides the formats)"),
                 (q.scaling_mode is not None, "--scaling_mode (each candidate format uses its default scaling)"),
                 (q.convrot, "--convrot (ConvRot INT8 is a candidate of its own)"),
                 (getattr(job.method_config, "quip_store_transformed", False), "--quip-store-transformed (the "
                  "candidates decide how each layer is stored; ConvRot INT8 is one of them)"),
                 (job.calibration.static_activations, "--static-activations (the chooser measures dynamic "
                  "activation scales)"),
                 (job.smoothquant.smoothquant, "--smoothquant (the chooser measures the unsmoothed layers)")]
    for conflict, what in conflicts:
        if conflict:
            raise QuantError(f"{_auto_flag(auto)} cannot be combined with {what}")
    job.output.runtime_gpu = TARGETS[auto.target_gpu].emulated


def _auto_flag(auto: AutoSettings) -> str:
    return "--auto-bits" if auto.auto_bits is not None else "--auto-size-gb"


def _check_loras(loras: tuple) -> None:
    for entry in loras:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise QuantError(f"loras: each entry is a (path, strength) pair, got {entry!r}")
        strength = entry[1]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise QuantError(f"LoRA {entry[0]}: strength must be a finite number, got {strength!r}")


def combine_settings(steps: list[tuple[str, dict]]) -> dict:
    """The settings of several steps of a chain (name of the step, its settings), in order. A setting two steps
    give with different values is refused, naming both steps (e.g. two calibration files)."""
    combined: dict = {}
    source: dict[str, str] = {}
    for step, settings in steps:
        for name, value in settings.items():
            if name in combined and combined[name] != value:
                label = SETTINGS[name][0].label(name) if name in SETTINGS else name
                raise QuantError(f"{source[name]} and {step} set {label} to different values "
                                 f"({combined[name]!r}, {value!r}); use one")
            combined[name], source[name] = value, step
    return combined


def given_by_value(settings: dict) -> set[str]:
    """The settings whose value differs from the declared default: what a form with every input filled in (a
    ComfyUI node) asks for beyond the defaults."""
    return {name for name, value in settings.items() if name not in SETTINGS or value != SETTINGS[name][1]}
