"""`verify`: check a file against the ComfyUI contract (FORMATS.md) and, with the source file, rebuild every
quantized layer through comfy-kitchen's own layout classes and measure its error.

Cheap checks read the header, the markers and the (small) scale tensors; `reference=` also reads every weight.
"""
from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field

import torch

from .errors import QuantError
from .quantization.formats import LEGACY_NAMES, UPSTREAM_NAMES, make_format
from .quantization.formats.blocked import blocked_shape, round_up
from .quantization.formats.int8 import is_power_of_4
from .io.dtypes import FLOAT_TAGS
from .io.reader import SafetensorsReader
from .report import safe_norm

QUANT_METADATA_KEY = "_quantization_metadata"
MARKER = ".comfy_quant"
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
KNOWN_CONF_KEYS = {"format", "full_precision_matrix_mult", "convrot", "convrot_groupsize", "orig_dtype", "group_size",
                   "per_row"}
# rel. error ‖W−Ŵ‖/‖W‖ above which a layer is reported as unusually poor (warning) and as broken (defect)
TYPICAL_REL_ERROR = {"int8_tensorwise": 0.05, "float8_e4m3fn": 0.08, "float8_e5m2": 0.15, "nvfp4": 0.2,
                     "mxfp8": 0.08, "int8_blockwise": 0.05, "float8_e4m3fn_rowwise": 0.08,
                     "float8_e4m3fn_blockwise": 0.08}
# per-tensor INT8 of a weight with outliers can legitimately reach ~0.4; block formats never come near these
BROKEN_REL_ERROR = {"int8_tensorwise": 0.6, "float8_e5m2": 0.3}
BROKEN_REL_ERROR_DEFAULT = 0.25


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


def verify_file(path: str, reference: str | None = None, allow_legacy: bool = False,
                reference_transform=None) -> VerifyResult:
    """Check `path` against every rule of FORMATS.md; with `reference`, also compare each layer to the source.
    `reference_transform(key, tensor)` rewrites reference tensors first (e.g. merges the same LoRAs)."""
    result = VerifyResult(path)
    with SafetensorsReader(path, low_memory=True) as reader:
        confs = _read_markers(reader, result)
        _check_header_metadata(reader, confs, result)
        suffixes = suffixes_by_layer(reader.keys())
        for layer, conf in confs.items():
            _check_layer(reader, layer, conf, result, suffixes)
        _mark_legacy(result, allow_legacy)
        _check_orphans(reader, confs, result)
        if reference is not None:
            with SafetensorsReader(reference, low_memory=True) as source:
                if reference_transform is not None:
                    source = _Transformed(source, reference_transform)
                _compare_with_source(reader, source, confs, result)
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


def _read_markers(reader: SafetensorsReader, result: VerifyResult) -> dict[str, dict]:
    confs = {}
    for key in reader.keys():
        if not key.endswith(MARKER):
            continue
        layer = key[: -len(MARKER)]
        info = reader.info(key)
        if info.dtype != "U8" or len(info.shape) != 1 or info.numel == 0:
            result.defects.append(f"{key}: marker must be a non-empty 1-D U8 tensor, got {info.dtype} {list(info.shape)}")
            continue
        raw = reader.get_tensor(key).numpy().tobytes()
        if not raw.strip(b"\x00"):
            result.defects.append(f"{key}: marker is NUL-filled")
            continue
        try:
            conf = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            result.defects.append(f"{key}: marker is not UTF-8 JSON")
            continue
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
            result.defects.append(f"{key}: marker JSON must be an object with a 'format' string")
            continue
        confs[layer] = conf
    return confs


def _check_header_metadata(reader: SafetensorsReader, confs: dict, result: VerifyResult) -> None:
    raw = reader.metadata().get(QUANT_METADATA_KEY)
    if raw is None:
        if confs:
            result.defects.append(f"header has no {QUANT_METADATA_KEY} (ComfyUI ≤ 0.3.7x reads only the header)")
        return
    try:
        meta = json.loads(raw)
        layers = meta["layers"]
        assert isinstance(layers, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        result.defects.append(f"header {QUANT_METADATA_KEY} is not JSON with a 'layers' object")
        return
    if meta.get("format_version") != "1.0":
        result.warnings.append(f"header {QUANT_METADATA_KEY} format_version is {meta.get('format_version')!r}, expected '1.0'")
    for layer in sorted(set(layers) - set(confs)):
        result.defects.append(f"{layer}: listed in the header {QUANT_METADATA_KEY} but has no {MARKER} marker")
    for layer in sorted(set(confs) - set(layers)):
        result.defects.append(f"{layer}: has a {MARKER} marker but is missing from the header {QUANT_METADATA_KEY}")
    for layer in sorted(set(confs) & set(layers)):
        if layers[layer] != confs[layer]:
            result.defects.append(f"{layer}: header entry {layers[layer]} differs from the marker {confs[layer]}")


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
    name = conf["format"]
    if name not in UPSTREAM_NAMES and name not in LEGACY_NAMES:
        result.defects.append(f"{layer}: unknown format {name!r}: upstream ComfyUI raises KeyError and the whole model fails to load")
        return
    for key in sorted(set(conf) - KNOWN_CONF_KEYS):
        result.warnings.append(f"{layer}: marker key {key!r} is not read by ComfyUI")
    weight = f"{layer}.weight"
    if weight not in reader.keys():
        result.defects.append(f"{layer}: marker without a {weight} tensor")
        return
    problems = _layout_problems(reader, layer, conf, suffixes)
    result.defects.extend(f"{layer}: {p}" for p in problems)
    result.layers.append(LayerCheck(layer, name, upstream=name in UPSTREAM_NAMES, layout_ok=not problems))
    if not problems:
        _check_scale_values(reader, layer, name, result)


def _shape(reader, key):
    return reader.get_shape(key) if key in reader.keys() else None


def _expect(reader, key: str, dtypes: tuple[str, ...], shapes, problems: list[str]) -> None:
    """`shapes`: list of acceptable shapes (tuples)."""
    if key not in reader.keys():
        problems.append(f"missing {key.rsplit('.', 1)[-1]}")
        return
    info = reader.info(key)
    if info.dtype not in dtypes:
        problems.append(f"{key.rsplit('.', 1)[-1]} is {info.dtype}, expected {' or '.join(dtypes)}")
    if shapes is not None and info.shape not in shapes:
        problems.append(f"{key.rsplit('.', 1)[-1]} has shape {list(info.shape)}, expected "
                        + " or ".join(str(list(s)) for s in shapes))


ONE_ELEMENT = [(), (1,)]


def _layout_problems(reader, layer: str, conf: dict, suffixes: dict[str, list[str]]) -> list[str]:
    name, problems = conf["format"], []
    wshape = reader.get_shape(f"{layer}.weight")
    if len(wshape) != 2:
        return [f"quantized weight must be 2-D (Linear), got shape {list(wshape)}: a marker on a conv/norm is an unexpected key"]
    n, k = wshape
    allowed = {"weight", "weight_scale", "comfy_quant", "bias"}
    if name in ("float8_e4m3fn", "float8_e5m2"):
        _expect(reader, f"{layer}.weight", ("F8_E4M3" if name == "float8_e4m3fn" else "F8_E5M2",), None, problems)
        _expect(reader, f"{layer}.weight_scale", ("F32",), ONE_ELEMENT, problems)
        allowed.add("input_scale")
        if f"{layer}.input_scale" in reader.keys():
            _expect(reader, f"{layer}.input_scale", ("F32",), ONE_ELEMENT, problems)
    elif name == "int8_tensorwise":
        _expect(reader, f"{layer}.weight", ("I8",), None, problems)
        _expect(reader, f"{layer}.weight_scale", ("F32",), [(), (1,), (n, 1)], problems)
        if conf.get("convrot"):
            group = conf.get("convrot_groupsize")
            if not isinstance(group, int) or not is_power_of_4(group) or k % group:
                problems.append(f"convrot_groupsize {group!r} must be a power of 4 dividing K={k}")
    elif name == "nvfp4":
        _expect(reader, f"{layer}.weight", ("U8",), None, problems)
        if n % 16 or (2 * k) % 16:
            problems.append(f"packed weight shape {list(wshape)} is not padded to 16×16")
        _expect(reader, f"{layer}.weight_scale", ("F8_E4M3",), [blocked_shape(n, 2 * k // 16)], problems)
        _expect(reader, f"{layer}.weight_scale_2", ("F32",), ONE_ELEMENT, problems)
        allowed |= {"weight_scale_2", "input_scale", "pre_quant_scale"}
        if f"{layer}.input_scale" in reader.keys():
            _expect(reader, f"{layer}.input_scale", ("F32",), ONE_ELEMENT, problems)
    elif name == "mxfp8":
        _expect(reader, f"{layer}.weight", ("F8_E4M3",), None, problems)
        if n % 32 or k % 32:
            problems.append(f"weight shape {list(wshape)} is not padded to 32×32")
        _expect(reader, f"{layer}.weight_scale", ("U8",), [blocked_shape(n, k // 32)], problems)
        allowed.add("input_scale")
    else:
        problems += _legacy_layout_problems(reader, layer, conf, n, k)
    extras = [f"{layer}.{suffix}" for suffix in suffixes.get(layer, ()) if suffix not in allowed]
    problems += [f"unexpected tensor {key} (ComfyUI reports it as an unexpected key)" for key in extras]
    return problems


def suffixes_by_layer(keys) -> dict[str, list[str]]:
    """layer name → the last name parts of its tensors (`weight`, `weight_scale`, …)."""
    by_layer: dict[str, list[str]] = {}
    for key in keys:
        layer, _, suffix = key.rpartition(".")
        by_layer.setdefault(layer, []).append(suffix)
    return by_layer


def _legacy_layout_problems(reader, layer: str, conf: dict, n: int, k: int) -> list[str]:
    problems = []
    name = conf["format"]
    weight_tag = "I8" if name == "int8_blockwise" else "F8_E4M3"
    _expect(reader, f"{layer}.weight", (weight_tag,), None, problems)
    if name == "float8_e4m3fn_rowwise":
        _expect(reader, f"{layer}.weight_scale", ("F32",), [(n, 1), (n,)], problems)
    else:
        block = conf.get("group_size")
        if not isinstance(block, int) or block < 1 or n % block or k % block:
            return problems + [f"group_size {block!r} does not tile the {n}×{k} weight"]
        _expect(reader, f"{layer}.weight_scale", ("F32",), [(n // block, k // block)], problems)
    return problems


def _check_scale_values(reader, layer: str, name: str, result: VerifyResult) -> None:
    for suffix in SCALE_SUFFIXES:
        key = f"{layer}.{suffix}"
        if key not in reader.keys():
            continue
        values = reader.get_tensor(key)
        if name == "mxfp8" and suffix == "weight_scale":
            if bool((values == 255).any()):
                result.defects.append(f"{key}: E8M0 byte 255 is NaN")
            continue
        values = values.float()
        if not bool(torch.isfinite(values).all()):
            result.defects.append(f"{key}: has NaN/Inf values")
        elif suffix in ("weight_scale", "weight_scale_2") and name != "nvfp4" and bool((values <= 0).any()):
            result.defects.append(f"{key}: scales must be positive")
        elif suffix == "input_scale" and bool((values <= 0).any()):
            result.defects.append(f"{key}: a static activation scale must be positive (activations are divided by it)")
        elif bool((values < 0).any()) and suffix != "pre_quant_scale":
            result.defects.append(f"{key}: scales must not be negative")


def _check_orphans(reader, confs: dict, result: VerifyResult) -> None:
    for key in reader.keys():
        layer, _, suffix = key.rpartition(".")
        if suffix in SCALE_SUFFIXES and layer not in confs:
            result.defects.append(f"{key}: scale without a {MARKER} marker (the layer would load as garbage)")
        info = reader.info(key)
        if suffix == "weight" and layer not in confs and len(info.shape) == 2 and info.dtype in ("I8", "F8_E4M3", "F8_E5M2", "U8"):
            result.defects.append(f"{key}: {info.dtype} weight without a {MARKER} marker")
        if suffix == "bias" and layer in confs and info.dtype not in FLOAT_TAGS:
            result.defects.append(f"{key}: biases are never quantized, got {info.dtype}")


def dequantize_with_comfy_kitchen(name: str, tensors: dict[str, torch.Tensor], conf: dict, shape) -> torch.Tensor:
    """Rebuild an fp32 [N, K] weight through comfy-kitchen's own layout classes (the code ComfyUI runs)."""
    from comfy_kitchen.tensor import (TensorCoreFP8Layout, TensorCoreMXFP8Layout, TensorCoreNVFP4Layout,
                                      TensorWiseINT8Layout)
    n, k = shape
    common = dict(orig_dtype=torch.float32, orig_shape=tuple(shape))
    if name == "int8_tensorwise":
        params = TensorWiseINT8Layout.Params(scale=tensors["weight_scale"], convrot=bool(conf.get("convrot")),
                                             convrot_groupsize=conf.get("convrot_groupsize", 256), **common)
        return TensorWiseINT8Layout.dequantize(tensors["weight"], params).float()
    if name in ("float8_e4m3fn", "float8_e5m2"):
        params = TensorCoreFP8Layout.Params(scale=tensors["weight_scale"], **common)
        return TensorCoreFP8Layout.dequantize(tensors["weight"], params).float()
    if name == "nvfp4":
        params = TensorCoreNVFP4Layout.Params(scale=tensors["weight_scale_2"], block_scale=tensors["weight_scale"], **common)
        return TensorCoreNVFP4Layout.dequantize(tensors["weight"], params).float()[:n, :k]
    if name == "mxfp8":
        params = TensorCoreMXFP8Layout.Params(scale=tensors["weight_scale"].view(torch.float8_e8m0fnu), **common)
        return TensorCoreMXFP8Layout.dequantize(tensors["weight"], params).float()[:n, :k]
    raise ValueError(f"comfy-kitchen has no layout for {name!r}")


def rebuild_layer(reader, keys: set[str], layer: str, conf: dict, shape) -> torch.Tensor:
    """The fp32 [N, K] weight of a quantized layer stored in `reader` (whose key set is `keys`): through
    comfy-kitchen for the formats upstream ComfyUI loads, by the legacy rules for the others."""
    tensors = {s: reader.get_tensor(f"{layer}.{s}") for s in ("weight",) + SCALE_SUFFIXES if f"{layer}.{s}" in keys}
    rebuild = dequantize_with_comfy_kitchen if conf["format"] in UPSTREAM_NAMES else _legacy_dequantize
    return rebuild(conf["format"], tensors, conf, shape)


def _legacy_dequantize(name: str, tensors: dict, conf: dict, shape) -> torch.Tensor:
    family, scaling = {"int8_blockwise": ("int8", "block"), "float8_e4m3fn_rowwise": ("fp8", "row"),
                       "float8_e4m3fn_blockwise": ("fp8", "block")}[name]
    return make_format(family, scaling, conf.get("group_size", 128)).dequantize(tensors, shape)


def _compare_with_source(reader, source, confs: dict, result: VerifyResult) -> None:
    checks = {c.layer: c for c in result.layers}
    for layer, conf in confs.items():
        check = checks.get(layer)
        if check is not None and not check.layout_ok:
            continue  # already a defect; its tensors cannot be rebuilt
        if check is None or f"{layer}.weight" not in source.keys():
            if check is not None:
                result.defects.append(f"{layer}: not in the reference file")
            continue
        _compare_layer(reader, source, layer, conf, check, result)
    _compare_passthrough(reader, source, confs, result)


def _compare_layer(reader, source, layer, conf, check: LayerCheck, result: VerifyResult) -> None:
    reference = source.get_tensor(f"{layer}.weight").float()
    if reference.dim() != 2:
        result.defects.append(f"{layer}: the reference weight is {reference.dim()}-D")
        return
    tensors = {key.rsplit(".", 1)[-1]: reader.get_tensor(key) for key in reader.keys()
               if key.startswith(layer + ".") and key.rsplit(".", 1)[-1] in ("weight",) + SCALE_SUFFIXES}
    n, k = reference.shape
    stored = reader.get_shape(f"{layer}.weight")
    expected = {"nvfp4": (round_up(n, 16), round_up(k, 16) // 2), "mxfp8": (round_up(n, 32), round_up(k, 32))}
    if stored != expected.get(conf["format"], (n, k)):
        result.defects.append(f"{layer}: stored weight shape {list(stored)} does not match the reference {[n, k]}")
        return
    dequant = (dequantize_with_comfy_kitchen if check.upstream else _legacy_dequantize)(conf["format"], tensors, conf, (n, k))
    norm = safe_norm(reference)
    error = safe_norm(dequant - reference) / (norm or 1.0)
    check.rel_error = error
    if not math.isfinite(error) or error > BROKEN_REL_ERROR.get(conf["format"], BROKEN_REL_ERROR_DEFAULT):
        result.defects.append(f"{layer}: dequantized weight is broken (relative error {error:.3g} vs the reference)")
    elif error > TYPICAL_REL_ERROR.get(conf["format"], 0.1):
        result.warnings.append(f"{layer}: relative error {error:.3g} is above the usual range for {conf['format']}")


def _compare_passthrough(reader, source, confs: dict, result: VerifyResult) -> None:
    companions = {f"{layer}.{s}" for layer in confs for s in ("weight", "comfy_quant") + SCALE_SUFFIXES}
    missing = [key for key in source.keys() if key not in reader.keys()]
    if missing:
        result.warnings.append(f"{len(missing)} reference tensors are not in the output (e.g. {missing[0]})")
    corrected_biases = []
    for key in reader.keys():
        if key in companions:
            continue
        if key.endswith(".bias") and key[: -len(".bias")] in confs and key in source.keys():
            if not _bias_ok(reader.get_tensor(key), source.get_tensor(key), key, result):
                continue
            if not _same_bytes(reader.get_tensor(key), source.get_tensor(key)):
                corrected_biases.append(key)
            continue
        if key not in source.keys():
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
