"""Per-layer progress bar and interruption for long-running nodes (ComfyUI's own mechanisms)."""
from __future__ import annotations


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


def layer_progress():
    """An `on_layer(done, total)` callback for `quant_core.convert`: checks Cancel and moves the node's progress bar.
    Raising here aborts the conversion; the engine then removes its temporary file, so no partial output remains."""
    import comfy.utils
    bar = None

    def on_layer(done: int, total: int) -> None:
        nonlocal bar
        check_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return on_layer
