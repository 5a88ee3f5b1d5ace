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
import secrets
import shutil
import stat
import threading
from typing import Iterable

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are judged by PID there (see _remove_if_unlocked)
    fcntl = None

import torch

from ..errors import QuantError
from .dtypes import element_size, tag_of
from .reader import refuse_irregular

ALIGN = 8
DEFER_MAX_BYTES = 1 << 20  # unaligned tensors up to this size are deferred to the end of the file
OFFSET_DIGITS = 20  # widest offset JSON can hold for a u64


class Reservation(int):
    """The header bytes to reserve (an int), carrying the planned tensor bytes (`data_bytes`): a writer given it can
    say how large the file will be (e.g. how much space a full disk lacked)."""

    data_bytes: int = 0

    def __new__(cls, value: int, data_bytes: int = 0):
        obj = super().__new__(cls, value)
        obj.data_bytes = data_bytes
        return obj


def header_reserve(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> Reservation:
    """Bytes to reserve for the header of a file holding `entries` (name, dtype tag, shape) and `metadata`,
    with every offset at its widest and room for per-layer fallbacks that rename or add small tensors."""
    big = 10 ** (OFFSET_DIGITS - 1)
    entries = list(entries)
    header = {name: {"dtype": tag, "shape": list(shape), "data_offsets": [big, big]} for name, tag, shape in entries}
    header["__metadata__"] = metadata
    size = len(json.dumps(header, separators=(",", ":")).encode())
    data = sum(_numel(shape) * element_size(tag) for _, tag, shape in entries)
    return Reservation(_round_up(size + size // 4 + 4096, ALIGN), data)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


TEMP_SUFFIX = ".partial"
TEMP_ATTEMPTS = 16
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# A temporary is always a new file: never opened through a link someone planted, never one that exists already.
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)


def _new_token() -> str:
    return "t" + secrets.token_hex(4)


def _is_token(token: str) -> bool:
    return len(token) == 9 and token[0] == "t" and all(c in "0123456789abcdef" for c in token[1:])


def _temp_name(output: str, pid: int, token: str) -> str:
    """Hidden, next to the output (same file system, so the final link/rename is atomic), tagged with the pid and
    a random token (two runs with one PID number, in different PID namespaces, never share a name)."""
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{pid}.{token}{TEMP_SUFFIX}")


def _create_temp(output: str) -> tuple[str, int]:
    """Create and lock this run's temporary file next to `output`; returns (path, fd opened read-write). The lock
    is held until the file is published or removed: it is what tells other runs' cleanup that the file is live."""
    for _ in range(TEMP_ATTEMPTS):
        temp = _temp_name(output, os.getpid(), _new_token())
        _LIVE_TEMPS.add(temp)  # before the file exists: no window in which it exists unregistered
        try:
            fd = os.open(temp, _CREATE_FLAGS, 0o666)
        except FileExistsError:  # a name taken (or a link planted there): never written through, try another
            _LIVE_TEMPS.discard(temp)
            continue
        except BaseException:
            _LIVE_TEMPS.discard(temp)
            raise
        if _lock_fresh(fd, temp):
            return temp, fd
        os.close(fd)  # a cleanup locked it in the instant before we did: it removes it; take another name
        _LIVE_TEMPS.discard(temp)
    raise QuantError(f"{output}: cannot create a temporary file next to it ({TEMP_ATTEMPTS} names taken)")


def _lock_fresh(fd: int, temp: str) -> bool:
    """Lock a just-created temporary; False if a stale-file cleanup took it first (then it is, or will be, gone)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a file system without locks: unlocked files are never judged stale (_remove_if_unlocked)
    try:
        now = os.stat(temp, follow_symlinks=False)
    except FileNotFoundError:
        return False
    info = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _parse_temp(name: str, base: str) -> tuple[int, bool] | None:
    """(pid, whether it is a locking writer's name) of a temporary file of output `base`; None for other names."""
    prefix = f".{base}."
    if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
        return None
    pid, _, token = name[len(prefix):-len(TEMP_SUFFIX)].partition(".")
    if not pid.isdigit() or token and not _is_token(token):
        return None
    return int(pid), bool(token)


def remove_stale_temps(output: str) -> list[str]:
    """Delete temporary files that interrupted runs left for this output. Returns their paths.

    A temporary is stale when its lock can be taken: a live writer holds it until it publishes or aborts, whatever
    PID namespace it runs in. (Names without a token come from versions that did not lock: judged by their PID, as
    those versions did.) This process's own temporaries, and anything not matching the pattern exactly, are left."""
    directory, base = os.path.dirname(output), os.path.basename(output)
    removed = []
    for name in sorted(os.listdir(directory)):
        parsed = _parse_temp(name, base)
        path = os.path.join(directory, name)
        if parsed is None or path in _LIVE_TEMPS:
            continue
        pid, locking = parsed
        if (locking or not _pid_alive(pid)) and _remove_if_unlocked(path, pid):
            removed.append(path)
    return removed


def _remove_if_unlocked(path: str, pid: int) -> bool:
    """Delete the temporary at `path` if no live writer holds its lock (the lock is held while deleting, and the
    name checked to still be the file locked). A FIFO, link or anything else there is left alone."""
    if fcntl is None:  # Windows: no PID namespaces, and a file a live writer holds open cannot be deleted
        return not _pid_alive(pid) and _unlink_quietly(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live writer holds it, or no locks here
        now = os.stat(path, follow_symlinks=False)
        return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino) and _unlink_quietly(path)
    except OSError:
        return False
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


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

    def __init__(self, output: str, reserve: int, overwrite: bool = False, background_bytes: int = 0,
                 expected_bytes: int | None = None):
        """`background_bytes` > 0 writes on a thread with up to that many bytes waiting in memory. `expected_bytes`:
        the file's planned size, for the message when the disk fills (default: from a `header_reserve` result)."""
        self.output = os.path.abspath(output)
        self.overwrite = overwrite
        directory = os.path.dirname(self.output)
        if not os.path.isdir(directory):
            raise QuantError(f"{output}: output directory {directory} does not exist")
        if os.path.lexists(self.output) and not overwrite:
            raise QuantError(f"{output}: already exists; pass --overwrite to replace it")
        self.stale_removed = remove_stale_temps(self.output)
        self.reserve = reserve
        data_bytes = getattr(reserve, "data_bytes", None)
        self.expected_bytes = expected_bytes if expected_bytes is not None else (
            reserve + data_bytes if data_bytes else None)
        self._entries: dict[str, dict] = {}
        self._deferred: list[tuple[str, torch.Tensor]] = []
        self._names: set[str] = set()
        self._pos = 0  # bytes of tensor data written so far
        self._finished = self._published = False
        self.temp = self._file = self._background = self._lock_fd = None
        self._ring = self._copy_stream = None  # pinned buffers and a stream for CUDA tensors, made on first use
        try:  # __exit__ never runs for an exception in here (e.g. Ctrl-C right after the temp file is created)
            self.temp, self._lock_fd = _create_temp(self.output)  # this fd holds the lock until publish/abort
            self._file = os.fdopen(os.dup(self._lock_fd), "w+b")
            self._file.seek(reserve)
            self._background = _BackgroundWrites(self._file, background_bytes) if background_bytes > 0 else None
        except BaseException as e:
            self._close_file()
            self._remove_temp()
            if isinstance(e, OSError):
                raise QuantError(f"{output}: cannot write to {directory}: {e.strerror or e}") from None
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._published:
            self.abort()
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            needed = self.expected_bytes or self.reserve + self._pos + sum(
                t.numel() * t.element_size() for _, t in self._deferred)
            raise QuantError(disk_full_message(self.output, exc, needed, self.expected_bytes is None)
                             + "; nothing was written") from None
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
        try:
            _publish_temp(self.temp, self.output, self.overwrite)
        except BaseException:
            self._remove_temp()
            raise
        self._published = True
        _LIVE_TEMPS.discard(self.temp)
        self._release_lock()
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

    def _stop_background(self) -> None:
        if self._background is not None:
            background, self._background = self._background, None
            try:
                background.flush()
            finally:
                background.close()

    def abort(self) -> None:
        """Remove the temporary file, whatever state the writes are in (a failed flush fails again on close)."""
        try:
            self._stop_background()
        except BaseException:
            pass  # the write error is already being reported (or superseded by the caller's)
        finally:
            self._close_file()
            self._remove_temp()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # buffered bytes that could not be written (a full disk): the file is closed regardless

    def _remove_temp(self) -> None:
        """Unlink the temporary, then let go of its lock (never an unlocked temporary under our name)."""
        if self.temp is not None:
            _unlink_quietly(self.temp)
            _LIVE_TEMPS.discard(self.temp)
        self._release_lock()

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_message(path: str, exc: OSError, needed: int, at_least: bool = False) -> str:
    """One line: the disk (or the file size limit) ran out while writing `path`, with the space the file needs."""
    try:
        free = f", {_size(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)} free there"
    except OSError:
        free = ""
    return (f"{path}: disk full (or file size limit reached) while writing ({exc.strerror or exc}): the file needs "
            f"{'more than ' if at_least else ''}{_size(needed)}{free}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _publish_temp(temp: str, output: str, overwrite: bool) -> None:
    """Give the finished temporary its real name, atomically: replace with `overwrite`, else a hard link that fails
    rather than replace a file that appeared meanwhile. The directory entry is then synced (best effort)."""
    if overwrite:
        os.replace(temp, output)
    else:
        try:
            os.link(temp, output)
        except FileExistsError:
            raise QuantError(f"{output}: appeared while converting; pass --overwrite to replace it") from None
        except OSError as e:
            if e.errno in FULL_ERRNOS:
                raise
            os.replace(temp, output)  # file systems without hard links
        _unlink_quietly(temp)
    try:
        dir_fd = os.open(os.path.dirname(output), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # the file itself was synced; some file systems cannot sync a directory
    finally:
        os.close(dir_fd)


def check_target(path: str, inputs: Iterable[tuple[str, str | None]], overwrite: bool, what: str = "output",
                 flag: str = "-o") -> None:
    """Refuse, before any work, a place where a file of ours (`what`: the output, the report…) cannot go: one of the
    run's own files (`inputs`: (role, path) pairs; even with --overwrite), a directory, a missing or read-only
    folder, an existing file without --overwrite, or anything there that is not a regular file (a FIFO, /dev/full)."""
    for role, source in inputs:
        if source and _same_file(path, source):
            raise QuantError(f"{path}: {what} path equals the {role}; choose another {flag}")
    if os.path.isdir(path):
        raise QuantError(f"{path}: is a directory; give a file name for the {what}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise QuantError(f"{path}: {what} directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise QuantError(f"{path}: {what} directory {directory} is not writable")
    if os.path.exists(path):  # through a link: what replacing the name would hide
        try:
            refuse_irregular(os.stat(path).st_mode, path)
        except QuantError as e:
            raise QuantError(f"{e}; choose another {flag}") from None
    if os.path.lexists(path) and not overwrite:
        raise QuantError(f"{path}: already exists; pass --overwrite to replace it")


def _same_file(a: str, b: str) -> bool:
    if os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b)):
        return True
    try:
        return os.path.samefile(a, b)  # stats only: a FIFO is never opened here
    except OSError:
        return False


def write_file_atomic(path: str, data: bytes, overwrite: bool = False) -> str:
    """Write a small file (the JSON report) the way the output is written: a locked temporary created exclusively
    next to it, fsync, then an atomic link/rename. On failure nothing is left under `path` nor beside it; the
    error is a one-line QuantError. Returns the absolute path."""
    path = os.path.abspath(path)
    try:
        remove_stale_temps(path)  # a temporary of a run killed while writing this file
        temp, lock_fd = _create_temp(path)
    except OSError as e:
        raise QuantError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(os.dup(lock_fd), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish_temp(temp, path, overwrite)
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            raise QuantError(f"{disk_full_message(path, e, len(data))}; {path} was not written") from None
        raise QuantError(f"{path}: cannot write: {e.strerror or e}; it was not written") from None
    finally:
        _unlink_quietly(temp)  # gone already once published
        _LIVE_TEMPS.discard(temp)
        os.close(lock_fd)
    return path
