"""The two places a quantized layer is declared to ComfyUI (docs/FORMATS.md, "Markers"): a `<layer>.comfy_quant`
tensor holding the layer's JSON settings, and the `_quantization_metadata` header entry listing every layer's."""
from __future__ import annotations

import json

import torch

MARKER = ".comfy_quant"
MARKER_SUFFIX = "comfy_quant"
QUANT_METADATA_KEY = "_quantization_metadata"
METADATA_FORMAT_VERSION = "1.0"
MAX_JSON_BYTES = 1 << 20  # a marker or metadata entry larger than this is not one ComfyUI wrote or reads
# marker keys of every format (each format's contract adds the ones it reads, e.g. convrot, group_size)
COMMON_FIELDS = ("format", "orig_dtype", "full_precision_matrix_mult")


def marker_tensor(conf: dict) -> torch.Tensor:
    """The `.comfy_quant` marker: a 1-D uint8 tensor holding the UTF-8 bytes of the JSON object."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_marker(raw: bytes) -> dict:
    """The JSON object of a marker's bytes; ValueError with the reason when it is not one."""
    if not raw.strip(b"\x00"):
        raise ValueError("marker is NUL-filled")
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"marker is {len(raw)} bytes, more than {MAX_JSON_BYTES}")
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("marker is not UTF-8 JSON") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise ValueError("marker JSON must be an object with a 'format' string")
    return conf


def read_marker(reader, key: str) -> dict:
    """The JSON object of the marker tensor `key` in a reader (with .info and .get_tensor); ValueError with the
    reason when it is not one. The tensor is read only when its size is plausible."""
    info = reader.info(key)
    if info.dtype != "U8" or len(info.shape) != 1 or info.numel == 0:
        raise ValueError(f"marker must be a non-empty 1-D U8 tensor, got {info.dtype} {list(info.shape)}")
    if info.numel > MAX_JSON_BYTES:
        raise ValueError(f"marker is {info.numel} bytes, more than {MAX_JSON_BYTES}")
    return decode_marker(reader.get_tensor(key).numpy().tobytes())


def decode_header_metadata(raw) -> tuple[dict, dict]:
    """(the whole object, its 'layers' object) of a `_quantization_metadata` header value; ValueError when it is
    not JSON with a 'layers' object (also when nested too deep to decode)."""
    try:
        meta = json.loads(raw)
        layers = meta["layers"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{QUANT_METADATA_KEY} is not JSON with a 'layers' object") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{QUANT_METADATA_KEY} is not JSON with a 'layers' object")
    return meta, layers


def header_metadata(layers: dict[str, dict]) -> str:
    """The `_quantization_metadata` header value for these layers' marker objects."""
    return json.dumps({"format_version": METADATA_FORMAT_VERSION, "layers": layers})
