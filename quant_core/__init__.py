"""quant_core: turn safetensors checkpoints into quantized files that stock ComfyUI loads.

ComfyUI-free (torch, safetensors, tqdm, comfy-kitchen for verification). Library use:

    import quant_core
    result = quant_core.quantize(input="model.safetensors", output="model_int8.safetensors", format="int8")
    print(result.report.summary())
"""
from __future__ import annotations

__version__ = "0.1.0"


def quantize(input: str, output: str | None = None, **options):
    """Convert `input` to a quantized file. Keyword options are the fields of `QuantOptions` (same names as the
    CLI's long flags, with underscores). Returns a `ConvertResult` (output path, plan, quality report, verify)."""
    import dataclasses

    from .convert import convert
    from .errors import QuantError
    from .options import QuantOptions
    known = {f.name for f in dataclasses.fields(QuantOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise QuantError(f"unknown option {unknown[0]!r} (options: {', '.join(sorted(known))})")
    options.setdefault("progress", False)
    return convert(input, output, QuantOptions(**options))


def verify(path: str, reference: str | None = None, allow_legacy: bool = False):
    """Check a file against ComfyUI's loading contract; see `quant_core.verify.verify_file`."""
    from .verify import verify_file
    return verify_file(path, reference, allow_legacy)


__all__ = ["quantize", "verify", "__version__"]
