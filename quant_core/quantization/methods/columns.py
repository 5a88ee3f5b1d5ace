"""The inner loop of the GPTQ/LDLQ sweep over the columns of one block (eager reference)."""
from __future__ import annotations


def column_loop(block, divisors, scales, local, codes, errors, round_fn) -> None:
    """The GPTQ recursion inside one block, in place: round column i, divide its error by the pivot U[i, i] and
    subtract error × U[i, i:] from the columns after it. `block`, `divisors`, `scales`, `codes`, `errors` are
    [N, b] views; `local` is the block's [b, b] upper-triangular part of U. The CUDA-graph and Triton kernels in
    `kernels/` run exactly this loop."""
    for i in range(block.shape[1]):
        column = block[:, i]
        code = round_fn(column / divisors[:, i])
        codes[:, i] = code
        error = (column - code * scales[:, i]) / local[i, i]
        block[:, i:] -= error.unsqueeze(1) * local[i, i:].unsqueeze(0)
        errors[:, i] = error
