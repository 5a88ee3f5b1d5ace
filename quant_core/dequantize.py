"""Rebuild full-precision weights from a quantized file (what ComfyUI computes with): one layer (`rebuild_layer`,
also what `verify --reference` and the benchmark measure) or a whole state dict (`load_dequantized`, for
evaluation). Every layer goes through its format's contract: comfy-kitchen's layouts for the formats upstream
ComfyUI loads, the format's own rules for the fork-only ones."""
from __future__ import annotations

import torch

from .errors import QuantError
from .io.reader import SafetensorsReader
from .quantization.formats import COMPANION_SUFFIXES, CONTRACTS
from .quantization.formats.markers import MARKER, MARKER_SUFFIX, read_marker


def quantized_layers(reader) -> dict[str, dict]:
    """layer → marker object of every quantized layer in `reader`; QuantError for a marker that is not one or
    names a format no contract describes."""
    confs = {}
    for key in reader.keys():
        if key.endswith(MARKER):
            try:
                conf = read_marker(reader, key)
            except ValueError as e:
                raise QuantError(f"{key}: {e}") from None
            if conf["format"] not in CONTRACTS:
                raise QuantError(f"{key}: unknown format {conf['format'][:100]!r}")
            confs[key[: -len(MARKER)]] = conf
    return confs


def rebuild_layer(reader, keys: set[str], layer: str, conf: dict, shape) -> torch.Tensor:
    """The fp32 logical [N, K] weight of a quantized layer stored in `reader` (whose key set is `keys`), from its
    tensors named exactly `<layer>.<suffix>` for the suffixes of its format's contract."""
    contract = CONTRACTS[conf["format"]]
    tensors = {s: reader.get_tensor(f"{layer}.{s}") for s in contract.suffixes if f"{layer}.{s}" in keys}
    return contract.dequantize(tensors, conf, shape)


def load_dequantized(path: str, shapes: dict[str, tuple[int, int]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """State dict with every quantized layer dequantized through its format's contract. `shapes` gives the
    original [N, K] of each quantized weight (needed to crop nvfp4/mxfp8 padding); other tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    with SafetensorsReader(path) as reader:
        keys = set(reader.keys())
        try:
            confs = quantized_layers(reader)
        except QuantError as e:
            raise QuantError(f"{path}: {e}") from None
        skip = {f"{layer}.{s}" for layer in confs for s in COMPANION_SUFFIXES + (MARKER_SUFFIX,)}
        for key in reader.keys():
            if key in skip:
                continue
            layer = key[: -len(".weight")] if key.endswith(".weight") else None
            if layer in confs:
                out[key] = rebuild_layer(reader, keys, layer, confs[layer], shapes[key]).to(dtype)
            else:
                tensor = reader.get_tensor(key)
                out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out
