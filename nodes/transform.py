"""SmoothQuant: adds the exact-fold smoothing step to the plan (the engine does the math while saving)."""
from __future__ import annotations

from comfy_api.latest import io

from .. import quant_core
from ..quant_core import QuantError
from . import paths
from .recipe import require_plan
from .settings import setting_input
from .types import CATEGORY, QuantPlan


class SmoothQuant(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantCoreSmoothQuant",
            display_name="SmoothQuant (before quantization)",
            category=CATEGORY,
            description="Moves activation outliers into the weights (W·diag(s), x·diag(1/s)) only where the model "
                        "computes exactly the same function: 1/s is folded into a preceding norm or value projection "
                        "(T5, Llama/Mistral, BERT). Other layers are left unsmoothed and listed in the report.",
            inputs=[
                QuantPlan.Input("plan", tooltip="The plan from Load Safetensors or Merge LoRA."),
                io.Combo.Input("calibration", options=paths.list_files(paths.CALIBRATION_FOLDERS),
                               tooltip="Calibration statistics (per-layer input_absmax) from models/quant_calibration; "
                                       "make one with `python -m quant_core calibrate`."),
                setting_input("smoothquant_alpha", input_name="alpha", step=0.05),
            ],
            outputs=[QuantPlan.Output(display_name="plan", tooltip="The plan with smoothing added.")],
        )

    @classmethod
    def validate_inputs(cls, calibration, alpha):
        try:
            _settings(calibration, alpha)
        except (ValueError, QuantError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, plan, calibration, alpha) -> io.NodeOutput:
        plan = require_plan(plan)
        try:
            settings = _settings(calibration, alpha)
        except QuantError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(plan.with_transform(**settings))


def _settings(calibration: str, smoothquant_alpha: float) -> dict:
    """The engine settings of this step, checked by the engine."""
    settings = dict(smoothquant=True, smoothquant_alpha=smoothquant_alpha,
                    calibration_data=paths.resolve(calibration, paths.CALIBRATION_FOLDERS))
    quant_core.Job.build(settings)
    return settings
