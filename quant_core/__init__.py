"""quant_core: turn safetensors checkpoints into quantized files that stock ComfyUI loads.

ComfyUI-free (torch, safetensors, tqdm, comfy-kitchen for verification). The public API, used by the ComfyUI nodes
and by scripts:

    import quant_core
    result = quant_core.quantize(input="model.safetensors", output="model_int8.safetensors", format="int8")
    print(result.report.summary())

Settings are keywords with the CLI's long-flag names (`gptq_damp` for `--gptq-damp`); `quant_core.SETTINGS` lists
each with its declaration (default, help, allowed values), and `quant_core.Job.build` checks a set of them.
"""
from __future__ import annotations

from .version import __version__


def quantize(input, output: str | None = None, on_layer=None, **settings):
    """Convert `input` (a .safetensors path, or a `ComputedSource`) to a quantized file. Keyword settings: see `SETTINGS`; a setting that has no effect with the
    others is refused (QuantError). `on_layer(done, total)` is called after each layer. Returns a `ConvertResult`
    (output path, plan, quality report, verify result)."""
    from .job import Job
    from .pipeline import convert
    settings.setdefault("progress", False)
    return convert(input, output, Job.build(settings), on_layer)


def verify(path: str, reference: str | None = None, allow_legacy: bool = False):
    """Check a file against ComfyUI's loading contract; see `quant_core.verify.verify_file`."""
    from .verify import verify_file
    return verify_file(path, reference, allow_legacy)


def __getattr__(name: str):
    """The rest of the public API, imported on first use (importing the package stays cheap)."""
    if name in ("Job", "SETTINGS", "combine_settings", "given_by_value"):
        from . import job
        return getattr(job, name)
    if name == "QuantError":
        from .errors import QuantError
        return QuantError
    if name == "PRESETS":
        from .select.presets import PRESETS
        return PRESETS
    if name == "METHODS":
        from .quantization.methods import METHODS
        return METHODS
    if name in ("convert", "ConvertResult"):
        from . import pipeline
        return getattr(pipeline, name)
    if name in ("verify_file", "VerifyResult"):
        from . import verify as verify_module
        return getattr(verify_module, name)
    if name == "sqnr_from_rel_error":
        from .report import sqnr_from_rel_error
        return sqnr_from_rel_error
    if name == "warn_below_db":  # a format's warning level (the quality chart)
        from .quantization.runtime import warn_below_db
        return warn_below_db
    if name == "check_lora":
        from .transform.lora.merge import check_lora
        return check_lora
    if name == "capture":  # capture sessions and their calibration files (the ComfyUI capture nodes)
        from .calib import capture
        return capture
    if name in ("ComputedSource", "SourceTensor"):  # a model held elsewhere, computed tensor by tensor (Plan from MODEL)
        from .io import source
        return getattr(source, name)
    if name in ("KEEP", "QUANTIZE"):
        from .select import plan
        return getattr(plan, name)
    raise AttributeError(f"module 'quant_core' has no attribute {name!r}")


__all__ = ["quantize", "verify", "Job", "SETTINGS", "QuantError", "PRESETS", "METHODS", "convert", "ConvertResult",
           "verify_file", "VerifyResult", "sqnr_from_rel_error", "warn_below_db", "check_lora", "combine_settings",
           "given_by_value", "KEEP", "QUANTIZE", "capture", "ComputedSource", "SourceTensor", "__version__"]
