"""ComfyUI entry point of this node pack.

The nodes arrive with the node-pack issue; until then the pack registers nothing and loads cleanly both inside
ComfyUI and as a plain directory on sys.path (the engine lives in `quant_core/`, which never imports comfy).
"""
WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["WEB_DIRECTORY", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
