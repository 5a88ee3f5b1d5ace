"""What the nodes share: their menu category and the custom link type carrying the lazy plan."""
from comfy_api.latest import io

CATEGORY = "quantization"
QuantPlan = io.Custom("QUANT_PLAN")
