"""`verify`: check a file against the ComfyUI contract (FORMATS.md) and, with the source file, rebuild every
quantized layer through comfy-kitchen's own layout classes and measure its error.

Nothing here knows a format: each layer is checked against, and rebuilt through, its format's contract
(`quantization.formats.CONTRACTS`); markers are read by `formats.markers`.

Cheap checks read the header, the markers and the (small) scale tensors; `reference=` also reads every weight.
"""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field

import torch

from .dequantize import rebuild_layer
from .errors import QuantError
from .io.dtypes import FLOAT_TAGS
from .io.reader import SafetensorsReader
from .io.source import open_source
from .quantization.formats import COMPANION_SUFFIXES, CONTRACTS, WEIGHT_TAGS
from .quantization.formats.contract import value_problem
from .quantization.formats.markers import (MARKER, MARKER_SUFFIX, METADATA_FORMAT_VERSION, QUANT_METADATA_KEY,
                                           decode_header_metadata, read_marker)
from .report import relative_error

MAX_QUOTE = 200  # characters of a value from the file quoted in a message


@dataclass
class LayerCheck:
    layer: str
    format: str
    rel_error: float | None = None
    upstream: bool = True
    layout_ok: bool = True


@dataclass
class VerifyResult:
    path: str
    defects: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layers: list[LayerCheck] = field(default_factory=list)
    checked_reference: bool = False

    @property
    def ok(self) -> bool:
        return not self.defects

    def summary(self) -> str:
        legacy = sum(not l.upstream for l in self.layers)
        state = "OK" if self.ok else f"{len(self.defects)} DEFECT(S)"
        extra = f", {legacy} layers in formats upstream ComfyUI cannot load" if legacy else ""
        return f"verify {state}: {len(self.layers)} quantized layers{extra}, {len(self.warnings)} warnings"


def verify_file(path: str, reference=None, allow_legacy: bool = False,
                reference_transform=None, on_layer=None) -> VerifyResult:
    """Check `path` against every rule of docs/FORMATS.md; with `reference` (a source file's path, or the
    `io.source.ComputedSource` it was converted from), also compare each layer to the source.
    `reference_transform(key, tensor)` rewrites reference tensors first (e.g. merges the same LoRAs). `on_layer()`
    is called before each layer is checked or compared; it may raise to stop (a cancelled run)."""
    result = VerifyResult(path)
    tick = on_layer or (lambda: None)
    with SafetensorsReader(path, low_memory=True) as reader:
        confs = _read_markers(reader, result)
        _check_header_metadata(reader, confs, result)
        suffixes = suffixes_by_layer(reader.keys())
        for layer, conf in confs.items():
            tick()
            _check_layer(reader, layer, conf, result, suffixes)
        _mark_legacy(result, allow_legacy)
        _check_orphans(reader, confs, result)
        if reference is not None:
            with open_source(reference) as source:
                if reference_transform is not None:
                    source = _Transformed(source, reference_transform)
                _compare_with_source(reader, source, confs, result, tick)
            result.checked_reference = True
    return result


class _Transformed:
    """A reader whose tensors pass through a function (key, tensor) → tensor."""

    def __init__(self, reader, transform):
        self._reader, self._transform = reader, transform

    def keys(self):
        return self._reader.keys()

    def get_tensor(self, key):
        return self._transform(key, self._reader.get_tensor(key))


def _short(text: str) -> str:
    """`text` (from the file) cut to MAX_QUOTE characters for a message."""
    return text if len(text) <= MAX_QUOTE else f"{text[:MAX_QUOTE]}… ({len(text)} characters)"


def _read_markers(reader: SafetensorsReader, result: VerifyResult) -> dict[str, dict]:
    confs = {}
    for key in reader.keys():
        if key.endswith(MARKER):
            try:
                confs[key[: -len(MARKER)]] = read_marker(reader, key)
            except ValueError as e:
                result.defects.append(f"{key}: {e}")
    return confs


def _check_header_metadata(reader: SafetensorsReader, confs: dict, result: VerifyResult) -> None:
    raw = reader.metadata().get(QUANT_METADATA_KEY)
    if raw is None:
        if confs:
            result.defects.append(f"header has no {QUANT_METADATA_KEY} (ComfyUI ≤ 0.3.7x reads only the header)")
        return
    try:
        meta, layers = decode_header_metadata(raw)
    except ValueError as e:
        result.defects.append(f"header {e}")
        return
    version = meta.get("format_version")
    if version != METADATA_FORMAT_VERSION:
        result.warnings.append(f"header {QUANT_METADATA_KEY} format_version is {_short(repr(version))}, expected "
                               f"{METADATA_FORMAT_VERSION!r}")
    for layer in sorted(set(layers) - set(confs)):
        result.defects.append(f"{layer}: listed in the header {QUANT_METADATA_KEY} but has no {MARKER} marker")
    for layer in sorted(set(confs) - set(layers)):
        result.defects.append(f"{layer}: has a {MARKER} marker but is missing from the header {QUANT_METADATA_KEY}")
    for layer in sorted(set(confs) & set(layers)):
        if layers[layer] != confs[layer]:
            result.defects.append(f"{layer}: header entry {_short(str(layers[layer]))} differs from the marker "
                                  f"{_short(str(confs[layer]))}")


def _mark_legacy(result: VerifyResult, allow_legacy: bool) -> None:
    """One line per fork-only format: a defect for a stock ComfyUI, a warning when the user asked for it."""
    counts: dict[str, list[str]] = {}
    for check in result.layers:
        if not check.upstream:
            counts.setdefault(check.format, []).append(check.layer)
    for name, layers in counts.items():
        message = (f"{len(layers)} layers (e.g. {layers[0]}) use format {name!r}, which upstream ComfyUI cannot load "
                   "(KeyError); only some forks and custom nodes read it")
        (result.warnings if allow_legacy else result.defects).append(message)


def _check_layer(reader, layer: str, conf: dict, result: VerifyResult, suffixes: dict[str, list[str]]) -> None:
    """The layer's tensors and marker against its format's contract (formats.CONTRACTS)."""
    name = conf["format"]
    contract = CONTRACTS.get(name)
    if contract is None:
        result.defects.append(f"{layer}: unknown format {_short(repr(name))}: upstream ComfyUI raises KeyError and the "
                              "whole model fails to load")
        return
    for key in sorted(set(conf) - set(contract.marker_fields)):
        result.warnings.append(f"{layer}: marker key {_short(repr(key))} is not read by ComfyUI")
    present = suffixes.get(layer, [])
    if "weight" not in present:
        result.defects.append(f"{layer}: marker without a {layer}.weight tensor")
        return
    problems = contract.check({suffix: reader.info(f"{layer}.{suffix}") for suffix in present}, conf, layer)
    result.defects.extend(f"{layer}: {p}" for p in problems)
    result.layers.append(LayerCheck(layer, name, upstream=contract.upstream, layout_ok=not problems))
    if not problems:
        _check_scale_values(reader, layer, contract, present, result)


def suffixes_by_layer(keys) -> dict[str, list[str]]:
    """layer name → the last name parts of its tensors (`weight`, `weight_scale`, …)."""
    by_layer: dict[str, list[str]] = {}
    for key in keys:
        layer, _, suffix = key.rpartition(".")
        by_layer.setdefault(layer, []).append(suffix)
    return by_layer


def _check_scale_values(reader, layer: str, contract, present: list[str], result: VerifyResult) -> None:
    for companion in contract.companions:
        if companion.values is not None and companion.suffix in present:
            key = f"{layer}.{companion.suffix}"
            problem = value_problem(companion.values, reader.get_tensor(key))
            if problem:
                result.defects.append(f"{key}: {problem}")


def _check_orphans(reader, confs: dict, result: VerifyResult) -> None:
    for key in reader.keys():
        layer, _, suffix = key.rpartition(".")
        if suffix in COMPANION_SUFFIXES and layer not in confs:
            result.defects.append(f"{key}: scale without a {MARKER} marker (the layer would load as garbage)")
        info = reader.info(key)
        if suffix == "weight" and layer not in confs and len(info.shape) == 2 and info.dtype in WEIGHT_TAGS:
            result.defects.append(f"{key}: {info.dtype} weight without a {MARKER} marker")
        if suffix == "bias" and layer in confs and info.dtype not in FLOAT_TAGS:
            result.defects.append(f"{key}: biases are never quantized, got {info.dtype}")


def _compare_with_source(reader, source, confs: dict, result: VerifyResult, tick) -> None:
    checks = {c.layer: c for c in result.layers}
    keys, source_keys = set(reader.keys()), set(source.keys())
    for layer, conf in confs.items():
        tick()
        check = checks.get(layer)
        if check is not None and not check.layout_ok:
            continue  # already a defect; its tensors cannot be rebuilt
        if check is None or f"{layer}.weight" not in source_keys:
            if check is not None:
                result.defects.append(f"{layer}: not in the reference file")
            continue
        _compare_layer(reader, keys, source, layer, conf, check, result)
    _compare_passthrough(reader, source, confs, result)


def _compare_layer(reader, keys: set[str], source, layer, conf, check: LayerCheck, result: VerifyResult) -> None:
    reference = source.get_tensor(f"{layer}.weight").float()
    if reference.dim() != 2:
        result.defects.append(f"{layer}: the reference weight is {reference.dim()}-D")
        return
    contract = CONTRACTS[conf["format"]]
    n, k = reference.shape
    stored = reader.get_shape(f"{layer}.weight")
    if tuple(stored) != contract.stored_shape(n, k):
        result.defects.append(f"{layer}: stored weight shape {list(stored)} does not match the reference {[n, k]}")
        return
    error = relative_error(reference, rebuild_layer(reader, keys, layer, conf, (n, k)))
    check.rel_error = error
    if not math.isfinite(error) or error > contract.broken:
        result.defects.append(f"{layer}: dequantized weight is broken (relative error {error:.3g} vs the reference)")
    elif error > contract.typical:
        result.warnings.append(f"{layer}: relative error {error:.3g} is above the usual range for {conf['format']}")


def _compare_passthrough(reader, source, confs: dict, result: VerifyResult) -> None:
    companions = {f"{layer}.{s}" for layer in confs for s in ("weight", MARKER_SUFFIX) + COMPANION_SUFFIXES}
    keys, source_keys = set(reader.keys()), set(source.keys())
    missing = [key for key in source.keys() if key not in keys]
    if missing:
        result.warnings.append(f"{len(missing)} reference tensors are not in the output (e.g. {missing[0]})")
    corrected_biases = []
    for key in reader.keys():
        if key in companions:
            continue
        if key.endswith(".bias") and key[: -len(".bias")] in confs and key in source_keys:
            if not _bias_ok(reader.get_tensor(key), source.get_tensor(key), key, result):
                continue
            if not _same_bytes(reader.get_tensor(key), source.get_tensor(key)):
                corrected_biases.append(key)
            continue
        if key not in source_keys:
            result.defects.append(f"{key}: not in the reference file and not part of a quantized layer")
            continue
        out, ref = reader.get_tensor(key), source.get_tensor(key)
        if out.shape != ref.shape:
            result.defects.append(f"{key}: shape {list(out.shape)} differs from the reference {list(ref.shape)}")
        elif out.dtype == ref.dtype and not _same_bytes(out, ref):
            result.defects.append(f"{key}: kept tensor differs from the reference")
        elif out.dtype != ref.dtype and out.is_floating_point() and ref.is_floating_point() and \
                not torch.equal(out, ref.to(out.dtype)):
            result.defects.append(f"{key}: kept tensor differs from the reference beyond a dtype cast")
    if corrected_biases:
        result.warnings.append(f"{len(corrected_biases)} biases of quantized layers differ from the reference "
                               f"(bias correction; e.g. {corrected_biases[0]})")


def _bias_ok(out: torch.Tensor, ref: torch.Tensor, key: str, result: VerifyResult) -> bool:
    """Biases of quantized layers may be corrected, but keep their shape and floating dtype."""
    if out.shape != ref.shape or not out.is_floating_point() or not bool(torch.isfinite(out).all()):
        result.defects.append(f"{key}: bias of a quantized layer has shape {list(out.shape)} {out.dtype}, "
                              f"expected {list(ref.shape)} floating point and finite")
        return False
    return True


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def verify_or_raise(path: str, reference: str | None = None, allow_legacy: bool = False) -> VerifyResult:
    result = verify_file(path, reference, allow_legacy)
    if not result.ok:
        raise QuantError(f"{path}: {result.defects[0]}")
    return result


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds the package attribute `quant_core.verify` (the library function) to the module;
    calling the module does what the function does, so `quant_core.verify(path)` works in every import order."""

    def __call__(self, path: str, reference: str | None = None, allow_legacy: bool = False) -> VerifyResult:
        return verify_file(path, reference, allow_legacy)


sys.modules[__name__].__class__ = _CallableModule
