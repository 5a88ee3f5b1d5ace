"""ComfyUI entry point of this node pack (V3 registration: `comfy_entrypoint`, never NODE_CLASS_MAPPINGS too —
ComfyUI ignores the entry point when both exist).

Importing this file needs nothing from ComfyUI; the nodes (and comfy_api) are imported only when ComfyUI calls the
entry point. The engine lives in `quant_core/`, which never imports comfy.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import QuantCoreExtension
    return QuantCoreExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
