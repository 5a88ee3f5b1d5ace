"""The cuBLAS "blocked" (swizzled) layout of block-scale matrices used by nvfp4 and mxfp8 (docs/FORMATS.md).

Element (r, c) of the logical scale matrix S[R, C] sits at flat offset
((r//128)·ceil(C/4) + c//4)·512 + (r%32)·16 + ((r%128)//32)·4 + (c%4) of a [roundup(R,128), roundup(C,4)] matrix.
"""
import torch


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def blocked_shape(rows: int, cols: int) -> tuple[int, int]:
    return round_up(rows, 128), round_up(cols, 4)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Swizzle a logical [R, C] scale matrix into the zero-padded [roundup(R,128), roundup(C,4)] blocked layout."""
    rows, cols = scales.shape
    padded_rows, padded_cols = blocked_shape(rows, cols)
    padded = scales.new_zeros((padded_rows, padded_cols))
    padded[:rows, :cols] = scales
    tiles = padded.view(padded_rows // 128, 4, 32, padded_cols // 4, 4)
    return tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `to_blocked`: the logical [rows, cols] scale matrix."""
    padded_rows, padded_cols = blocked_shape(rows, cols)
    tiles = blocked.reshape(padded_rows // 128, padded_cols // 4, 32, 4, 4)
    return tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)[:rows, :cols]


def pad_to(weight: torch.Tensor, row_multiple: int, col_multiple: int) -> torch.Tensor:
    """Zero-pad an [N, K] matrix up to multiples of the given sizes (no copy if already aligned)."""
    rows, cols = weight.shape
    padded_rows, padded_cols = round_up(rows, row_multiple), round_up(cols, col_multiple)
    if (padded_rows, padded_cols) == (rows, cols):
        return weight
    return torch.nn.functional.pad(weight, (0, padded_cols - cols, 0, padded_rows - rows))
