"""Streaming safetensors reader, with convert-to-quant's loader API.

The header is parsed and validated up front; tensor bytes are read with plain `readinto` calls (never mmap), so
the only resident memory is the tensors the caller currently holds. That is what keeps `--low-memory` flat.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..errors import QuantError
from .dtypes import SAFETENSORS_DTYPES, element_size, torch_dtype

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference implementation's own limit
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file. `start`/`end` are absolute file offsets in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def refuse_irregular(mode: int, label: str) -> None:
    """QuantError unless `mode` (an st_mode) is a regular file's; `label` names the file in the message."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "a special file")
        raise QuantError(f"{label}: is {kind}, not a regular file")


def require_regular(path: str, what: str = "") -> os.stat_result:
    """Stat `path` (through links) and refuse anything but a regular file, without opening it: opening a FIFO
    blocks until a writer comes, and a device can have effects. OSError (missing, no permission) propagates.
    `what` names the role in the message (e.g. "--calibration-data")."""
    info = os.stat(path)
    refuse_irregular(info.st_mode, f"{what} {path}" if what else path)
    return info


def open_regular(path: str, what: str = "", mode: str = "rb", buffering: int = -1, encoding: str | None = None):
    """Open a user's file for reading, refusing anything but a regular file before it can block (every place that
    reads a user file goes through this). The open itself is non-blocking and the opened file is checked again,
    so a FIFO swapped in after the stat cannot hang it either. OSError propagates for the caller to word."""
    require_regular(path, what)
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0))
    try:
        refuse_irregular(os.fstat(fd).st_mode, f"{what} {path}" if what else path)
        if nonblock:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, mode, buffering=buffering, encoding=encoding)


def _looks_like_pickle(head: bytes) -> bool:
    # zip container (torch.save >= 1.6) or a raw pickle stream (protocol 2+ starts with 0x80)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns (tensors in file order, `__metadata__` dict, data start offset in bytes). Raises QuantError with a
    one-line message for anything that is not a well-formed safetensors file.
    """
    with _open_safetensors(path) as f:
        return _parse_header(f, path)


def _open_safetensors(path: str):
    """The file opened for reading (unbuffered), after the checks that need no byte of it."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise QuantError(f"{path}: pickle checkpoints are refused (they can run code when loaded); "
                         "convert it to .safetensors with a tool you trust first")
    try:
        return open_regular(path, buffering=0)
    except OSError as e:
        raise QuantError(f"{path}: cannot read: {e.strerror or e}") from None


def _parse_header(f, path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Read and validate the header of the open file `f` (the same open file the tensors are then read from)."""
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = _read_up_to(f, 8)
        header_len = int.from_bytes(head, "little")
        if len(head) < 8 or header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            _refuse_bad_length(path, head, header_len, size)
        raw = _read_up_to(f, header_len)
    except OSError as e:
        raise QuantError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) < header_len:
        raise QuantError(f"{path}: truncated while reading its header")
    return decode_header(path, raw, 8 + header_len, size)


def _refuse_bad_length(path: str, head: bytes, header_len: int, size: int):
    # The messages never quote the length field: for a file that is not safetensors it is eight bytes of its content.
    if header_len > MAX_HEADER_BYTES and 8 + header_len <= size:
        raise QuantError(f"{path}: not a safetensors file, or its header is beyond the {MAX_HEADER_BYTES >> 20} MB "
                         "limit of the format")
    if _looks_like_pickle(head):
        raise QuantError(f"{path}: this is a pickle/zip checkpoint, not safetensors; it is refused, never unpickled")
    if len(head) < 8:
        raise QuantError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    raise QuantError(f"{path}: not a safetensors file or truncated (its first 8 bytes are not the length of a header "
                     f"that fits in its {size} bytes)")


def _read_up_to(f, n: int) -> bytes:
    """n bytes from an unbuffered file, fewer only at its end."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


MAX_DIMS = 64  # safetensors sets no limit; no real tensor comes near it
MAX_EXTENT = 1 << 63  # bytes a shape may describe, counting its zero dimensions as 1 (torch's int64 sizes)
ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def decode_header(path: str, raw: bytes, data_start: int,
                  size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate the header bytes `raw` of a file of `size` bytes whose data area starts at `data_start`.

    Every failure is a one-line QuantError: malformed or too deeply nested JSON, `__metadata__` that does not map
    strings to strings, an entry whose dtype/shape/offsets are of the wrong type or disagree, and data offsets
    that do not tile the data area exactly (no overlap, no gap, nothing after the last tensor)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QuantError(f"{path}: malformed safetensors header JSON ({' '.join(str(e).splitlines())[:100]})") from None
    if not isinstance(header, dict):
        raise QuantError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QuantError(f"{path}: malformed __metadata__ (must map strings to strings)")
    infos = [_tensor_info(path, name, entry, data_start, size) for name, entry in header.items()]
    _check_tiling(path, infos, data_start, size)
    return {info.name: info for info in infos}, metadata, data_start


def _tensor_info(path: str, name: str, entry, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {brief(name)}"
    if not isinstance(entry, dict) or any(k not in entry for k in ENTRY_KEYS):
        raise QuantError(f"{path}: header entry {brief(name)} is malformed (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = (entry[k] for k in ENTRY_KEYS)
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise QuantError(f"{where} has unknown dtype {brief(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise QuantError(f"{where} has an invalid shape {brief(shape)} (a list of at most {MAX_DIMS} "
                         "non-negative integers)")
    if math.prod(d or 1 for d in shape) * element_size(dtype) >= MAX_EXTENT:
        raise QuantError(f"{where} has an absurd shape {brief(shape)} (dimensions beyond 2^63 bytes)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise QuantError(f"{where} has invalid data offsets {brief(offsets)}")
    info = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if info.nbytes != info.numel * element_size(dtype):
        raise QuantError(f"{where} shape {brief(shape)} {dtype} needs {info.numel * element_size(dtype)} "
                         f"bytes but its offsets span {info.nbytes}")
    if info.end > size:
        raise QuantError(f"{path}: truncated: tensor {brief(name)} ends at byte {info.end} but the file has {size}")
    return info


def _check_tiling(path: str, infos: list[TensorInfo], data_start: int, size: int) -> None:
    """The tensors, in offset order, must cover the data area exactly once (the safetensors rule): a tensor that
    starts before the previous one ends overlaps it (zero-size tensors included), one that starts later leaves a
    gap, and bytes after the last one are refused too."""
    end, last = data_start, None
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        if info.start < end:
            raise QuantError(f"{path}: tensors {brief(last.name)} and {brief(info.name)} overlap in the file "
                             "(data offsets must tile the data area exactly)")
        if info.start > end:
            raise QuantError(f"{path}: {info.start - end} bytes before tensor {brief(info.name)} belong to no "
                             "tensor (data offsets must tile the data area exactly)")
        end, last = info.end, info
    if end != size:
        raise QuantError(f"{path}: {size - end} bytes after the last tensor belong to no tensor "
                         "(data offsets must tile the data area exactly)")


def brief(value, limit: int = 80) -> str:
    """A (JSON) value for a one-line message: its repr, cut to `limit` characters and to a few levels and items (a
    hostile value may be huge, or nested thousands deep, where a plain repr would be slow or overflow)."""
    text = " ".join(_brief(value, 3).splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _brief(value, depth: int) -> str:
    if isinstance(value, str):
        return repr(value[:200])
    if isinstance(value, (list, dict)):
        if depth == 0:
            return "[...]" if isinstance(value, list) else "{...}"
        items = list(itertools.islice(value.items() if isinstance(value, dict) else value, 8))
        shown = [f"{_brief(k, 0)}: {_brief(v, depth - 1)}" for k, v in items] if isinstance(value, dict) else \
            [_brief(v, depth - 1) for v in items]
        more = ", ..." if len(value) > len(items) else ""
        return ("{%s}" if isinstance(value, dict) else "[%s]") % (", ".join(shown) + more)
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<{value.bit_length()}-bit integer>"
    return repr(value)


def _is_count(value) -> bool:
    """A non-negative JSON integer (JSON's true/false are Python ints too, and are refused)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsReader:
    """convert-to-quant's `UnifiedSafetensorsLoader` API over a validated header.

    low_memory=False preloads every tensor (its standard mode, fast random access, ~model size of RAM);
    low_memory=True reads each tensor on demand and keeps nothing. The converter itself always streams
    (see `iter_tensors`), which is why its RAM does not grow with the model.
    """

    def __init__(self, path: str, low_memory: bool = True):
        self.path = path
        self.low_memory = low_memory
        self._file = _open_safetensors(path)  # header and tensors from this one open file
        try:
            self._infos, self._metadata, self._data_start = _parse_header(self._file, path)
        except BaseException:
            self._file.close()
            raise
        self._cache: dict[str, torch.Tensor] = {}
        if not low_memory:
            for name in self._infos:
                self._cache[name] = self._read(self._infos[name])

    # --- convert-to-quant's API -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def get_ndim(self, key: str) -> int:
        return len(self.info(key).shape)

    def get_tensor(self, key: str) -> torch.Tensor:
        if key in self._cache:
            return self._cache[key]
        return self._read(self.info(key))

    def mark_processed(self, key: str) -> None:
        self._cache.pop(key, None)

    def close(self) -> None:
        self._cache.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- extras ---------------------------------------------------------------------------------------------
    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def get_dtype(self, key: str) -> str:
        return self.info(key).dtype

    def _read(self, info: TensorInfo) -> torch.Tensor:
        dtype = torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        read_exact(self._file, buf, info.start, self.path, info.name)
        return buf.view(dtype).reshape(info.shape)

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        """(role, path) of the files this source reads (io.source.ComputedSource has the same)."""
        return (("input", self.path),)

    @property
    def source_bytes(self) -> int:
        """The size of the source as held: the file's (bytes)."""
        return os.fstat(self._file.fileno()).st_size

    def iter_tensors(self, keys: Iterable[str], prefetch_bytes: int = 0,
                     exact: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) in the given order.

        prefetch_bytes > 0 asks the kernel to read ahead that many bytes of the coming tensors (posix_fadvise), so
        disk reads overlap the caller's work without using a CPU (for CUDA, `io.device_feed.DeviceFeed` reads on a
        thread into pinned memory instead). `exact` (the keys to be quantized, which a computed source gives
        unrounded) changes nothing here: a file's tensors are exactly what it stores."""
        keys = list(keys)
        advised, ahead = 0, 0  # first key not yet advised; bytes advised but not yet read
        for i, key in enumerate(keys):
            while prefetch_bytes > 0 and advised < len(keys) and (advised <= i or ahead < prefetch_bytes):
                info = self.info(keys[advised])
                _will_need(self._file.fileno(), info.start, info.nbytes)
                ahead += info.nbytes
                advised += 1
            yield key, self.get_tensor(key)
            ahead -= self.info(key).nbytes


def read_exact(file, buffer: torch.Tensor, offset: int, path: str, name: str) -> None:
    """Fill the uint8 CPU tensor `buffer` with the file's bytes from `offset` (unbuffered file; seek + readinto)."""
    view = memoryview(buffer.numpy())
    file.seek(offset)
    got = 0
    while got < len(view):
        n = file.readinto(view[got:])
        if not n:
            raise QuantError(f"{path}: truncated while reading tensor {name!r}")
        got += n


def _will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading [offset, offset + length) of the file into the page cache (no CPU used)."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


# convert-to-quant's class name, for users of its loader API.
UnifiedSafetensorsLoader = SafetensorsReader
