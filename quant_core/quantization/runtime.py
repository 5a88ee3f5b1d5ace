"""What ComfyUI computes for a quantized Linear layer at run time, per GPU class, and an emulation of it.

Every weight-only figure (the weight SQNR, the output SQNR on calibration statistics) dequantizes the weights and
multiplies in floating point. ComfyUI does that only where a format has no native kernel on the GPU; elsewhere its
kernels quantize the *activations* too (docs/RUNTIME.md has the table and where it comes from):

- `int8_tensorwise`: W8A8 everywhere: each input row to INT8 with its own scale (after the ConvRot rotation for
  ConvRot files), an INT8 GEMM.
- `convrot_w4a4`: each rotated input row to INT4 (W4A4) on GPUs with comfy-kitchen's INT4 GEMM (Turing RTX 20,
  Ampere, Ada), to INT8 (W4A8) on Hopper and Blackwell and with `linear_dtype: "int8"`.
- `float8_e4m3fn`/`float8_e5m2`: on FP8 GPUs (Ada and later) the input cast to FP8 with one static scale, the
  layer's `input_scale` or else 1.0 (values beyond ±448 clip), and an FP8 GEMM; dequantized weights elsewhere.
- `nvfp4`: on Blackwell the input quantized to NVFP4 (16-element blocks, FP8 block scales, a global scale from
  `input_scale` or max|x| / 2688 per call); `mxfp8`: on Blackwell to MXFP8 (32-element blocks, E8M0 scales).

The emulation fake-quantizes the input rows through comfy-kitchen's eager reference ops (the same numerics as its
CUDA kernels' quantizers) and multiplies them with the dequantized weight in fp32: for ConvRot formats
x̂·Ŵᵀ = x̂_rot·Ŵ_rotᵀ (R is symmetric and orthogonal), so the rotated-back reconstruction serves every format. The
result is rounded to the compute dtype (bf16) as ComfyUI's output is; the dequantized path multiplies bf16 copies.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..report import sqnr_db

COMPUTE_DTYPE = torch.bfloat16  # ComfyUI's compute dtype for the diffusion models these files are made for
EVAL_ROWS = 128  # input rows each layer's run-time figure is measured on (at most)
SYNTHETIC_ROWS = 32  # rows drawn when the calibration file has no sample (or there is no file)


@dataclass(frozen=True)
class GpuClass:
    """What ComfyUI's and comfy-kitchen's capability checks see on a class of NVIDIA GPUs."""

    name: str
    label: str
    fp8: bool  # comfy.model_management.supports_fp8_compute: compute capability 8.9 and later
    fp4_mx: bool  # supports_nvfp4_compute / supports_mxfp8_compute: 10.0 and later
    int4_gemm: bool  # comfy-kitchen's INT4 GEMM for convrot_w4a4 (7.5 RTX 20 Turing kernels, 8.x native MMA)


GPU_CLASSES = {g.name: g for g in (
    GpuClass("ampere", "Turing/Ampere (RTX 20/30, A100)", fp8=False, fp4_mx=False, int4_gemm=True),
    GpuClass("ada", "Ada (RTX 40, L40S)", fp8=True, fp4_mx=False, int4_gemm=True),
    GpuClass("hopper", "Hopper (H100, H200)", fp8=True, fp4_mx=False, int4_gemm=False),
    GpuClass("blackwell", "Blackwell (RTX 50, B200)", fp8=True, fp4_mx=True, int4_gemm=False),
)}
AUTO = "auto"
RUNTIME_GPUS = (AUTO, *GPU_CLASSES)  # --runtime-gpu
# --runtime-gpu auto: per format, the most common class that runs it natively (its "as computed" figure)
# presets of models ComfyUI loads as text encoders: their ops compute with the dequantized weights on every GPU
# (comfy/sd1_clip.py: mixed_precision_ops(..., full_precision_mm=True))
TEXT_ENCODER_PRESETS = ("t5xxl", "mistral")
AUTO_CLASS = {"int8_tensorwise": "ampere", "convrot_w4a4": "ampere", "float8_e4m3fn": "ada", "float8_e5m2": "ada",
              "nvfp4": "blackwell", "mxfp8": "blackwell"}


@dataclass(frozen=True)
class FormatQuality:
    """Per-layer SQNR of a normal layer of the format (dB), measured (docs/RUNTIME.md: mean over the layers of
    all-MiniLM-L6-v2 and of the Flux-shaped demo model, round-to-nearest), and the levels 3 dB below them (twice a
    typical layer's noise) under which the report and the chart flag a layer: weights only (weight SQNR) and as
    computed on the format's AUTO_CLASS (output SQNR, activations quantized)."""

    typical_db: float
    typical_computed_db: float

    @property
    def warn_below_db(self) -> float:
        return self.typical_db - WARN_MARGIN_DB

    @property
    def computed_warn_below_db(self) -> float:
        return self.typical_computed_db - WARN_MARGIN_DB


WARN_MARGIN_DB = 3.0
FORMAT_QUALITY = {  # the lower of the two models' means, to 0.5 dB (int8: demo 33.4 / MiniLM 41.2 weights only)
    "int8_tensorwise": FormatQuality(33.0, 33.0),  # W8A8: demo 32.8 (N(0, I) rows), MiniLM 35.2 (held-out rows)
    "convrot_w4a4": FormatQuality(17.0, 14.0),  # W4A4: 14.0 / 16.4
    "float8_e4m3fn": FormatQuality(31.5, 28.5),  # 28.5 / 30.7
    "float8_e5m2": FormatQuality(25.5, 22.5),
    "nvfp4": FormatQuality(20.5, 17.5),  # 17.5 / 20.3
    "mxfp8": FormatQuality(31.5, 28.5),  # 28.5 / 31.0
}
DEFAULT_WARN_BELOW_DB = 30.0  # formats without a measured entry (legacy block/row formats)


def warn_below_db(format_name: str, computed: bool = False) -> float:
    """The SQNR (dB) under which a layer of this format (a marker's `format`, or a report's format description)
    is flagged: weights only, or (`computed`) as computed with quantized activations."""
    quality = FORMAT_QUALITY.get(format_name.split(" ")[0])
    if quality is None:
        return DEFAULT_WARN_BELOW_DB
    return quality.computed_warn_below_db if computed else quality.warn_below_db


@dataclass(frozen=True)
class Runtime:
    """What ComfyUI computes for one layer on one GPU class."""

    gpu: str  # the class's label, or "every GPU class" where they all compute the same
    activations: str | None  # how the input is quantized; None: weights dequantized, a matmul in the compute dtype
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None  # x [M, K] → x̂ fp32 in x's basis

    def describe(self) -> str:
        if self.activations is None:
            return "weights dequantized to bf16, bf16 matmul (= weights only)"
        return self.activations


def runtime(marker: dict, input_scale: torch.Tensor | None, gpu: str = AUTO, text_encoder: bool = False) -> Runtime:
    """What ComfyUI computes for a layer with this marker (and static `input_scale`) on GPU class `gpu`
    (AUTO: the format's AUTO_CLASS); a text encoder's layers always use the dequantized weights."""
    if text_encoder:
        return Runtime("every GPU class (text encoder)", None)
    name = marker.get("format", "")
    chosen = GPU_CLASSES[AUTO_CLASS.get(name, "ampere") if gpu == AUTO else gpu]
    result = _runtime_on(marker, input_scale, chosen)
    if all(_runtime_on(marker, input_scale, g).activations == result.activations for g in GPU_CLASSES.values()):
        return Runtime("every GPU class", result.activations, result.quantize)
    return result


def _runtime_on(marker: dict, input_scale, gpu: GpuClass) -> Runtime:
    name = marker.get("format", "")
    if marker.get("full_precision_matrix_mult") or name not in AUTO_CLASS:
        return Runtime(gpu.label, None)  # legacy formats: not loaded by stock ComfyUI at all
    if name == "int8_tensorwise":
        group = marker.get("convrot_groupsize", 256) if marker.get("convrot") else 0
        what = "INT8 per row, dynamic (max|x_row|/127)" + (f", after the ConvRot rotation (G={group})" if group else "")
        return Runtime(gpu.label, f"{what}; INT8 GEMM", _rotated(_int8_rows, group))
    if name == "convrot_w4a4":
        group = marker.get("convrot_groupsize", 256)
        if marker.get("linear_dtype", "int4") == "int4" and gpu.int4_gemm:
            return Runtime(gpu.label, f"INT4 per row of the rotated input (G={group}), dynamic (max|x_row|/7); "
                                      "INT4 GEMM (W4A4)", _rotated(_int4_rows, group))
        return Runtime(gpu.label, f"INT8 per row of the rotated input (G={group}), dynamic (max|x_row|/127); "
                                  "INT8 GEMM on the unpacked INT4 weights (W4A8)", _rotated(_int8_rows, group))
    if name in ("float8_e4m3fn", "float8_e5m2"):
        if not gpu.fp8:
            return Runtime(gpu.label, None)
        dtype = torch.float8_e4m3fn if name == "float8_e4m3fn" else torch.float8_e5m2
        scale = "static input_scale" if input_scale is not None else \
            f"scale 1.0 (no input_scale: values beyond ±{torch.finfo(dtype).max:g} clip)"
        return Runtime(gpu.label, f"{name.removeprefix('float8_').upper()} per tensor, {scale}; FP8 GEMM "
                                  "(_scaled_mm)", _fp8(dtype, input_scale))
    if not gpu.fp4_mx:
        return Runtime(gpu.label, None)
    if name == "nvfp4":
        scale = "static input_scale" if input_scale is not None else "dynamic max|x|/2688"
        return Runtime(gpu.label, f"NVFP4: 16-element blocks, FP8 block scales, global scale {scale}; NVFP4 GEMM",
                       _nvfp4(input_scale))
    return Runtime(gpu.label, "MXFP8: 32-element blocks, E8M0 block scales; MXFP8 GEMM", _mxfp8)


# ---- activation quantizers: comfy-kitchen's eager reference ops, returning x̂ (fp32) ----

def _eager():
    from comfy_kitchen.backends.eager import quantization
    return quantization


def _rotated(inner: Callable, group: int) -> Callable:
    """`inner` applied to the input rotated as comfy-kitchen rotates it (in the input's dtype), the result rotated
    back (fp32) so that it multiplies the rotated-back weight."""
    if not group:
        return inner

    def quantize(x: torch.Tensor) -> torch.Tensor:
        from comfy_kitchen.backends.eager.convrot_w4a4 import _build_hadamard, _rotate_activation

        from .formats.int8 import rotate
        x_rot = _rotate_activation(x, _build_hadamard(group, device=x.device, dtype=x.dtype), group)
        return rotate(inner(x_rot), group)
    return quantize


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    codes, scales = _eager().quantize_int8_rowwise(x)
    return codes.float() * scales.float()


def _int4_rows(x: torch.Tensor) -> torch.Tensor:
    from comfy_kitchen.backends.eager.convrot_w4a4 import quantize_signed_int4_rowwise
    from comfy_kitchen.backends.eager.svdquant import _unpack_int4_row_major
    packed, scales = quantize_signed_int4_rowwise(x)
    return _unpack_int4_row_major(packed).float() * scales.float().reshape(-1, 1)


def _fp8(dtype: torch.dtype, input_scale: torch.Tensor | None) -> Callable:
    def quantize(x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones((), device=x.device) if input_scale is None else input_scale.to(x.device).float()
        codes = _eager().quantize_per_tensor_fp8(x, scale, dtype)
        return _eager().dequantize_per_tensor_fp8(codes, scale, torch.float32)
    return quantize


def _nvfp4(input_scale: torch.Tensor | None) -> Callable:
    def quantize(x: torch.Tensor) -> torch.Tensor:
        if input_scale is None:  # ComfyUI's layout: in the input's dtype, then fp32
            scale = (torch.amax(x.abs()) / (448.0 * 6.0)).float()
        else:
            scale = input_scale.to(x.device).float().reshape(())
        m, k = x.shape
        codes, blocks = _eager().quantize_nvfp4(x, scale, pad_16x=m % 16 != 0 or k % 16 != 0)
        return _eager().dequantize_nvfp4(codes, scale, blocks, torch.float32)[:m, :k]
    return quantize


def _mxfp8(x: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    codes, blocks = _eager().quantize_mxfp8(x, pad_32x=m % 32 != 0 or k % 32 != 0)
    return _eager().dequantize_mxfp8(codes, blocks, torch.float32)[:m, :k]


# ---- the emulation and the figures ----

def emulate(x: torch.Tensor, approx: torch.Tensor, rt: Runtime, compute_dtype: torch.dtype = COMPUTE_DTYPE
            ) -> torch.Tensor:
    """y = x·Ŵᵀ as ComfyUI computes it (no bias), fp32 [M, N]: `x` [M, K] the input rows, `approx` the dequantized
    weight [N, K] (fp32, rotated back for ConvRot formats)."""
    x = x.to(compute_dtype)
    if rt.quantize is None:
        y = x.float() @ approx.to(compute_dtype).float().T
    else:
        y = rt.quantize(x) @ approx.float().T
    return y.to(compute_dtype).float()


@dataclass
class Rows:
    """The input rows a layer's run-time figure is measured on, and what they are."""

    x: torch.Tensor  # [M, K] fp32
    basis: str


def evaluation_rows(layer: str, k: int, stats=None, rows: int = EVAL_ROWS) -> Rows:
    """Rows to measure a layer on: the calibration file's held-out sample, else its sample, else Gaussian rows
    with the file's per-feature mean and E[x²] (a file without samples), else N(0, I) rows (no real statistics).
    Drawn rows are seeded by the layer name."""
    for sample, basis in ((getattr(stats, "heldout_input_sample", None), "held-out calibration rows"),
                          (getattr(stats, "input_sample", None), "calibration rows (in-sample)")):
        if sample is not None:
            picked = sample[:: max(1, -(-sample.shape[0] // rows))]  # evenly spread: the sample is in random order
            return Rows(picked.float(), f"{picked.shape[0]} {basis}")
    g = torch.Generator().manual_seed(zlib.crc32(layer.encode()))
    z = torch.randn(SYNTHETIC_ROWS, k, generator=g)
    if stats is None:
        return Rows(z, f"{SYNTHETIC_ROWS} N(0, I) rows (no recorded statistics)")
    mean = stats.mean if stats.mean is not None else torch.zeros(k)
    std = (stats.mean_sq.float() - mean.float() ** 2).clamp(min=0).sqrt()
    return Rows(mean.float() + z * std, f"{SYNTHETIC_ROWS} Gaussian rows with the file's per-feature moments "
                                        "(the file has no input_sample)")


def runtime_fields(layer: str, marker: dict, input_scale: torch.Tensor | None, stats, weight: torch.Tensor,
                   approx: torch.Tensor, bias_shift: torch.Tensor | None, gpu: str = AUTO,
                   input_divisor: torch.Tensor | None = None, text_encoder: bool = False) -> dict:
    """The report's run-time fields (`report.LayerStats`) of a quantized layer: its format's warning level, the
    output SQNR (dB) as ComfyUI computes
    it on the chosen GPU class and, on the same rows, of the dequantized weights alone; `bias_shift` is the bias
    correction written (output units), counted in both; `input_divisor` the SmoothQuant factors s of a smoothed
    layer (its inputs are the recorded ones divided by s). `weight`/`approx` are fp32 [N, K] on one device."""
    level = {"threshold_db": warn_below_db(marker.get("format", ""))}
    if marker.get("format") not in AUTO_CLASS:
        return level  # a fork-only format: stock ComfyUI does not load it, so there is nothing it computes
    rt = runtime(marker, input_scale, gpu, text_encoder)
    if rt.quantize is None:
        return {**level, "runtime_gpu": rt.gpu, "runtime_note": rt.describe()}
    rows = evaluation_rows(layer, weight.shape[1], stats)
    x = rows.x.to(weight.device)
    if input_divisor is not None and stats is not None:  # N(0, I) rows stand for any input: not divided
        x = x / input_divisor.to(weight.device).float()
    with torch.no_grad():
        reference = x @ weight.T
        shift = 0.0 if bias_shift is None else bias_shift.to(weight.device).float()
        weights_only = x @ approx.T + shift - reference
        computed = emulate(x, approx, rt) + shift - reference
        signal, noise_w, noise_c = torch.stack([t.square().sum(dtype=torch.float64)
                                                for t in (reference, weights_only, computed)]).tolist()
    return {**level, "runtime_sqnr_db": sqnr_db(signal, noise_c), "runtime_weights_db": sqnr_db(signal, noise_w),
            "runtime_gpu": rt.gpu, "runtime_note": f"{rt.describe()}; on {rows.basis}",
            "runtime_threshold_db": warn_below_db(marker.get("format", ""), computed=True)}

