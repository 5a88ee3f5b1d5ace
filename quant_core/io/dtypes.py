"""The safetensors dtype table: tag ↔ torch dtype ↔ element size (bytes)."""
import torch

# One source of truth: safetensors tag -> (torch dtype, bytes per element).
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_DTYPES["F8_E8M0"] = (torch.float8_e8m0fnu, 1)

TORCH_TO_TAG: dict[torch.dtype, str] = {dtype: tag for tag, (dtype, _) in SAFETENSORS_DTYPES.items()}

FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16"})  # values that need no scale to be read as numbers
INTEGER_TAGS = frozenset({"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"})


def element_size(tag: str) -> int:
    return SAFETENSORS_DTYPES[tag][1]


def torch_dtype(tag: str) -> torch.dtype:
    return SAFETENSORS_DTYPES[tag][0]


def tag_of(dtype: torch.dtype) -> str:
    return TORCH_TO_TAG[dtype]
