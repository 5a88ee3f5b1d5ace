"""The calibration statistics file (docs/CALIBRATION.md): one safetensors file, keys `<layer>.<statistic>`.

Besides the keys of §4 this project writes two optional ones (README "Calibration file"): `<layer>.input_mean`
(fp32 [K], E[x], for bias correction), `<layer>.heldout_hessian` (fp32 [K,K], E[x xᵀ] over tokens the methods do
not see) and `<layer>.heldout_mean` (fp32 [K]), for the report's held-out output SQNR, and `<layer>.input_sample` /
`<layer>.heldout_input_sample` (bf16 [S, K], a uniform sample of the rows) for the run-time (activation-quantized)
figures, and `<layer>.output_gain` (fp32 [N], how much of the layer's output noise reaches the model's output:
`calib.record.record_output_gains`) for the automatic chooser (`select/auto.py`). Readers that do not know them
ignore them.
"""
from __future__ import annotations

import json
from typing import Callable, Iterable

import torch

from ..errors import QuantError
from ..io.dtypes import tag_of
from ..io.reader import SafetensorsReader, require_regular
from ..io.writer import StreamingWriter, header_reserve
from .stats import MAX_SAMPLE_ROWS, SAMPLE_DTYPE, InputStats

FORMAT_NAME = "quant_calibration"
VERSION = "1"
SUFFIXES = {  # statistic suffix → InputStats field
    "input_absmax": "absmax", "input_mean_sq": "mean_sq", "hessian": "hessian", "input_mean": "mean",
    "heldout_hessian": "heldout_hessian", "heldout_mean": "heldout_mean", "input_scale": "input_scale", "n_tokens": "n_tokens",
    "heldout_mean_sq": "heldout_mean_sq", "heldout_n_tokens": "heldout_n_tokens",
    "input_sample": "input_sample", "heldout_input_sample": "heldout_input_sample", "output_gain": "output_gain",
}
COUNTS = ("n_tokens", "heldout_n_tokens")  # integer statistics (I64 scalars)
SAMPLES = ("input_sample", "heldout_input_sample")  # rows [S, K], stored as BF16 (all other statistics: F32)
INPUT_KINDS = ("recorded", "captured", "synthetic")  # __metadata__ "inputs": what the statistics describe
REQUIRED = ("input_absmax", "n_tokens")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # statistics; FP8 cannot hold them
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def save_calibration(path: str, stats: dict[str, InputStats], source: str, overwrite: bool = False,
                     metadata: dict[str, str] | None = None) -> None:
    """Write per-layer statistics (layer name → InputStats) as a calibration file, the way converted files are
    written (temporary, fsync, atomic rename; an existing file only with `overwrite`). `metadata` adds header keys
    (`inputs`: recorded, captured or synthetic; default recorded)."""
    layout = {layer: stats_layout(s) for layer, s in stats.items()}
    write_calibration_stream(path, layout, stats.__getitem__, source, overwrite, metadata)


def stats_layout(s: InputStats) -> dict[str, tuple[int, ...]]:
    """The keys (statistic suffix → shape) a layer's statistics are written as."""
    layout = {}
    for suffix, field in SUFFIXES.items():
        value = getattr(s, field)
        if value is not None:
            layout[suffix] = () if suffix in COUNTS else tuple(value.shape)
    return layout


def write_calibration_stream(path: str, layout: dict[str, dict[str, tuple[int, ...]]],
                             produce: Callable[[str], InputStats], source: str, overwrite: bool = False,
                             metadata: dict[str, str] | None = None) -> None:
    """Write a calibration file one layer at a time: `layout` (layer → statistic suffix → shape) is known up front,
    `produce(layer)` gives each layer's statistics when its turn comes, so only one layer is in memory."""
    meta = {"format": FORMAT_NAME, "version": VERSION, "source": source, "inputs": "recorded", **(metadata or {})}
    if meta["inputs"] not in INPUT_KINDS:
        raise ValueError(f"inputs must be one of {INPUT_KINDS}")
    entries = [(f"{layer}.{suffix}", _tag(suffix), shape)
               for layer, keys in layout.items() for suffix, shape in keys.items()]
    with StreamingWriter(path, header_reserve(entries, meta), overwrite=overwrite) as writer:
        for layer, keys in layout.items():
            s = produce(layer)
            for suffix in keys:
                value = getattr(s, SUFFIXES[suffix])
                if suffix in COUNTS:
                    writer.add(f"{layer}.{suffix}", torch.tensor(int(value), dtype=torch.int64))
                elif suffix in SAMPLES:
                    writer.add(f"{layer}.{suffix}", value.detach().to(SAMPLE_DTYPE).cpu().clone())
                else:  # own storage: layers may share tensors
                    writer.add(f"{layer}.{suffix}", value.detach().float().cpu().clone())
        writer.finish(meta)
        writer.publish()


def _tag(suffix: str) -> str:
    return "I64" if suffix in COUNTS else "BF16" if suffix in SAMPLES else "F32"


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
        self.metadata = meta
        self.inputs = meta.get("inputs") or ("synthetic" if self.source.startswith("synthetic") else "recorded")
        self.layers = self._index(self._file.keys())

    @property
    def recorded(self) -> bool:
        """Whether the statistics describe a model's real inputs (recorded or captured), not synthetic ones."""
        return self.inputs in ("recorded", "captured")

    def capture_info(self) -> dict:
        """What a capture recorded (runs, prompts, timesteps, …): the header's `capture` JSON, {} if none."""
        try:
            info = json.loads(self.metadata.get("capture") or "{}")
        except ValueError:
            raise QuantError(f"--calibration-data {self.path}: header key capture is not valid JSON") from None
        if not isinstance(info, dict):
            raise QuantError(f"--calibration-data {self.path}: header key capture must be a JSON object")
        return info

    def widths(self) -> dict[str, int]:
        """Each layer's input width K (the length of its input_absmax), from the header alone; None where
        input_absmax is not a vector (the layer's read then says what is wrong)."""
        shapes = {layer: self._file.info(f"{layer}.input_absmax").shape for layer in self.layers}
        return {layer: shape[0] if len(shape) == 1 else None for layer, shape in shapes.items()}

    def sample_rows(self, layer: str, suffix: str = "input_sample") -> int:
        """The number of rows of a layer's input sample (`suffix`: or heldout_input_sample), from the header; 0 if
        it has none."""
        if suffix not in self.layers.get(layer, ()):
            return 0
        shape = self._file.info(f"{layer}.{suffix}").shape
        return shape[0] if len(shape) == 2 else 0

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
    counts = {}
    for name in COUNTS:
        if name in values:
            count = values.pop(name)
            if count.numel() != 1 or count.dtype not in INT_DTYPES or int(count) <= 0:
                raise QuantError(f"{where}.{name} must be one positive integer")
            counts[name] = int(count)
    absmax = values["absmax"]
    if absmax.dim() != 1:
        raise QuantError(f"{where}: absmax has shape {list(absmax.shape)}, expected [K] (one value per input feature)")
    k = absmax.shape[0] if k is None else k
    expected = {"absmax": (k,), "mean_sq": (k,), "mean": (k,), "hessian": (k, k), "heldout_hessian": (k, k),
                "heldout_mean": (k,), "heldout_mean_sq": (k,)}
    for field, value in values.items():
        want = expected.get(field)
        if field in SAMPLES and (value.dim() != 2 or value.shape[1] != k or not 0 < value.shape[0] <= MAX_SAMPLE_ROWS):
            raise QuantError(f"{where}: {field} has shape {list(value.shape)}, expected [S, {k}] (S rows of the "
                             f"layer's K={k} inputs, 1 ≤ S ≤ {MAX_SAMPLE_ROWS})")
        if field == "input_scale" and value.numel() != 1 or want is not None and tuple(value.shape) != want:
            raise QuantError(f"{where}: {field} has shape {list(value.shape)}, expected "
                             f"{list(want or ())} (K={k} input features of the layer)")
        if value.dtype not in FLOAT_DTYPES:
            raise QuantError(f"{where}: {field} is {str(value.dtype).removeprefix('torch.')}; statistics are stored "
                             "as F32 (or F64/F16/BF16)")
        value = value.float()  # F64 values beyond the F32 range become inf here: checked below
        if not bool(torch.isfinite(value).all()):
            raise QuantError(f"{where}: {field} must hold finite floating-point values")
        if field == "output_gain" and value.dim() != 1:
            raise QuantError(f"{where}: output_gain has shape {list(value.shape)}, expected [N] (one value per output "
                             "channel of the layer)")
        if field in ("absmax", "mean_sq", "input_scale", "heldout_mean_sq", "output_gain") and bool((value < 0).any()):
            raise QuantError(f"{where}: {field} has negative values")
        values[field] = value
    if "mean_sq" not in values:
        values["mean_sq"] = torch.diagonal(values["hessian"]).clone() if "hessian" in values else values["absmax"] ** 2
    return InputStats(**counts, **values)


def load_calibration(path: str) -> dict[str, InputStats]:
    """Read a whole calibration file (layer name → InputStats). Raises QuantError (one line) for a bad file."""
    reader = CalibrationFile(path)
    try:
        return {layer: reader.get(layer) for layer in reader.layers}
    finally:
        reader.close()

