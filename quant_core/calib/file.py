"""The calibration statistics file (docs/CALIBRATION.md): one safetensors file, keys `<layer>.<statistic>`.

Besides the keys of §4 this project writes two optional ones (README "Calibration file"): `<layer>.input_mean`
(fp32 [K], E[x], for bias correction), `<layer>.heldout_hessian` (fp32 [K,K], E[x xᵀ] over tokens the methods do
not see) and `<layer>.heldout_mean` (fp32 [K]), for the report's held-out output SQNR. Readers that do not know them ignore them.
"""
from __future__ import annotations

import torch

from ..errors import QuantError
from ..io.dtypes import tag_of
from ..io.reader import SafetensorsReader, require_regular
from ..io.writer import StreamingWriter, header_reserve
from .stats import InputStats

FORMAT_NAME = "quant_calibration"
VERSION = "1"
SUFFIXES = {  # statistic suffix → InputStats field
    "input_absmax": "absmax", "input_mean_sq": "mean_sq", "hessian": "hessian", "input_mean": "mean",
    "heldout_hessian": "heldout_hessian", "heldout_mean": "heldout_mean", "input_scale": "input_scale", "n_tokens": "n_tokens",
}
REQUIRED = ("input_absmax", "n_tokens")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # statistics; FP8 cannot hold them
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def save_calibration(path: str, stats: dict[str, InputStats], source: str, overwrite: bool = False) -> None:
    """Write per-layer statistics (layer name → InputStats) as a §4 calibration file, the way converted files are
    written (temporary, fsync, atomic rename; an existing file only with `overwrite`)."""
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
    reserve = header_reserve([(k, tag_of(t.dtype), tuple(t.shape)) for k, t in tensors.items()], meta)
    with StreamingWriter(path, reserve, overwrite=overwrite) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish(meta)
        writer.publish()


class CalibrationFile:
    """Lazy reader: statistics of one layer at a time (a file with many [K,K] Hessians never sits in memory).

    Read through the project's reader (file reads, sizes checked), never memory-mapped: a file truncated while a run
    reads it is a one-line error, not a SIGBUS."""

    def __init__(self, path: str):
        self.path = path
        where = f"--calibration-data {path}"
        try:
            require_regular(path, "--calibration-data")
        except FileNotFoundError:
            raise QuantError(f"{where}: no such file") from None
        except OSError as e:
            raise QuantError(f"{where}: cannot read: {e.strerror or e}") from None
        try:
            self._file = SafetensorsReader(path, low_memory=True)
        except QuantError as e:
            raise QuantError(f"--calibration-data {e}") from None
        meta = self._file.metadata()
        if meta.get("format") != FORMAT_NAME:
            self.close()
            raise QuantError(f"{where}: header __metadata__ format is {meta.get('format')!r}, "
                             f"expected {FORMAT_NAME!r} (make one with calibrate_activation_scales)")
        if meta.get("version") != VERSION:
            self.close()
            raise QuantError(f"{where}: version {meta.get('version')!r} is not supported "
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
        values = {SUFFIXES[s]: self._read(f"{layer}.{s}") for s in present}
        return _build(values, layer, k, self.path)

    def _read(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except QuantError as e:  # e.g. truncated since it was opened
            raise QuantError(f"--calibration-data {e}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None


def _build(values: dict, layer: str, k: int | None, path: str) -> InputStats:
    where = f"--calibration-data {path}: {layer}"
    n_tokens = values.pop("n_tokens")
    if n_tokens.numel() != 1 or n_tokens.dtype not in INT_DTYPES or int(n_tokens) <= 0:
        raise QuantError(f"{where}.n_tokens must be one positive integer")
    absmax = values["absmax"]
    if absmax.dim() != 1:
        raise QuantError(f"{where}: absmax has shape {list(absmax.shape)}, expected [K] (one value per input feature)")
    k = absmax.shape[0] if k is None else k
    expected = {"absmax": (k,), "mean_sq": (k,), "mean": (k,), "hessian": (k, k), "heldout_hessian": (k, k),
                "heldout_mean": (k,)}
    for field, value in values.items():
        want = expected.get(field)
        if field == "input_scale" and value.numel() != 1 or want is not None and tuple(value.shape) != want:
            raise QuantError(f"{where}: {field} has shape {list(value.shape)}, expected "
                             f"{list(want or ())} (K={k} input features of the layer)")
        if value.dtype not in FLOAT_DTYPES:
            raise QuantError(f"{where}: {field} is {str(value.dtype).removeprefix('torch.')}; statistics are stored "
                             "as F32 (or F64/F16/BF16)")
        value = value.float()  # F64 values beyond the F32 range become inf here: checked below
        if not bool(torch.isfinite(value).all()):
            raise QuantError(f"{where}: {field} must hold finite floating-point values")
        if field in ("absmax", "mean_sq", "input_scale") and bool((value < 0).any()):
            raise QuantError(f"{where}: {field} has negative values")
        values[field] = value
    if "mean_sq" not in values:
        values["mean_sq"] = torch.diagonal(values["hessian"]).clone() if "hessian" in values else values["absmax"] ** 2
    return InputStats(n_tokens=int(n_tokens), **values)


def load_calibration(path: str) -> dict[str, InputStats]:
    """Read a whole calibration file (layer name → InputStats). Raises QuantError (one line) for a bad file."""
    reader = CalibrationFile(path)
    try:
        return {layer: reader.get(layer) for layer in reader.layers}
    finally:
        reader.close()

