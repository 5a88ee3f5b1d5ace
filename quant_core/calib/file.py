"""The calibration statistics file (FORMATS.md §4): one safetensors file, keys `<layer>.<statistic>`.

Besides the keys of §4 this project writes two optional ones (README "Calibration file"): `<layer>.input_mean`
(fp32 [K], E[x], for bias correction), `<layer>.heldout_hessian` (fp32 [K,K], E[x xᵀ] over tokens the methods do
not see) and `<layer>.heldout_mean` (fp32 [K]), for the report's held-out output SQNR. Readers that do not know them ignore them.
"""
from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import QuantError
from .stats import InputStats

FORMAT_NAME = "quant_calibration"
VERSION = "1"
SUFFIXES = {  # statistic suffix → InputStats field
    "input_absmax": "absmax", "input_mean_sq": "mean_sq", "hessian": "hessian", "input_mean": "mean",
    "heldout_hessian": "heldout_hessian", "heldout_mean": "heldout_mean", "input_scale": "input_scale", "n_tokens": "n_tokens",
}
REQUIRED = ("input_absmax", "n_tokens")


def save_calibration(path: str, stats: dict[str, InputStats], source: str) -> None:
    """Write per-layer statistics (layer name → InputStats) as a §4 calibration file."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, s in stats.items():
        for suffix, field in SUFFIXES.items():
            value = getattr(s, field)
            if value is None:
                continue
            if field == "n_tokens":
                tensors[f"{layer}.{suffix}"] = torch.tensor(int(value), dtype=torch.int64)
            else:
                tensors[f"{layer}.{suffix}"] = value.detach().float().cpu().clone()  # own storage: layers may share
    meta = {"format": FORMAT_NAME, "version": VERSION, "source": source}
    save_file(tensors, path, metadata=meta)


class CalibrationFile:
    """Lazy reader: statistics of one layer at a time (a file with many [K,K] Hessians never sits in memory)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise QuantError(f"--calibration-data {path}: no such file")
        try:
            self._file = safe_open(path, "pt")
        except Exception as e:  # safetensors raises several types for a bad header
            raise QuantError(f"--calibration-data {path}: not a safetensors file ({e})") from None
        meta = self._file.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise QuantError(f"--calibration-data {path}: header __metadata__ format is {meta.get('format')!r}, "
                             f"expected {FORMAT_NAME!r} (make one with calibrate_activation_scales)")
        if meta.get("version") != VERSION:
            raise QuantError(f"--calibration-data {path}: version {meta.get('version')!r} is not supported "
                             f"(this build reads version {VERSION})")
        self.source = meta.get("source", "")
        self.layers = self._index(self._file.keys())

    def _index(self, keys) -> dict[str, set[str]]:
        layers: dict[str, set[str]] = {}
        for key in keys:
            layer, _, suffix = key.rpartition(".")
            if suffix not in SUFFIXES:
                raise QuantError(f"--calibration-data {self.path}: unknown key {key!r} (expected <layer>."
                                 f"{{{', '.join(SUFFIXES)}}})")
            layers.setdefault(layer, set()).add(suffix)
        for layer, present in layers.items():
            missing = [s for s in REQUIRED if s not in present]
            if missing:
                raise QuantError(f"--calibration-data {self.path}: layer {layer} has no {layer}.{missing[0]}")
        return layers

    def __contains__(self, layer: str) -> bool:
        return layer in self.layers

    def get(self, layer: str, k: int | None = None, only: tuple[str, ...] | None = None) -> InputStats | None:
        """The layer's statistics, validated (shapes agree with each other and with K when given), or None.
        `only` names the keys to read besides the required ones (e.g. ("input_scale",) for consumers that need no
        Hessian: a [K,K] tensor per layer is then never read)."""
        if layer not in self.layers:
            return None
        present = self.layers[layer] if only is None else self.layers[layer] & {*only, *REQUIRED}
        values = {SUFFIXES[s]: self._file.get_tensor(f"{layer}.{s}") for s in present}
        return _build(values, layer, k, self.path)

    def close(self) -> None:
        self._file = None


def _build(values: dict, layer: str, k: int | None, path: str) -> InputStats:
    where = f"--calibration-data {path}: {layer}"
    n_tokens = values.pop("n_tokens")
    if n_tokens.numel() != 1 or n_tokens.is_floating_point() or int(n_tokens) <= 0:
        raise QuantError(f"{where}.n_tokens must be one positive integer")
    absmax = values["absmax"]
    k = absmax.shape[0] if k is None else k
    expected = {"absmax": (k,), "mean_sq": (k,), "mean": (k,), "hessian": (k, k), "heldout_hessian": (k, k),
                "heldout_mean": (k,)}
    for field, value in values.items():
        want = expected.get(field)
        if field == "input_scale" and value.numel() != 1 or want is not None and tuple(value.shape) != want:
            raise QuantError(f"{where}: {field} has shape {list(value.shape)}, expected "
                             f"{list(want or ())} (K={k} input features of the layer)")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise QuantError(f"{where}: {field} must hold finite floating-point values")
        if field in ("absmax", "mean_sq", "input_scale") and bool((value < 0).any()):
            raise QuantError(f"{where}: {field} has negative values")
        values[field] = value.float()
    if "mean_sq" not in values:
        values["mean_sq"] = torch.diagonal(values["hessian"]).clone() if "hessian" in values else absmax.float() ** 2
    return InputStats(n_tokens=int(n_tokens), **values)


def load_calibration(path: str) -> dict[str, InputStats]:
    """Read a whole calibration file (layer name → InputStats). Raises QuantError (one line) for a bad file."""
    reader = CalibrationFile(path)
    try:
        return {layer: reader.get(layer) for layer in reader.layers}
    finally:
        reader.close()

