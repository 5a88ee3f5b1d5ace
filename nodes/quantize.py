"""Quantize INT8 / FP8 / NVFP4 / MXFP8: choose the format and the engine's selection settings for the plan.

The node validates its settings through the engine itself (`QuantOptions.validate`, the layer-config parser), both
in `validate_inputs` and again in `execute`, because older servers skip combo validation.
"""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..quant_core.errors import QuantError
from ..quant_core.methods import HELP as METHOD_HELP
from ..quant_core.options import METHODS, QuantOptions
from ..quant_core.select.layer_config import load_layer_config
from ..quant_core.select.presets import PRESETS
from . import paths
from .recipe import QuantRecipe
from .types import CATEGORY, QuantPlan

NO_PRESET = "none"
SYNTHETIC = "synthetic"


def _common_inputs() -> list:
    return [
        QuantPlan.Input("plan", tooltip="The plan from Load Safetensors, Merge LoRA or SmoothQuant."),
        io.Combo.Input("method", options=list(METHODS), default="rtn",
                       tooltip="How codes are chosen on the scale grid. " + "; ".join(
                           f"{m}: {METHOD_HELP.get(m, m)}" for m in METHODS)),
        io.Combo.Input("calibration", options=[SYNTHETIC, *paths.list_files(paths.CALIBRATION_FOLDERS)],
                       default=SYNTHETIC,
                       tooltip="Input statistics for GPTQ/QuIP and bias correction: a calibration file from "
                               "models/quant_calibration (python -m quant_core calibrate …), or synthetic inputs "
                               "(then GPTQ/QuIP behave like round-to-nearest and bias correction is skipped)."),
        io.Boolean.Input("bias_correction", default=True,
                         tooltip="With a calibration file: add (W − Ŵ)·E[x] to each quantized layer's bias, "
                                 "removing the mean output shift that rounding causes."),
        io.Float.Input("gptq_damp", default=0.1, min=0.0, max=5.0, step=0.01,
                       tooltip="GPTQ/QuIP Hessian dampening, as a fraction of mean(diag H); 0.1 measured best with "
                               "about 1,000 calibration tokens, smaller values suit larger calibration sets."),
        io.Combo.Input("preset", options=[NO_PRESET, *PRESETS], default=NO_PRESET,
                       tooltip="Model preset: which layers stay in high precision or are removed (the converter's "
                               "--flux2, --t5xxl, --wan … presets). " + "; ".join(
                                   f"{name}: {p.help}" for name, p in PRESETS.items())),
        io.String.Input("exclude_layers", default="", tooltip="Regular expression: layers whose name matches stay in "
                                                              "high precision (empty = none)."),
        io.Boolean.Input("keep_io_layers", default=True,
                         tooltip="Keep input embedders and the first/last layers in high precision (recommended: "
                                 "ComfyUI detects the architecture from some of their shapes)."),
        io.Boolean.Input("full_precision_matrix_mult", default=False,
                         tooltip="Store quantized but compute in the model's dtype (ComfyUI reads this per layer)."),
        io.String.Input("layer_config", default="", multiline=True,
                        tooltip="Optional per-layer rules as JSON, the same schema as --layer-config (see the README); "
                                "empty = none."),
    ]


def _settings(format: str, method: str, calibration: str, bias_correction: bool, gptq_damp: float, preset: str,
              exclude_layers: str, keep_io_layers: bool, full_precision_matrix_mult: bool, layer_config: str,
              **format_fields) -> dict:
    """The QuantOptions fields a Quantize node sets; raises QuantError with a one-line message."""
    fields = dict(format=format, method=method, presets=() if preset == NO_PRESET else (preset,),
                  exclude_layers=exclude_layers.strip() or None, quantize_io_layers=not keep_io_layers,
                  full_precision_matrix_mult=full_precision_matrix_mult, bias_correction=bias_correction,
                  gptq_damp=gptq_damp, calibration_data=_calibration_path(calibration), **format_fields)
    if layer_config.strip():
        try:
            fields["layer_config"] = json.loads(layer_config)
        except ValueError as e:
            raise QuantError(f"layer_config: malformed JSON: {e}") from None
    options = QuantOptions(**fields).validate()
    if options.layer_config is not None:
        load_layer_config(options.layer_config, options)
    return fields


def _calibration_path(name: str) -> str | None:
    if name == SYNTHETIC:
        return None
    try:
        return paths.resolve(name, paths.CALIBRATION_FOLDERS)
    except ValueError as e:
        raise QuantError(str(e)) from None


def _validate(node_fields, plan=None, **inputs) -> bool | str:
    """`node_fields` maps the node's own widgets to QuantOptions fields (and checks its combos)."""
    try:
        _settings(**node_fields(**inputs))
    except QuantError as e:
        return str(e)
    return True


def _execute(node_fields, plan: QuantRecipe, **inputs) -> io.NodeOutput:
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
            io.Combo.Input("convrot_group_size", options=CONVROT_GROUPS, default="256",
                           tooltip="ConvRot block size (a power of 4; the input width must be a multiple of it)."),
            io.Boolean.Input("quip_convrot_storage", default=True,
                             tooltip="Method quip only: store the weights in ComfyUI's ConvRot form (the rotation "
                                     "ComfyUI applies online), keeping QuIP's gain; off re-quantizes in the original "
                                     "space (the converter's default), which loses most of it."),
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
    quip_native = quip_convrot_storage and rest.get("method") == "quip"
    return dict(rest, format="int8", scaling_mode=scaling, convrot=convrot, convrot_group_size=int(convrot_group_size),
                quip_store_transformed=quip_native)


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
