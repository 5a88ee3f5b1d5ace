"""Thin ComfyUI V3 nodes over quant_core: widgets, validation, folder confinement, progress, interruption.

No math lives here. Links carry a lazy plan (`recipe.QuantRecipe`, link type QUANT_PLAN); Save Quantized runs it
through `quant_core.convert`. Imported only inside ComfyUI (it needs comfy_api and folder_paths).
"""
