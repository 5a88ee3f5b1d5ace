"""Test helpers: write a calibration statistics file (FORMATS.md §4) and record real input absmax with hooks."""
from __future__ import annotations

import torch
from safetensors.torch import save_file


def write_calibration(path: str, absmax: dict[str, torch.Tensor], input_scale: dict | None = None,
                      fmt: str = "quant_calibration") -> str:
    tensors = {f"{layer}.input_absmax": a.float().contiguous() for layer, a in absmax.items()}
    tensors |= {f"{layer}.input_scale": torch.tensor(float(s)) for layer, s in (input_scale or {}).items()}
    tensors |= {f"{layer}.n_tokens": torch.tensor(1000, dtype=torch.int64) for layer in absmax}
    save_file(tensors, path, metadata={"format": fmt, "version": "1", "source": "tests"})
    return path


def record_absmax(model: torch.nn.Module, run, prefix: str = "") -> dict[str, torch.Tensor]:
    """max |x_k| of every nn.Linear's input while `run()` executes; names as in the state dict (with `prefix`)."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, out, name=prefix + name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
                absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return absmax
