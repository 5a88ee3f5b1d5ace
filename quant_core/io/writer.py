"""Incremental, atomic safetensors writer.

Tensor bytes are appended to a temporary file next to the output as soon as they are produced; the header is
written last into space reserved at the front (padded with spaces, which JSON allows), so nothing but the tensor
in hand sits in memory. The file appears under its real name only after fsync, by an atomic link/rename.
Tensors whose byte size is not a multiple of 8 (markers, odd-length biases) are held back and written at the end,
so that every large tensor starts 8-byte aligned for loaders that map the file.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import threading
from typing import Iterable

import torch

from ..errors import QuantError
from .dtypes import tag_of

ALIGN = 8
DEFER_MAX_BYTES = 1 << 20  # unaligned tensors up to this size are deferred to the end of the file
OFFSET_DIGITS = 20  # widest offset JSON can hold for a u64


def header_reserve(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> int:
    """Bytes to reserve for the header of a file holding `entries` (name, dtype tag, shape) and `metadata`,
    with every offset at its widest and room for per-layer fallbacks that rename or add small tensors."""
    big = 10 ** (OFFSET_DIGITS - 1)
    header = {name: {"dtype": tag, "shape": list(shape), "data_offsets": [big, big]} for name, tag, shape in entries}
    header["__metadata__"] = metadata
    size = len(json.dumps(header, separators=(",", ":")).encode())
    return _round_up(size + size // 4 + 4096, ALIGN)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


TEMP_SUFFIX = ".partial"


def _temp_name(output: str, pid: int) -> str:
    """Hidden, next to the output (same file system, so the final link/rename is atomic), tagged with the pid."""
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{pid}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(output: str) -> list[str]:
    """Delete temporary files that an interrupted run (a process no longer alive) left for this output.
    Returns their paths. Files of a live run, or anything not matching the pattern exactly, are left alone."""
    directory, base = os.path.dirname(output), os.path.basename(output)
    removed = []
    prefix = f".{base}."
    for name in os.listdir(directory):
        pid = name[len(prefix):-len(TEMP_SUFFIX)] if name.startswith(prefix) and name.endswith(TEMP_SUFFIX) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except OSError:
                pass
    return removed


def _tensor_bytes(tensor: torch.Tensor):
    """A zero-copy byte view of a CPU tensor (any dtype, including bf16/fp8/bool)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


SYNC_EVERY_BYTES = 256 << 20  # background writes: start flushing to disk every this many bytes


class _BackgroundWrites:
    """Appends byte buffers to a file on a thread, so disk writes overlap the caller's quantization. At most
    `max_pending` bytes wait in memory; an error is re-raised in the caller at its next call.

    Every SYNC_EVERY_BYTES a second thread flushes what was written so far (fdatasync), so the disk writes all
    through the conversion instead of holding gigabytes of dirty page cache for the final fsync."""

    def __init__(self, file, max_pending: int):
        self._file, self._max = file, max_pending
        self._queue: queue.Queue = queue.Queue()
        self._pending, self._error = 0, None
        self._room = threading.Condition()
        self._unsynced = 0
        self._sync_wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="safetensors-flusher", daemon=True)
        self._thread.start()
        self._flusher.start()

    def _drain(self):
        while (item := self._queue.get()) is not None:
            data, size, before, after = item
            try:
                if self._error is None:
                    if before is not None:
                        before()
                    self._file.write(data)
                    self._unsynced += size
                    if self._unsynced >= SYNC_EVERY_BYTES:
                        self._unsynced = 0
                        self._sync_wanted.set()
            except BaseException as e:  # handed to the caller
                self._error = e
            finally:
                if after is not None:
                    after()
            with self._room:
                self._pending -= size
                self._room.notify_all()

    def _flush_loop(self):
        sync = getattr(os, "fdatasync", os.fsync)
        while True:
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            if self._closing:
                return
            try:
                sync(self._file.fileno())
            except OSError as e:  # a failing disk: report it, as the final fsync would
                self._error = self._error or e

    def write(self, data, size: int, before=None, after=None) -> None:
        """Queue `data` (`size` bytes); `before()` runs on the writer thread just before it is written (e.g. wait
        for the device copy that fills it), `after()` once it is written or dropped (e.g. hand its buffer back)."""
        self.raise_error()
        with self._room:
            self._room.wait_for(lambda: self._pending == 0 or self._pending + size <= self._max)
            self._pending += size
        self._queue.put((data, size, before, after))

    def flush(self) -> None:
        with self._room:
            self._room.wait_for(lambda: self._pending == 0)
        self.raise_error()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._closing = True
        self._sync_wanted.set()
        self._flusher.join()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


_LIVE_TEMPS: set[str] = set()  # this process's temporary files, not yet published or removed


def remove_live_temps() -> None:
    """Remove this process's unpublished temporary files. The CLI calls it when Ctrl-C/SIGTERM unwinds: a signal can
    land where no context manager runs (between the constructor's return and `__enter__`), which would otherwise
    leave the temporary file behind."""
    for path in list(_LIVE_TEMPS):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        _LIVE_TEMPS.discard(path)


class StreamingWriter:
    """Write a safetensors file tensor by tensor. Use as a context manager: an exception (or a missing
    `publish()`) removes the temporary file and leaves nothing under the output name."""

    def __init__(self, output: str, reserve: int, overwrite: bool = False, background_bytes: int = 0):
        """`background_bytes` > 0 writes on a thread with up to that many bytes waiting in memory."""
        self.output = os.path.abspath(output)
        self.overwrite = overwrite
        directory = os.path.dirname(self.output)
        if not os.path.isdir(directory):
            raise QuantError(f"{output}: output directory {directory} does not exist")
        if os.path.exists(self.output) and not overwrite:
            raise QuantError(f"{output}: already exists; pass --overwrite to replace it")
        self.stale_removed = remove_stale_temps(self.output)
        self.temp = _temp_name(self.output, os.getpid())
        _LIVE_TEMPS.add(self.temp)  # before the file exists: no window in which it exists unregistered
        self.reserve = reserve
        self._entries: dict[str, dict] = {}
        self._deferred: list[tuple[str, torch.Tensor]] = []
        self._names: set[str] = set()
        self._pos = 0  # bytes of tensor data written so far
        self._finished = self._published = False
        self._file = self._background = None
        self._ring = self._copy_stream = None  # pinned buffers and a stream for CUDA tensors, made on first use
        try:  # __exit__ never runs for an exception in here (e.g. Ctrl-C right after the temp file is created)
            self._file = open(self.temp, "w+b")
            self._file.seek(reserve)
            self._background = _BackgroundWrites(self._file, background_bytes) if background_bytes > 0 else None
        except BaseException as e:
            if self._file is not None:
                self._file.close()
            if os.path.exists(self.temp):  # the name holds our PID: nobody else's file
                os.unlink(self.temp)
            if isinstance(e, OSError):
                raise QuantError(f"{output}: cannot write to {directory}: {e.strerror or e}") from None
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._published:
            self.abort()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise QuantError(f"{self.output}: disk full (or file size limit reached) while writing: "
                             f"{exc.strerror}; nothing was written") from None
        return False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device). With background writes, a CUDA tensor is copied into pinned buffers
        on a copy stream and written from there without blocking the caller; otherwise it is moved to the CPU."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes % ALIGN and nbytes <= DEFER_MAX_BYTES:
            self._deferred.append((name, tensor.detach().cpu()))
            return
        if tensor.is_cuda and self._background is not None:
            self._write_from_device(name, tensor, nbytes)
            return
        self._write(name, tensor.detach().cpu(), nbytes)

    def _write_from_device(self, name: str, tensor: torch.Tensor, nbytes: int) -> None:
        from .device_feed import PinnedRing, SLOT_BYTES, SLOTS
        if self._ring is None or self._ring.device != tensor.device:
            self._ring = PinnedRing(SLOTS, SLOT_BYTES, tensor.device)
            self._copy_stream = torch.cuda.Stream(tensor.device)
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed on the caller's stream
        flat.record_stream(stream)  # its memory is not reused before the copy below has read it
        ring = self._ring
        for offset in range(0, nbytes, ring.size):
            n = min(ring.size, nbytes - offset)
            buffer, event = ring.take()
            with torch.cuda.stream(stream):
                buffer[:n].copy_(flat[offset:offset + n], non_blocking=True)
                event.record(stream)
            self._background.write(buffer[:n].numpy(), n, before=event.synchronize,
                                   after=lambda b=buffer, e=event: ring.give(b, e))
        self._record(name, tensor, nbytes)

    def _write(self, name: str, tensor: torch.Tensor, nbytes: int) -> None:
        if self._background is not None:
            self._background.write(_tensor_bytes(tensor), nbytes)  # the numpy view keeps the tensor alive
        else:
            self._file.write(_tensor_bytes(tensor))
        self._record(name, tensor, nbytes)

    def _record(self, name: str, tensor: torch.Tensor, nbytes: int) -> None:
        self._entries[name] = {"dtype": tag_of(tensor.dtype), "shape": list(tensor.shape),
                               "data_offsets": [self._pos, self._pos + nbytes]}
        self._pos += nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the deferred tensors and the header, and fsync. The file is complete but still temporary."""
        for name, tensor in sorted(self._deferred, key=lambda item: -item[1].element_size()):
            self._write(name, tensor, tensor.numel() * tensor.element_size())
        self._deferred.clear()
        self._stop_background()
        header = dict(self._entries)
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        if len(blob) + 8 > self.reserve:
            self._shift_data(len(blob))
        blob = blob.ljust(self.reserve - 8, b" ")
        self._file.seek(0)
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._finished = True

    def publish(self) -> str:
        """Move the finished file under its real name (atomically). Returns the output path."""
        if not self._finished:
            raise RuntimeError("publish() before finish()")
        self._publish()
        self._published = True
        _LIVE_TEMPS.discard(self.temp)
        return self.output

    def _shift_data(self, header_len: int) -> None:
        """The reservation was too small (should not happen): move the data back to make room. Slow but correct."""
        new_reserve = _round_up(header_len + 8, ALIGN)
        shift = new_reserve - self.reserve
        self._file.flush()
        chunk = 64 << 20
        end = self.reserve + self._pos
        while end > self.reserve:
            start = max(self.reserve, end - chunk)
            self._file.seek(start)
            data = self._file.read(end - start)
            self._file.seek(start + shift)
            self._file.write(data)
            end = start
        self.reserve = new_reserve

    def _publish(self) -> None:
        try:
            if self.overwrite:
                os.replace(self.temp, self.output)
            else:
                try:
                    os.link(self.temp, self.output)  # atomic, and fails rather than replace a file that appeared meanwhile
                except FileExistsError:
                    raise QuantError(f"{self.output}: appeared while converting; pass --overwrite to replace it") from None
                except OSError:  # file systems without hard links
                    os.replace(self.temp, self.output)
                if os.path.exists(self.temp):
                    os.unlink(self.temp)
            dir_fd = os.open(os.path.dirname(self.output), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            self._remove_temp()
            raise

    def _stop_background(self) -> None:
        if self._background is not None:
            background, self._background = self._background, None
            try:
                background.flush()
            finally:
                background.close()

    def abort(self) -> None:
        try:
            self._stop_background()
        except BaseException:
            pass  # the write error is already being reported (or superseded by the caller's)
        if self._file is not None:
            self._file.close()
            self._file = None
        self._remove_temp()

    def _remove_temp(self) -> None:
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass
        _LIVE_TEMPS.discard(self.temp)
