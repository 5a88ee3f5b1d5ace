"""SmoothQuant: adds the exact-fold smoothing step to the plan (the engine does the math while saving)."""
from __future__ import annotations

import math

from comfy_api.latest import io

from . import paths
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
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Migration strength α: s = absmax(x)^α / absmax(w)^(1−α); 0.5 balances "
                                       "activation and weight ranges."),
            ],
            outputs=[QuantPlan.Output(display_name="plan", tooltip="The plan with smoothing added.")],
        )

    @classmethod
    def validate_inputs(cls, calibration, alpha):
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            return f"alpha must be between 0 and 1, got {alpha}"
        try:
            paths.resolve(calibration, paths.CALIBRATION_FOLDERS)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, plan, calibration, alpha) -> io.NodeOutput:
        problem = cls.validate_inputs(calibration, alpha)
        if problem is not True:
            raise ValueError(problem)
        path = paths.resolve(calibration, paths.CALIBRATION_FOLDERS)
        return io.NodeOutput(plan.with_transform(smoothquant=True, smoothquant_alpha=float(alpha), calibration_data=path))
