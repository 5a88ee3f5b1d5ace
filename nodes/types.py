"""What the nodes share: their menu category and the custom link types (the lazy plan, a capture, a calibration
file)."""
from comfy_api.latest import io

CATEGORY = "quantization"
QuantPlan = io.Custom("QUANT_PLAN")
QuantCapture = io.Custom("QUANT_CAPTURE")  # a capture session (Capture Calibration → Save Calibration)
QuantCalibration = io.Custom("QUANT_CALIBRATION")  # a saved calibration file (Save Calibration → Quantize)
