"""The GPTQ column loop of one block replayed as a CUDA graph (see `GraphedBlock`)."""
from __future__ import annotations

import torch

from ..columns import column_loop


class GraphedBlock:
    """The per-column loop of one full-width block, captured once as a CUDA graph and replayed for every block.

    The loop is ~10 small kernels per column; at K = 12288 launching them one by one dominates the whole sweep
    (docs/METHODS.md). Replaying the captured graph runs the same kernels in the same order
    (identical codes) without the per-launch cost. CUDA only; `create` returns None where capture is not possible.
    """

    def __init__(self, n: int, width: int, round_fn, device: torch.device):
        self.block, self.divisors, self.scales, self.codes, self.errors = (
            torch.zeros(n, width, device=device) for _ in range(5))
        self.divisors.fill_(1.0)
        self.local = torch.eye(width, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            self._loop(round_fn)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._loop(round_fn)

    @classmethod
    def create(cls, n: int, width: int, round_fn, device: torch.device):
        if device.type != "cuda":
            return None
        try:
            return cls(n, width, round_fn, device)
        except RuntimeError:  # a rounding function that cannot be captured: the eager loop does the same work
            return None

    def _loop(self, round_fn) -> None:
        column_loop(self.block, self.divisors, self.scales, self.local, self.codes, self.errors, round_fn)

    def run(self, weights, scales, divisors, codes, u_block, start, end, seg_start) -> torch.Tensor:
        self.block.copy_(weights[:, start:end])
        self.divisors.copy_(divisors[:, start:end])
        self.scales.copy_(scales[:, start:end])
        self.local.copy_(u_block[:, start - seg_start:end - seg_start])
        self.graph.replay()
        codes[:, start:end] = self.codes
        return self.errors.clone()
