"""The column loop of one LDLQ/GPTQ block as one Triton kernel (CUDA, INT8 and FP8 e4m3 grids).

Rows are independent inside a block: each program keeps a tile of rows × block columns in registers and walks the
columns in order — round, error, update of the later columns — so a block costs one launch instead of ~10 small
kernels per column. Same arithmetic as the eager loop; the update may be fused into an FMA, so a code can differ
from the eager loop's in a rare exact tie (tested: equal output error). Optional: without Triton or CUDA, or for
other formats, `block_runner` returns None and the caller uses the CUDA-graph or eager loop.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the eager loop is used
    triton = None

ROWS_PER_PROGRAM = 32

if triton is not None:
    @triton.jit
    def _block_kernel(w_ptr, d_ptr, s_ptr, l_ptr, q_ptr, e_ptr, n, stride_w, stride_d, stride_dc, stride_s, stride_sc,
                      stride_l, stride_lc, stride_q, stride_e, qmax, WIDTH: tl.constexpr, ROWS: tl.constexpr, FP8: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, WIDTH)
        live = rows < n
        tile = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=live[:, None], other=0.0)
        for i in range(WIDTH):
            column = tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)
            divisor = tl.load(d_ptr + rows * stride_d + i * stride_dc, mask=live, other=1.0)
            scale = tl.load(s_ptr + rows * stride_s + i * stride_sc, mask=live, other=0.0)
            scaled = column / divisor
            if FP8:
                code = tl.minimum(tl.maximum(scaled, -qmax), qmax).to(tl.float8e4nv).to(tl.float32)
            else:
                code = tl.minimum(tl.maximum(tl.extra.cuda.libdevice.rint(scaled), -qmax), qmax)
            pivot = tl.load(l_ptr + i * stride_l + i * stride_lc)
            error = (column - code * scale) / pivot
            factor = tl.load(l_ptr + i * stride_l + cols * stride_lc, mask=cols >= i, other=0.0)
            tile = tile - error[:, None] * factor[None, :]
            tl.store(q_ptr + rows * stride_q + i, code, mask=live)
            tl.store(e_ptr + rows * stride_e + i, error, mask=live)


def block_runner(round_fn, width: int, device: torch.device):
    """A callable running one full-width block with the kernel, or None where it does not apply."""
    fmt = getattr(round_fn, "__self__", None)
    name = getattr(fmt, "name", None)
    if triton is None or device.type != "cuda" or name not in ("int8_tensorwise", "float8_e4m3fn"):
        return None
    fp8, qmax = (True, 448.0) if name == "float8_e4m3fn" else (False, 127.0)

    def run(weights, scales, divisors, codes, u_block, start, end, seg_start) -> torch.Tensor:
        n = weights.shape[0]
        block = weights[:, start:end]
        local = u_block[:, start - seg_start:end - seg_start]
        out_codes = torch.empty((n, width), device=device)
        errors = torch.empty((n, width), device=device)
        d, s = divisors[:, start:end], scales[:, start:end]
        grid = (triton.cdiv(n, ROWS_PER_PROGRAM),)
        _block_kernel[grid](block, d, s, local, out_codes, errors, n, block.stride(0), d.stride(0), d.stride(1),
                            s.stride(0), s.stride(1), local.stride(0), local.stride(1), out_codes.stride(0), errors.stride(0), qmax, WIDTH=width,
                            ROWS=ROWS_PER_PROGRAM, FP8=fp8)
        codes[:, start:end] = out_codes
        return errors

    return run
