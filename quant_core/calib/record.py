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


def record_output_gains(module: torch.nn.Module, run_fn: Callable[[Callable[[torch.Tensor], None]], object],
                        seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """How much noise added to each Linear layer's output reaches the model's output Y, to first order: per layer
    and output channel n, gain_n = mean over tokens of (∂⟨v, Y⟩/∂y_n)² with v ~ N(0, I) drawn per run, so that
    noise of per-token energy e_n in channel n adds Σ_n gain_n·e_n to E‖Y_t‖² (E_v (vᵀJ)² = ‖J‖²: one backward pass
    per run measures every layer at once). `run_fn(probe)` runs the model with gradients enabled and calls
    `probe(Y)` once per model run with its output [..., D] (padding removed). Returns (layer → gain [N], the mean
    E‖Y_t‖² per token of Y). The module's parameters are left without gradients."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    energy = [0.0, 0]  # Σ‖Y_t‖², tokens
    generator = torch.Generator().manual_seed(seed)

    def hook_for(name: str):
        def hook(mod, inputs, output):
            sums.setdefault(name, (torch.zeros(output.shape[-1]), 0))  # run, but no gradient may reach it: gain 0
            if not output.requires_grad and output.is_floating_point():
                output.requires_grad_(True)  # nothing before it needs gradients: the graph starts here
            if output.requires_grad:
                def on_grad(grad):
                    g = grad.detach().reshape(-1, grad.shape[-1]).float()
                    total, rows = sums[name]
                    sums[name] = (total.to(g.device) + g.square().sum(0), rows + g.shape[0])
                output.register_hook(on_grad)
        return hook

    def probe(y: torch.Tensor) -> None:
        y = y.reshape(-1, y.shape[-1])
        v = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
        (y * v).sum().backward()
        energy[0] += float(y.detach().float().square().sum())
        energy[1] += y.shape[0]

    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(hook_for(name)))
    wanted = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)  # gradients flow through the activations only (no parameter gradients kept)
    try:
        with torch.enable_grad():
            run_fn(probe)
    finally:
        for handle in handles:
            handle.remove()
        for p, w in zip(module.parameters(), wanted):
            p.requires_grad_(w)
    gains = {name: (total / max(rows, 1)).cpu() for name, (total, rows) in sums.items()}
    return gains, energy[0] / max(energy[1], 1)
