"""The error-feedback column sweep shared by GPTQ and QuIP (LDLQ is the same recursion, Chee et al. 2023).

Given the work matrix W [N, K] (what the format quantizes), its per-element scale grid S and the second moment
H = E[x xᵀ] of the inputs in the work basis, quantize W column by column; each column's rounding error, weighted by
the inverse Hessian's Cholesky factor U, is pushed onto the columns not yet quantized, so the layer's output error
E‖x(W − Ŵ)ᵀ‖² (not the weight error) is what the rounding minimizes. Frantar et al. 2022, "lazy batch" form:
columns in blocks of `block_size`, the trailing update as one matmul per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import QuantError
from .columns import column_loop
from .kernels.cuda_graph import GraphedBlock
from .kernels.triton_sweep import block_runner


@dataclass
class SweepConfig:
    damp: float = 0.1  # λ = damp · mean(diag H) added to the diagonal (Hessian dampening)
    block_size: int = 128  # columns per lazy batch
    act_order: bool = True  # quantize columns with the largest E[x_k²] first
    offload_segments: int = 1  # > 1: keep U on the CPU, move it to the device in this many row segments …
    offload_min_k: int = 0  # … for layers with at least this many input features


def inverse_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU); λ grows ×10 until H is positive definite.

    With P the order-reversing permutation and L the lower Cholesky factor of P(H + λI)P, U = P·L⁻¹·P: one
    factorization and one triangular solve, instead of factorize → invert → factorize again (the factors agree to
    5e-6 relative)."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # an input that was always zero: any code is as good as another; keep H invertible
    level = damp * float(diag.mean())
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex((h + level * eye).flip(0, 1))
        if int(info) == 0:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
        level = max(level * 10, 1e-8)
    raise QuantError("the calibration Hessian is not positive definite even with strong dampening")


def sweep(work: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor, round_fn, config: SweepConfig) -> torch.Tensor:
    """Codes (in scaled units, shape of `work`) chosen by the error-feedback sweep. `round_fn` snaps scaled values
    to the format's codes; `scale` broadcasts to `work`."""
    n, k = work.shape
    scales = scale.expand(n, k).float()
    weights = work.float().clone()
    h = hessian.to(device=work.device, dtype=torch.float32)
    perm = torch.argsort(torch.diagonal(h), descending=True) if config.act_order else None
    if perm is not None:
        weights, scales, h = weights[:, perm], scales[:, perm], h[perm][:, perm]
    divisors = torch.where(scales == 0, torch.full_like(scales, float("inf")), scales)
    upper = inverse_factor(h, config.damp)
    del h
    codes = _sweep_blocks(weights, scales, divisors, upper, round_fn, config)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _offloads(k: int, config: SweepConfig) -> bool:
    return config.offload_segments > 1 and k >= config.offload_min_k


def _segments(k: int, config: SweepConfig) -> list[tuple[int, int]]:
    parts = config.offload_segments if _offloads(k, config) else 1
    step = -(-k // parts)
    step = -(-step // config.block_size) * config.block_size
    return [(start, min(start + step, k)) for start in range(0, k, step)]


def _sweep_blocks(weights, scales, divisors, upper, round_fn, config: SweepConfig) -> torch.Tensor:
    n, k = weights.shape
    codes = torch.empty_like(weights)
    fused = block_runner(round_fn, config.block_size, weights.device) if k > config.block_size else None
    graphed = GraphedBlock.create(n, config.block_size, round_fn, weights.device) if k > config.block_size and fused is None else None
    offload = _offloads(k, config)
    host_upper = upper.cpu() if offload else None
    if offload:
        del upper
    for seg_start, seg_end in _segments(k, config):
        # rows seg_start:seg_end of U, from column seg_start on (the only part this segment reads)
        u_seg = host_upper[seg_start:seg_end, seg_start:].to(weights.device) if offload else upper[seg_start:seg_end, seg_start:]
        for start in range(seg_start, seg_end, config.block_size):
            end = min(start + config.block_size, seg_end)
            rows = slice(start - seg_start, end - seg_start)
            u_block = u_seg[rows]  # [b, k - seg_start]
            if fused is not None and end - start == config.block_size:
                errors = fused(weights, scales, divisors, codes, u_block, start, end, seg_start)
            elif graphed is not None and end - start == config.block_size:
                errors = graphed.run(weights, scales, divisors, codes, u_block, start, end, seg_start)
            else:
                errors = _sweep_one_block(weights, scales, divisors, codes, u_block, start, end, seg_start, round_fn)
            if end < k:
                weights[:, end:] -= errors @ u_block[:, end - seg_start:]
        del u_seg
    return codes


def _sweep_one_block(weights, scales, divisors, codes, u_block, start, end, seg_start, round_fn) -> torch.Tensor:
    block = weights[:, start:end]
    errors = torch.empty_like(block)
    local = u_block[:, start - seg_start:end - seg_start]  # [b, b] upper triangular
    column_loop(block, divisors[:, start:end], scales[:, start:end], local, codes[:, start:end], errors, round_fn)
    return errors
