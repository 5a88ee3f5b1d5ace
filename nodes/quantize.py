"""Quantize INT8 / INT4 / FP8 / NVFP4 / MXFP8: choose the format and the engine's selection settings for the plan.

Inputs that are engine settings take their default, range and help from the engine's declarations
(`quant_core.SETTINGS`); the node checks its values through the engine itself (`quant_core.Job.build`), in
`validate_inputs` and again in `execute`, because older servers skip combo validation.
"""
from __future__ import annotations

import json

from comfy_api.latest import io

from .. import quant_core
from ..quant_core import QuantError
from . import paths
from .recipe import QuantRecipe, require_plan
from .settings import setting_input
from .types import CATEGORY, QuantCalibration, QuantPlan

NO_PRESET = "none"
SYNTHETIC = "synthetic"


def _common_inputs() -> list:
    methods = quant_core.METHODS
    return [
        QuantPlan.Input("plan", tooltip="The plan from Load Safetensors, Plan from MODEL/CLIP, Merge LoRA or "
                                        "SmoothQuant."),
        setting_input("method", tooltip="How codes are chosen on the scale grid. " + "; ".join(
            f"{name}: {entry.help}" for name, entry in methods.items())),
        io.Combo.Input("calibration", options=[SYNTHETIC, *paths.list_files(paths.CALIBRATION_FOLDERS)],
                       default=SYNTHETIC,
                       tooltip="Input statistics for GPTQ/QuIP and bias correction: a calibration file from "
                               "models/quant_calibration (python -m quant_core calibrate …), or none (GPTQ/QuIP then "
                               "run as round-to-nearest and say so)."),
        QuantCalibration.Input("calibration_file", optional=True,
                               tooltip="A calibration file saved in this workflow (Save Calibration's output); "
                                       "takes the place of the calibration choice above."),
        setting_input("bias_correction"),
        setting_input("gptq_damp", step=0.01),
        io.Combo.Input("preset", options=[NO_PRESET, *quant_core.PRESETS], default=NO_PRESET,
                       tooltip="Model preset: which layers stay in high precision or are removed (the converter's "
                               "--flux2, --t5xxl, --wan … presets). " + "; ".join(
                                   f"{name}: {p.help}" for name, p in quant_core.PRESETS.items())),
        io.String.Input("exclude_layers", default="", tooltip="Regular expression: layers whose name matches stay in "
                                                              "high precision (empty = none)."),
        io.Boolean.Input("keep_io_layers", default=not quant_core.SETTINGS["quantize_io_layers"][1],
                         tooltip="Keep input embedders and the first/last layers in high precision (recommended: "
                                 "ComfyUI detects the architecture from some of their shapes)."),
        setting_input("full_precision_matrix_mult"),
        io.String.Input("layer_config", default="", multiline=True,
                        tooltip="Optional per-layer rules as JSON, the same schema as --layer-config (see the README); "
                                "empty = none."),
    ]


def _settings(format: str, method: str, calibration: str, bias_correction: bool, gptq_damp: float, preset: str,
              exclude_layers: str, keep_io_layers: bool, full_precision_matrix_mult: bool, layer_config: str,
              calibration_file: str | None = None, **format_settings) -> dict:
    """The engine settings a Quantize node sets (checked: raises QuantError with a one-line message)."""
    settings = dict(format=format, method=method, presets=() if preset == NO_PRESET else (preset,),
                    exclude_layers=exclude_layers.strip() or None, quantize_io_layers=not keep_io_layers,
                    full_precision_matrix_mult=full_precision_matrix_mult, bias_correction=bias_correction,
                    gptq_damp=gptq_damp, **format_settings)
    if calibration_file is not None:
        settings["calibration_data"] = calibration_file_path(calibration_file)
    elif calibration != SYNTHETIC:
        settings["calibration_data"] = _calibration_path(calibration)
    if layer_config.strip():
        try:
            settings["layer_config"] = json.loads(layer_config)
        except (ValueError, RecursionError) as e:
            raise QuantError(f"layer_config: malformed JSON: {e}") from None
    quant_core.Job.build(settings, given=quant_core.given_by_value(settings))
    return settings


def calibration_file_path(path) -> str:
    """A calibration file linked from Save Calibration, checked to lie in the calibration folders."""
    if not isinstance(path, str):
        raise QuantError("calibration_file: connect the calibration output of Save Calibration")
    try:
        return paths.confine(path, paths.CALIBRATION_FOLDERS)
    except ValueError as e:
        raise QuantError(f"calibration_file: {e}") from None


def _calibration_path(name: str) -> str | None:
    if name == SYNTHETIC:
        return None
    try:
        return paths.resolve(name, paths.CALIBRATION_FOLDERS)
    except ValueError as e:
        raise QuantError(str(e)) from None


def _validate(node_fields, plan=None, **inputs) -> bool | str:
    """`node_fields` maps the node's own widgets to engine settings (and checks its combos)."""
    try:
        _settings(**node_fields(**inputs))
    except QuantError as e:
        return str(e)
    return True


def _execute(node_fields, plan: QuantRecipe, **inputs) -> io.NodeOutput:
    plan = require_plan(plan)
    try:
        return io.NodeOutput(plan.with_quantize(**_settings(**node_fields(**inputs))))
    except QuantError as e:
        raise ValueError(str(e)) from None


def _schema(node_id: str, display_name: str, description: str, format_inputs: list) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=_common_inputs()[:1] + format_inputs + _common_inputs()[1:],
                     outputs=[QuantPlan.Output(display_name="plan", tooltip="The plan with the quantization settings; "
                                                                            "connect it to Save Quantized.")])


class QuantizeINT8(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("QuantCoreQuantizeINT8", "Quantize INT8", "INT8 weights (int8_tensorwise): half the size of "
                       "BF16; fast INT8 matmul on GPUs that have it. Per-row scales are the accurate default.", [
            io.Combo.Input("scaling", options=INT8_SCALING, default="row",
                           tooltip="row: one scale per output row (accurate); tensor: one scale for the whole weight."),
            io.Boolean.Input("convrot", default=False,
                             tooltip="Rotate each row group with a block Hadamard (ConvRot) before rounding: lower "
                                     "error on weights with outliers; ComfyUI undoes it online. Per-row scaling only."),
            io.Combo.Input("convrot_group_size", options=CONVROT_GROUPS,
                           default=str(quant_core.SETTINGS["convrot_group_size"][1]),
                           tooltip="ConvRot block size (a power of 4; the input width must be a multiple of it)."),
            setting_input("quip_store_transformed", input_name="quip_convrot_storage", tooltip="Method quip only: store the weights in ComfyUI's "
                          "ConvRot form (the rotation ComfyUI applies online), keeping QuIP's gain; off re-quantizes "
                          "in the original space, which loses most of it."),
        ])

    @classmethod
    def validate_inputs(cls, **inputs):
        return _validate(_int8, **inputs)

    @classmethod
    def execute(cls, plan, **inputs) -> io.NodeOutput:
        return _execute(_int8, plan, **inputs)


INT8_SCALING = ["row", "tensor"]
FP8_TYPES = {"e4m3fn": "fp8", "e5m2": "fp8_e5m2"}
CONVROT_GROUPS = ["16", "64", "256", "1024"]


def _choice(name: str, value, choices) -> None:
    """Combo values checked here too: older servers skip combo validation."""
    if value not in choices:
        raise QuantError(f"{name} {value!r}: choose from {', '.join(map(str, choices))}")


def _int8(scaling, convrot, convrot_group_size, quip_convrot_storage, **rest) -> dict:
    _choice("scaling", scaling, INT8_SCALING)
    _choice("convrot_group_size", str(convrot_group_size), CONVROT_GROUPS)
    settings = dict(rest, format="int8", scaling_mode=scaling, convrot=convrot, convrot_group_size=int(convrot_group_size))
    if rest.get("method") == "quip":  # the input is shown for every method; only QuIP reads it
        settings["quip_store_transformed"] = quip_convrot_storage
    return settings


class QuantizeINT4(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("QuantCoreQuantizeINT4", "Quantize INT4", "INT4 weights in ComfyUI's ConvRot W4A4 format "
                       "(convrot_w4a4): a block-Hadamard rotation, 4-bit codes and one scale per row; about a quarter "
                       "of BF16; INT4 tensor-core matmul on RTX 20/30/40 and later. Needs a ComfyUI from July 2026 on.", [
            io.Combo.Input("convrot_group_size", options=CONVROT_GROUPS,
                           default=str(quant_core.SETTINGS["convrot_group_size"][1]),
                           tooltip="Rotation block size (a power of 4). Layers whose input width is not a multiple "
                                   "of it and of 64 are written as per-row INT8 instead, with a note."),
            setting_input("int4_linear_dtype", input_name="activations",
                          tooltip="What ComfyUI quantizes the activations to on the GPU: int4 (W4A4, fastest) or "
                                  "int8 (W4A8, more accurate, INT8 speed)."),
        ])

    @classmethod
    def validate_inputs(cls, **inputs):
        return _validate(_int4, **inputs)

    @classmethod
    def execute(cls, plan, **inputs) -> io.NodeOutput:
        return _execute(_int4, plan, **inputs)


def _int4(convrot_group_size, activations, **rest) -> dict:
    _choice("convrot_group_size", str(convrot_group_size), CONVROT_GROUPS)
    _choice("activations", activations, list(quant_core.SETTINGS["int4_linear_dtype"][0].choices))
    return dict(rest, format="int4", convrot_group_size=int(convrot_group_size), int4_linear_dtype=activations)


class QuantizeFP8(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("QuantCoreQuantizeFP8", "Quantize FP8", "FP8 weights with one scale per tensor: half the size "
                       "of BF16, native FP8 matmul on Ada/Hopper/Blackwell GPUs.", [
            io.Combo.Input("fp8_type", options=list(FP8_TYPES), default="e4m3fn",
                           tooltip="e4m3fn: more precision (recommended); e5m2: more range, less precision."),
        ])

    @classmethod
    def validate_inputs(cls, **inputs):
        return _validate(_fp8, **inputs)

    @classmethod
    def execute(cls, plan, **inputs) -> io.NodeOutput:
        return _execute(_fp8, plan, **inputs)


def _fp8(fp8_type, **rest) -> dict:
    _choice("fp8_type", fp8_type, list(FP8_TYPES))
    return dict(rest, format=FP8_TYPES[fp8_type])


class QuantizeNVFP4(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("QuantCoreQuantizeNVFP4", "Quantize NVFP4", "NVFP4 weights (4-bit E2M1, FP8 scale per 16 "
                       "values, one global scale): about a quarter of BF16; native on Blackwell GPUs. The most "
                       "lossy format: check the quality chart.", [])

    @classmethod
    def validate_inputs(cls, **inputs):
        return _validate(_nvfp4, **inputs)

    @classmethod
    def execute(cls, plan, **inputs) -> io.NodeOutput:
        return _execute(_nvfp4, plan, **inputs)


class QuantizeMXFP8(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("QuantCoreQuantizeMXFP8", "Quantize MXFP8", "MXFP8 weights (FP8 e4m3 with a power-of-two scale "
                       "per 32 values): BF16 size halved; needs ComfyUI 0.27 or newer to load.", [])

    @classmethod
    def validate_inputs(cls, **inputs):
        return _validate(_mxfp8, **inputs)

    @classmethod
    def execute(cls, plan, **inputs) -> io.NodeOutput:
        return _execute(_mxfp8, plan, **inputs)


def _nvfp4(**rest) -> dict:
    return dict(rest, format="nvfp4")


def _mxfp8(**rest) -> dict:
    return dict(rest, format="mxfp8")


BUDGET_UNITS = {"bits per weight": "auto_bits", "file GB": "auto_size_gb"}


class QuantizeAuto(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("QuantCoreQuantizeAuto", "Quantize Auto (mixed precision)", "Every layer gets its own format "
                       "(or stays in BF16), chosen from measurements: the least output error, as the target GPU "
                       "computes it, that fits the size budget. With a calibration file the errors are measured on "
                       "its recorded inputs (and weighed by its output gains when it has them); without one, on the "
                       "weight error. The report lists each layer's format, predicted and measured error.", [
            io.Float.Input("budget", default=6.0, min=0.0, max=1e6, step=0.1,
                           tooltip="The size budget: average stored bits per weight of the quantized layers (scales "
                                   "included; BF16 = 16, NVFP4 = 4.5, INT8 ≈ 8), or the whole file's size in GB, as "
                                   "budget_unit says."),
            io.Combo.Input("budget_unit", options=list(BUDGET_UNITS), default="bits per weight",
                           tooltip="bits per weight: --auto-bits; file GB: --auto-size-gb (10^9 bytes)."),
            setting_input("target_gpu", tooltip="The GPU class the file is made for: which formats may be chosen "
                                                "(those it runs with native kernels) and whose computation the errors "
                                                "are measured as. " + quant_core.SETTINGS["target_gpu"][0].help
                                                .split(". ", 1)[1]),
            io.Combo.Input("convrot_group_size", options=CONVROT_GROUPS,
                           default=str(quant_core.SETTINGS["convrot_group_size"][1]),
                           tooltip="Block size of the rotated candidates (INT8 ConvRot, INT4): a power of 4; layers "
                                   "whose input width it does not divide do not get those formats."),
        ])

    @classmethod
    def validate_inputs(cls, **inputs):
        return _validate(_auto, **inputs)

    @classmethod
    def execute(cls, plan, **inputs) -> io.NodeOutput:
        return _execute(_auto, plan, **inputs)


def _auto(budget, budget_unit, target_gpu, convrot_group_size, **rest) -> dict:
    _choice("budget_unit", budget_unit, list(BUDGET_UNITS))
    _choice("convrot_group_size", str(convrot_group_size), CONVROT_GROUPS)
    _choice("target_gpu", target_gpu, list(quant_core.SETTINGS["target_gpu"][0].choices))
    return dict(rest, format=quant_core.SETTINGS["format"][1], target_gpu=target_gpu,
                convrot_group_size=int(convrot_group_size), **{BUDGET_UNITS[budget_unit]: budget})
