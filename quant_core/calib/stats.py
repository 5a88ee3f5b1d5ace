"""Per-layer input statistics (docs/CALIBRATION.md) and their streaming accumulation.

A Linear layer y = x·Wᵀ + b sees inputs x ∈ R^K. What the methods need of those inputs:
the second moment H = E[x xᵀ] (GPTQ/QuIP Hessian, up to a factor 2), its diagonal E[x_k²] when H is too large to
keep, the mean E[x] (bias correction) and max |x_k| (activation scales). Optionally a second H over held-out tokens,
so the report can say how a method does on inputs it did not see.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_HESSIAN_K = 16384  # above this many input features only the diagonal is kept (a [K,K] fp32 H is 1 GiB at 16384)


@dataclass
class InputStats:
    """Statistics of one layer's inputs. Units: the layer's input units; n_tokens counts rows of x."""

    absmax: torch.Tensor  # [K]
    mean_sq: torch.Tensor  # [K]  E[x_k²]
    n_tokens: int
    hessian: torch.Tensor | None = None  # [K, K]  E[x xᵀ]
    mean: torch.Tensor | None = None  # [K]  E[x]
    heldout_hessian: torch.Tensor | None = None  # [K, K]  E[x xᵀ] over held-out tokens
    heldout_mean: torch.Tensor | None = None  # [K]
    input_scale: torch.Tensor | None = None  # [] static activation scale, if the producer wrote one

    @property
    def k(self) -> int:
        return self.absmax.shape[0]

    def second_moment(self) -> torch.Tensor:
        """H = E[x xᵀ], or its diagonal as a matrix when no full H was kept."""
        return self.hessian if self.hessian is not None else torch.diag(self.mean_sq)


class StatsAccumulator:
    """Streaming sums over batches of inputs [T, K]: memory is O(K²) (or O(K) without a Hessian) plus a buffer of
    FLUSH_TOKENS inputs, independent of the number of tokens. Inputs are buffered so that the Gram update is one
    large fp32 matmul per FLUSH_TOKENS tokens (small batches, like one sentence, would each pay a [K,K] pass);
    the running sums are float64 (the [K,K] one only up to K = 4096, fp32 above, to bound memory)."""

    FLUSH_TOKENS = 4096

    def __init__(self, k: int, hessian: bool = True, device=None):
        self.k = k
        self.n = 0
        self.absmax = torch.zeros(k, dtype=torch.float32, device=device)
        self.sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(k, dtype=torch.float64, device=device)
        gram_dtype = torch.float64 if k <= 4096 else torch.float32
        self.gram = torch.zeros(k, k, dtype=gram_dtype, device=device) if hessian and k <= MAX_HESSIAN_K else None
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (any leading shape, last dimension K)."""
        x = x.detach().reshape(-1, self.k)
        if not x.shape[0]:
            return
        self._buffer.append(x.to(device=self.sum.device, dtype=torch.float32, copy=True))
        self._buffered += x.shape[0]
        if self._buffered >= self.FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        x = torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.sum += x.sum(dim=0, dtype=torch.float64)
        self.sum_sq += (x * x).sum(dim=0, dtype=torch.float64)
        if self.gram is not None:
            self.gram += (x.T @ x).to(self.gram.dtype)
        self.n += x.shape[0]

    def result(self) -> InputStats:
        self._flush()
        n = max(self.n, 1)
        hessian = None if self.gram is None else (self.gram / n).float().cpu()
        return InputStats(self.absmax.cpu(), (self.sum_sq / n).float().cpu(), self.n, hessian,
                          (self.sum / n).float().cpu())


def merge_heldout(fit: InputStats, heldout: InputStats) -> InputStats:
    """`fit` with the held-out tokens' second moment and mean attached."""
    fit.heldout_hessian = heldout.second_moment() if heldout.n_tokens else None
    fit.heldout_mean = heldout.mean if heldout.n_tokens else None
    return fit
