"""Rebuild a full-precision state dict from a quantized file (what ComfyUI computes with), for evaluation."""
from __future__ import annotations

import json

import torch

from .io.reader import SafetensorsReader
from .verify import MARKER, SCALE_SUFFIXES, rebuild_layer


def load_dequantized(path: str, shapes: dict[str, tuple[int, int]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """State dict with every quantized layer dequantized through comfy-kitchen's layouts. `shapes` gives the
    original [N, K] of each quantized weight (needed to crop nvfp4/mxfp8 padding); other tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    with SafetensorsReader(path) as reader:
        keys = set(reader.keys())
        layers = {k[: -len(MARKER)] for k in keys if k.endswith(MARKER)}
        skip = {f"{layer}.{s}" for layer in layers for s in SCALE_SUFFIXES + ("comfy_quant",)}
        for key in reader.keys():
            if key in skip:
                continue
            layer = key[: -len(".weight")] if key.endswith(".weight") else None
            if layer in layers:
                conf = json.loads(reader.get_tensor(f"{layer}{MARKER}").numpy().tobytes())
                out[key] = rebuild_layer(reader, keys, layer, conf, shapes[key]).to(dtype)
            else:
                tensor = reader.get_tensor(key)
                out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out
