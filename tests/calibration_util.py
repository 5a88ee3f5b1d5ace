"""Test helpers: write a calibration statistics file (FORMATS.md §4) with given input absmax; record real ones."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from quant_core.calib import record_activation_stats


def write_calibration(path: str, absmax: dict[str, torch.Tensor], input_scale: dict | None = None,
                      fmt: str = "quant_calibration") -> str:
    tensors = {f"{layer}.input_absmax": a.float().contiguous() for layer, a in absmax.items()}
    tensors |= {f"{layer}.input_scale": torch.tensor(float(s)) for layer, s in (input_scale or {}).items()}
    tensors |= {f"{layer}.n_tokens": torch.tensor(1000, dtype=torch.int64) for layer in absmax}
    save_file(tensors, path, metadata={"format": fmt, "version": "1", "source": "tests"})
    return path


def record_absmax(model: torch.nn.Module, run, prefix: str = "") -> dict[str, torch.Tensor]:
    """max |x_k| of every nn.Linear's input while `run()` executes; names as in the state dict (with `prefix`)."""
    recorded = record_activation_stats(model, run, hessian=False, prefix=prefix)
    return {name: stats.absmax for name, stats in recorded.items()}
