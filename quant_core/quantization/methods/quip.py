"""QuIP (`--optimizer quip`, Chee et al. 2023): incoherence processing + LDLQ.

The weight and the Hessian are rotated by an orthogonal T (random signs, then a block Hadamard; or a random
orthogonal matrix with `hadamard=False`), so that no weight or input direction stands out; LDLQ (the GPTQ sweep)
then chooses codes in the rotated basis. Two ways to store the result:

- original space (the default): Ŵ_T is rotated back and re-quantized by round-to-nearest on the format's
  own grid. ComfyUI loads it as any file of that format, but the second rounding adds a full RTN-sized error on
  top of LDLQ's: most of what LDLQ bought is lost (the bench script measures how much).
- ConvRot (`--quip-store-transformed`, and always for `--format int4`, whose weights are stored rotated): T is the
  block Hadamard ComfyUI applies to the activations online (no random signs: ComfyUI would not apply them), the codes
  are stored as chosen, no second rounding. INT8 per-row and INT4. This is LDLQ in ComfyUI's Hadamard basis (with
  those formats, `gptq` does the same computation).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ...calib.stats import InputStats
from ..formats.base import Format, Grid, divide_by_scale
from ...declare import option
from .gptq import GPTQ, GPTQConfig, SweepSettings
from .sweep import SweepConfig

MAX_HADAMARD = 1024  # largest Hadamard block of the original-space transform


def _checkpointed(settings: dict) -> str | None:
    return None if settings["quip_checkpointed"] else "applies with --quip-checkpointed"


@dataclass
class QuipConfig(SweepSettings):
    """QuIP (--optimizer quip)."""

    quip_seed: int = option(0, "--quip-seed", help="seed of the random signs / orthogonal matrices (mixed with a "
                                                   "hash of the layer name)")
    quip_hadamard: bool = option(True, "--quip-hadamard", negatable=True,
                                 help="incoherence by a randomized block Hadamard, or (--no-quip-hadamard) a random "
                                      "orthogonal matrix (QR, O(K³))")
    quip_actorder: bool = option(True, "--quip-actorder", negatable=True, help="activation order in the LDLQ sweep")
    quip_store_transformed: bool = option(
        False, "--quip-store-transformed",
        help="store the weights in ComfyUI's ConvRot form (INT8 per-row + block Hadamard of --convrot-group-size, "
             "applied by ComfyUI online): no second rounding, stock loader")
    quip_checkpointed: bool = option(False, "--quip-checkpointed",
                                     help="keep the inverse-Hessian factor on the CPU during the sweep for large "
                                          "layers (less GPU memory)")
    quip_checkpoint_threshold: int = option(8192, "--quip-checkpoint-threshold", low=1, needs=_checkpointed,
                                            help="input features at or above which --quip-checkpointed applies")
    quip_checkpoint_segments: int = option(4, "--quip-checkpoint-segments", low=1, needs=_checkpointed,
                                           help="row segments of the factor moved to the GPU one at a time")

    def sweep_config(self) -> SweepConfig:
        segments = self.quip_checkpoint_segments if self.quip_checkpointed else 1
        return SweepConfig(self.gptq_damp, self.gptq_block_size, self.quip_actorder, segments,
                           self.quip_checkpoint_threshold)


def sylvester_hadamard(size: int, device=None) -> torch.Tensor:
    """Normalized Hadamard matrix of a power-of-two size."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size ** 0.5


def hadamard_block(k: int) -> int:
    """The largest power of two dividing K, at most MAX_HADAMARD."""
    return min(k & -k, MAX_HADAMARD)


class Incoherence:
    """x ↦ x·T with T orthogonal [K, K]: T = diag(signs)·blockdiag(Hadamard) or a random orthogonal matrix."""

    def __init__(self, k: int, config: QuipConfig, layer: str, device):
        gen = torch.Generator().manual_seed((config.quip_seed * 1_000_003 + zlib.crc32(layer.encode())) % 2**63)
        if config.quip_hadamard:
            self.signs = (torch.randint(0, 2, (k,), generator=gen) * 2 - 1).float().to(device)
            self.block = sylvester_hadamard(hadamard_block(k), device)
            self.matrix = None
        else:
            q, r = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
            self.matrix = (q * torch.sign(torch.diagonal(r))).float().to(device)

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """m·T for m [.., K]."""
        if self.matrix is not None:
            return m @ self.matrix
        n, k = m.shape
        g = self.block.shape[0]
        return ((m * self.signs).reshape(n, k // g, g) @ self.block).reshape(n, k)

    def undo(self, m: torch.Tensor) -> torch.Tensor:
        """m·Tᵀ."""
        if self.matrix is not None:
            return m @ self.matrix.T
        n, k = m.shape
        g = self.block.shape[0]
        return ((m.reshape(n, k // g, g) @ self.block.T).reshape(n, k)) * self.signs


class QuIP:
    name = "quip"
    needs_stats = True

    def __init__(self, config: QuipConfig | None = None):
        self.config = config or QuipConfig()
        self._ldlq = GPTQ(GPTQConfig(scale_search=self.config.scale_search), self.config.sweep_config())

    def codes(self, fmt: Format, grid: Grid, layer: str, stats: InputStats | None = None) -> torch.Tensor:
        if fmt.rotation_group:  # int8 ConvRot, int4: ComfyUI's Hadamard basis, stored as chosen
            return self._ldlq.codes(fmt, grid, layer, stats)
        return self._original_space(fmt, grid, layer, stats)

    def _original_space(self, fmt: Format, grid: Grid, layer: str, stats: InputStats | None) -> torch.Tensor:
        n, k = grid.extra["shape"]
        weight = grid.work[:n, :k]
        transform = Incoherence(k, self.config, layer, weight.device)
        rotated = transform.apply(weight)
        rotated_stats = None
        if stats is not None:
            h = stats.second_moment().to(weight.device)
            rotated_h = transform.apply(transform.apply(h).T.contiguous())  # Tᵀ·H·T
            rotated_stats = InputStats(stats.absmax, torch.diagonal(rotated_h).clone(), stats.n_tokens,
                                       rotated_h if stats.hessian is not None else None)
        inner = fmt.grid(rotated)
        approx = fmt.reconstruct(self._ldlq.codes(fmt, inner, layer, rotated_stats), inner)
        back = grid.work.clone()
        back[:n, :k] = transform.undo(approx)
        return fmt.round(divide_by_scale(back, grid.scale))  # the re-quantization the original-space mode costs
