"""Record input statistics from any torch module run: forward hooks on its Linear layers.

The same function serves the `calibrate_activation_scales` tool (a model from a safetensors file and a text or
synthetic driver) and, later, a ComfyUI node that records statistics during real sampling.
"""
from __future__ import annotations

from typing import Callable

import torch

from .stats import SAMPLE_ROWS, InputStats, StatsAccumulator, layer_seed, merge_heldout


def record_activation_stats(module: torch.nn.Module, run_fn: Callable[[], object], layers: Callable[[str], bool] | None = None,
                            hessian: bool = True, heldout_every: int = 0, prefix: str = "",
                            sample_rows: int = SAMPLE_ROWS, seed: int = 0) -> dict[str, InputStats]:
    """Run `run_fn()` (which calls `module` any number of times) and return the input statistics of every
    `torch.nn.Linear` inside `module` whose name passes `layers` (all by default), keyed `prefix + name`.

    heldout_every = n > 0 sends every n-th call of each layer to a separate held-out accumulator (stored as
    `heldout_hessian`), so a report can measure methods on inputs they were not fitted on. `sample_rows` > 0 keeps
    a uniform sample of that many input rows per layer (and per held-out part; reservoirs seeded from `seed` and
    the layer name). Memory: O(K²) per layer with `hessian`, O(K) without, plus sample_rows·K; independent of the
    number of tokens."""
    fit: dict[str, StatsAccumulator] = {}
    held: dict[str, StatsAccumulator] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(mod, inputs, output):
            x = inputs[0]
            calls[name] = calls.get(name, 0) + 1
            heldout = heldout_every > 0 and calls[name] % heldout_every == 0
            target = held if heldout else fit
            if name not in target:
                target[name] = StatsAccumulator(mod.in_features, hessian, device=x.device, sample_rows=sample_rows,
                                                seed=layer_seed(seed, name, heldout))
            target[name].add(x)
        return hook

    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear) and (layers is None or layers(prefix + name)):
            handles.append(mod.register_forward_hook(hook_for(prefix + name)))
    try:
        with torch.no_grad():
            run_fn()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, acc in fit.items():
        stats = acc.result()
        out[name] = merge_heldout(stats, held[name].result()) if name in held else stats
    return out
