"""One validated record of what a conversion should do, shared by the CLI, the library API and the nodes."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from .errors import QuantError
from .formats import FAMILIES, FORMAT_FAMILIES, make_format, resolve_scaling
from .formats.int8 import is_power_of_4
from .methods.learned import LearnedConfig
from .select.presets import PRESETS

METHODS = ("rtn", "gptq", "quip", "learned")
LEARNED_ROUNDING = ("original", "adamw", "radam")  # the seed's learned-rounding optimizers: method "learned"
VERIFY_LEVELS = ("off", "cheap", "full")
BF16_MODES = ("auto", "on", "off")
# --streaming-mode: layers with more weight elements than this are quantized on the CPU when the device is CUDA
STREAMING_THRESHOLDS = {"off": math.inf, "minimal": 100_000_000, "balanced": 50_000_000, "aggressive": 25_000_000}
STREAMING_MODES = (*STREAMING_THRESHOLDS, "auto")


@dataclass
class QuantOptions:
    """Conversion options. Units: block sizes and group sizes in elements, thresholds in dB, budgets in bytes."""

    format: str = "int8"  # int8 | fp8 | fp8_e5m2 | nvfp4 | mxfp8 | fp16
    scaling_mode: str | None = None  # tensor | row (axis) | block; None = the format's default
    block_size: int = 128  # tile size of the explicit block modes
    convrot: bool = False  # INT8 per-row with a ConvRot (block Hadamard) rotation
    convrot_group_size: int = 256
    method: str = "rtn"  # rtn (`--simple`, the default) | gptq | quip | learned (`--optimizer original/adamw/radam`)
    learned: LearnedConfig | dict = field(default_factory=LearnedConfig)  # settings of method "learned"
    calibration_data: str | None = None  # FORMATS.md §4 statistics file (real inputs)
    calibration_lora: str | None = None  # LoRA whose down-projections give the input directions (no file needed)
    bias_correction: bool = True  # b' = b + (W − Ŵ)·E[x] where the calibration data has a real mean
    gptq_damp: float = 0.1  # Hessian dampening, fraction of mean(diag H) (0.1: measured best with ~1k tokens)
    gptq_block_size: int = 128  # columns per lazy batch of the GPTQ/QuIP sweep
    gptq_actorder: bool = True  # GPTQ: largest E[x_k²] columns first
    scale_search: bool = True  # GPTQ/QuIP: per-row/per-tensor clip factor minimizing diag(H)-weighted error
    quip_seed: int = 0  # random signs of the original-space incoherence transform
    quip_hadamard: bool = True  # randomized block Hadamard (False: random orthogonal matrix)
    quip_actorder: bool = True
    quip_store_transformed: bool = False  # store in ComfyUI's ConvRot (block Hadamard) form: INT8 per-row only
    quip_checkpointed: bool = False  # keep the inverse-Hessian factor on the CPU for large layers
    quip_checkpoint_threshold: int = 8192  # K at or above which --quip-checkpointed applies
    quip_checkpoint_segments: int = 4  # row segments of the factor moved to the device one at a time
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5  # migration strength: s_k = absmax_x^α / absmax_w^(1−α)
    static_activations: bool = False  # write input_scale (fp8, nvfp4) from the calibration file
    bf16_compute: str = "auto"  # auto | on | off: bf16 for learned rounding's projections
    bf16_threshold: int = 1_000_000  # auto: layers with at least this many elements, on CUDA with bf16
    streaming_mode: str = "auto"  # off | minimal | balanced | aggressive | auto (from free GPU memory)
    stream_hadamard_threshold: int | None = None  # overrides the mode's per-layer element threshold
    no_memory_limits: bool = False  # every layer on the GPU, no CPU retry after an out-of-memory error
    full_precision_matrix_mult: bool = False
    presets: tuple[str, ...] = ()
    exclude_layers: str | None = None  # regex on layer names
    layer_config: str | dict | None = None  # path to JSON, or the parsed object
    heur: bool = False
    quantize_embeddings: bool = False
    quantize_io_layers: bool = False
    allow_nonfinite: bool = False
    low_memory: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    prefetch_bytes: int = 512 << 20  # read-ahead, and writes waiting on the writer thread, in standard mode
    verify: str = "cheap"
    report_quality: bool = False  # CLI: print every layer (the API returns the report either way)
    quality_threshold: float = 30.0
    report_path: str | None = None
    overwrite: bool = False
    progress: bool = True
    merge_lora: str | None = None  # one LoRA, at merge_lora_scale
    merge_loras: tuple[str, ...] = ()  # several, the later ones dampened by 0.9^index
    merge_lora_scale: float = 1.0
    merge_lora_dampen: bool = True
    loras: tuple[tuple[str, float], ...] = ()  # explicit (path, strength) pairs, merged after the flag-given ones
    lora_mapping: str | dict | None = None  # module → weight key overrides (path or object)
    lora_max_unmatched: int = 0  # LoRA modules allowed to match nothing

    def validate(self) -> "QuantOptions":
        """Check every field once; raise QuantError with a one-line message. Returns self."""
        if self.format not in FORMAT_FAMILIES:
            raise QuantError(f"unknown format {self.format!r} (choose from {', '.join(FORMAT_FAMILIES)})")
        if self.method in LEARNED_ROUNDING:
            raise QuantError(f"method {self.method!r}: learned rounding is method 'learned' with "
                             f"learned={{'optimizer': {self.method!r}}} (CLI: --optimizer {self.method})")
        if self.method not in METHODS:
            raise QuantError(f"unknown method {self.method!r} (available: {', '.join(METHODS)})")
        self._validate_methods()
        if self.verify not in VERIFY_LEVELS:
            raise QuantError(f"unknown verify level {self.verify!r} (choose from {', '.join(VERIFY_LEVELS)})")
        if (self.convrot or self.quip_store_transformed) and not is_power_of_4(self.convrot_group_size):
            raise QuantError(f"--convrot-group-size must be a power of 4 (4, 16, 64, 256, 1024), got {self.convrot_group_size}")
        if self.block_size < 1:
            raise QuantError(f"--block_size must be positive, got {self.block_size}")
        if self.exclude_layers is not None:
            compile_regex(self.exclude_layers, "--exclude-layers")
        if self.format != "fp16":
            try:
                self.main_format()
            except ValueError as e:
                raise QuantError(str(e)) from None
        if self.report_path is not None:
            directory = os.path.dirname(os.path.abspath(self.report_path))
            if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                raise QuantError(f"--report {self.report_path}: directory {directory} does not exist or is not writable")
        if self.lora_max_unmatched < 0:
            raise QuantError("--lora-max-unmatched must be 0 or more")
        if not math.isfinite(self.merge_lora_scale):
            raise QuantError("--merge-lora-scale must be a finite number")
        for path, strength in self.loras:
            if not math.isfinite(strength):
                raise QuantError(f"LoRA {os.path.basename(path)}: strength must be a finite number, got {strength}")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise QuantError(f"unknown preset {unknown[0]!r} (choose from {', '.join(PRESETS)})")
        return self

    def _validate_methods(self) -> None:
        self._validate_learned_smoothing_memory()
        for path, flag in ((self.calibration_data, "--calibration-data"), (self.calibration_lora, "--calibration-lora")):
            if path is not None and not os.path.isfile(path):
                raise QuantError(f"{flag} {path}: no such file")
        if self.calibration_data and self.calibration_lora:
            raise QuantError("--calibration-data and --calibration-lora are two calibration sources; give one")
        if not 0 <= self.gptq_damp < 10 or not math.isfinite(self.gptq_damp):
            raise QuantError(f"--gptq-damp must be in [0, 10) (a fraction of mean(diag H)), got {self.gptq_damp}")
        if self.gptq_block_size < 1 or self.quip_checkpoint_segments < 1 or self.quip_checkpoint_threshold < 1:
            raise QuantError("--gptq-block-size, --quip-checkpoint-segments and --quip-checkpoint-threshold must be "
                             "positive")
        quip_only = {"--quip-store-transformed": self.quip_store_transformed, "--quip-checkpointed": self.quip_checkpointed}
        for flag, used in quip_only.items():
            if used and self.method != "quip":
                raise QuantError(f"{flag} applies to --optimizer quip only")
        if self.quip_store_transformed and (self.format != "int8" or resolve_scaling("int8", self.scaling_mode) != "row"):
            raise QuantError("--quip-store-transformed: ComfyUI can load rotated weights only as INT8 per-row ConvRot "
                             "(--format int8 --scaling_mode row); other formats would need a custom loader")

    def uses_calibration(self) -> bool:
        """Whether a conversion needs per-layer input statistics (a method, bias correction or the report)."""
        return self.method in ("gptq", "quip") or self.calibration_data is not None or self.calibration_lora is not None

    def method_config(self):
        """The config record of the chosen method (None for RTN)."""
        from .methods import GPTQConfig, QuipConfig
        from .methods.ldlq import SweepConfig
        if self.method == "gptq":
            return GPTQConfig(SweepConfig(self.gptq_damp, self.gptq_block_size, self.gptq_actorder), self.scale_search)
        if self.method == "quip":
            segments = self.quip_checkpoint_segments if self.quip_checkpointed else 1
            sweep = SweepConfig(self.gptq_damp, self.gptq_block_size, self.quip_actorder, segments,
                                self.quip_checkpoint_threshold)
            return QuipConfig(self.quip_seed, self.quip_hadamard, sweep, self.scale_search)
        if self.method == "learned":
            return self.learned
        return None

    def _validate_learned_smoothing_memory(self) -> None:
        if isinstance(self.learned, dict):
            known = {f.name for f in dataclasses.fields(LearnedConfig)}
            unknown = sorted(set(self.learned) - known)
            if unknown:
                raise QuantError(f"unknown learned-rounding setting {unknown[0]!r} (settings: {', '.join(sorted(known))})")
            self.learned = LearnedConfig(**self.learned)
        self.learned.validate()
        if self.bf16_compute not in BF16_MODES:
            raise QuantError(f"--bf16-compute must be one of {', '.join(BF16_MODES)}, got {self.bf16_compute!r}")
        if self.streaming_mode not in STREAMING_MODES:
            raise QuantError(f"--streaming-mode must be one of {', '.join(STREAMING_MODES)}, got {self.streaming_mode!r}")
        for name in ("bf16_threshold", "stream_hadamard_threshold"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise QuantError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if not (math.isfinite(self.smoothquant_alpha) and 0 <= self.smoothquant_alpha <= 1):
            raise QuantError(f"--smoothquant-alpha must be between 0 and 1, got {self.smoothquant_alpha}")
        if self.smoothquant and self.calibration_data is None:
            raise QuantError("--smoothquant needs --calibration-data FILE (per-layer input_absmax, FORMATS.md §4)")
        if self.smoothquant and self.method in ("gptq", "quip"):
            raise QuantError(f"--smoothquant with --optimizer {self.method}: the calibration Hessian describes the "
                             "unsmoothed inputs; use one of the two")

    def main_format(self):
        """The format module for layers no rule overrides."""
        group = self.convrot_group_size if self.convrot or self.quip_store_transformed else 0
        return make_format(self.format, self.scaling_mode, self.block_size, group)

    def is_legacy(self) -> bool:
        if self.format == "fp16":
            return False
        scaling = resolve_scaling(self.format, self.scaling_mode)
        return not FAMILIES[self.format][scaling].upstream

    def lora_files(self) -> list[tuple[str, float]]:
        """(path, effective scale) of every LoRA to merge, in order."""
        from .lora.merge import lora_scales
        flagged = lora_scales(self.merge_lora, tuple(self.merge_loras), self.merge_lora_scale, self.merge_lora_dampen)
        return flagged + [(path, float(strength)) for path, strength in self.loras]

    def replace(self, **changes) -> "QuantOptions":
        return dataclasses.replace(self, **changes)


def compile_regex(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QuantError(f"{what}: bad regular expression {pattern!r}: {e}") from None
