"""Load Safetensors and Merge LoRA: they only name files and add steps to the plan; nothing is read here."""
from __future__ import annotations

import math

from comfy_api.latest import io

from .. import quant_core
from ..quant_core import QuantError
from . import paths
from .recipe import LoraStep, QuantRecipe, file_fingerprint, require_plan
from .types import CATEGORY, QuantPlan


class LoadSafetensors(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreLoadSafetensors",
            display_name="Load Safetensors (for quantization)",
            category=CATEGORY,
            description="Names a floating-point checkpoint from ComfyUI's model folders as the source of a quantization "
                        "plan. Nothing is loaded into memory: Save Quantized streams the file layer by layer.",
            inputs=[io.Combo.Input("model", options=paths.list_files(paths.SOURCE_FOLDERS),
                                   tooltip="A .safetensors file from diffusion_models, checkpoints, text_encoders or "
                                           "loras (the folder is part of the name).")],
            outputs=[QuantPlan.Output(display_name="plan", tooltip="The lazy quantization plan (file path + pending "
                                                                   "steps), consumed by the next node.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model):
        try:  # an edited or replaced file re-runs the chain; a missing one is reported by validation
            return file_fingerprint(paths.resolve(model, paths.SOURCE_FOLDERS))
        except (ValueError, OSError):
            return model

    @classmethod
    def validate_inputs(cls, model):
        return _check(lambda: paths.resolve(model, paths.SOURCE_FOLDERS))

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        path = paths.resolve(model, paths.SOURCE_FOLDERS)
        return io.NodeOutput(QuantRecipe(source=path, source_name=model, fingerprint=file_fingerprint(path)))


class MergeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreMergeLoRA",
            display_name="Merge LoRA (before quantization)",
            category=CATEGORY,
            description="Adds a LoRA to the plan: its delta is merged into the weights in full precision while Save "
                        "Quantized streams them, before rounding. Chain several nodes for several LoRAs. Kohya, "
                        "diffusers/PEFT, BFL/ComfyUI, LyCORIS (LoCon, LoHa, LoKr) and diff LoRAs are recognised.",
            inputs=[
                QuantPlan.Input("plan", tooltip="The plan from Load Safetensors or another step."),
                io.Combo.Input("lora", options=paths.list_files(paths.LORA_FOLDERS),
                               tooltip="A LoRA from ComfyUI's loras folder."),
                io.Float.Input("strength", default=1.0, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.05,
                               tooltip="Multiplier of the LoRA's delta (1.0 = as trained; the LoRA's own alpha is "
                                       "applied too)."),
            ],
            outputs=[QuantPlan.Output(display_name="plan", tooltip="The plan with this LoRA merge added.")],
        )

    @classmethod
    def fingerprint_inputs(cls, plan=None, lora=None, strength=None):
        try:
            return (lora, strength, file_fingerprint(paths.resolve(lora, paths.LORA_FOLDERS)))
        except (ValueError, OSError):
            return (lora, strength)

    @classmethod
    def validate_inputs(cls, lora, strength):
        problem = _strength_problem(strength)
        return problem or _check(lambda: paths.resolve(lora, paths.LORA_FOLDERS))

    @classmethod
    def execute(cls, plan: QuantRecipe, lora, strength) -> io.NodeOutput:
        plan = require_plan(plan)
        problem = _strength_problem(strength)
        if problem:
            raise ValueError(problem)
        path = paths.resolve(lora, paths.LORA_FOLDERS)
        _check_lora_matches(plan, path, strength)
        return io.NodeOutput(plan.with_lora(LoraStep(path, lora, float(strength))))


STRENGTH_RANGE = (-10.0, 10.0)  # ComfyUI skips its own min/max check for nodes with validate_inputs


def _strength_problem(strength) -> str | None:
    low, high = STRENGTH_RANGE
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not low <= strength <= high:
        return f"strength must be a number between {low:g} and {high:g}, got {strength!r}"
    return None


def _check_lora_matches(plan: QuantRecipe, lora_path: str, strength: float) -> None:
    """Fail here (not minutes later in Save) when the LoRA does not fit the model: reads headers only. (A graph's
    model is checked when Save starts, before anything is written.)"""
    if plan.computed is not None:
        return
    try:
        quant_core.check_lora(plan.source, lora_path, strength)
    except QuantError as e:
        raise ValueError(str(e)) from None


def _check(resolve) -> bool | str:
    try:
        resolve()
    except ValueError as e:
        return str(e)
    return True
