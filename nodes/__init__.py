"""Thin ComfyUI node adapters over quant_core (added by the node-pack issue)."""
