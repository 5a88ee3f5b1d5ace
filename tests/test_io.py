"""Streaming reader (the seed's loader API, every dtype, bad files) and the atomic incremental writer."""
import json
import os
import time

import pytest
import torch
from safetensors import safe_open

from quant_core.errors import QuantError
from quant_core.io import SafetensorsReader, StreamingWriter, UnifiedSafetensorsLoader, header_reserve, read_header

ALL_DTYPES = {
    "f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
    "f8e4": torch.float8_e4m3fn, "f8e5": torch.float8_e5m2, "i64": torch.int64, "i32": torch.int32,
    "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool,
}


def sample_tensors():
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, dtype in ALL_DTYPES.items():
        base = torch.randn(3, 5, generator=g) * 10
        out[name] = base > 0 if dtype == torch.bool else base.to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


@pytest.mark.parametrize("low_memory", [True, False])
def test_loader_api_reads_every_dtype_exactly(make_file, low_memory):
    tensors = sample_tensors()
    path = make_file(tensors, metadata={"a": "b"})
    with UnifiedSafetensorsLoader(path, low_memory=low_memory) as loader:
        assert sorted(loader.keys()) == sorted(tensors)
        assert loader.metadata() == {"a": "b"}
        for key, ref in tensors.items():
            assert loader.get_shape(key) == tuple(ref.shape)
            assert loader.get_ndim(key) == ref.dim()
            got = loader.get_tensor(key)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)) if ref.numel() else True
            loader.mark_processed(key)


def test_prefetching_iterator_yields_in_order_and_propagates_errors(make_file):
    tensors = {f"t{i}": torch.full((64, 64), float(i)) for i in range(12)}
    path = make_file(tensors)
    with SafetensorsReader(path) as reader:
        order = [f"t{i}" for i in (5, 0, 11, 3)]
        got = [(k, float(t[0, 0])) for k, t in reader.iter_tensors(order, prefetch_bytes=20000)]
        assert got == [(k, float(k[1:])) for k in order]
        with pytest.raises(KeyError):
            list(reader.iter_tensors(["t1", "nope"], prefetch_bytes=1 << 20))


def write_raw(path, header: dict, data: bytes = b"", header_len=None):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((header_len if header_len is not None else len(blob)).to_bytes(8, "little") + blob + data)
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("empty", "too short"),
    ("text", "not a safetensors file or truncated"),
    ("pickle", "pickle"),
    ("zip", "pickle/zip"),
    ("header_len_lies", "truncated"),
    ("bad_json", "malformed safetensors header JSON"),
    ("unknown_dtype", "unknown dtype"),
    ("offsets_out_of_range", "truncated"),
    ("byte_count_mismatch", "needs 16 bytes"),
    ("overlap", "overlap"),
    ("duplicate", "duplicate key"),
    ("ckpt_name", "pickle checkpoints are refused"),
])
def test_bad_files_get_one_line_errors(tmp_path, case, message):
    p = tmp_path / ("model.ckpt" if case == "ckpt_name" else "model.safetensors")
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "empty":
        p.write_bytes(b"")
    elif case == "text":
        p.write_text("hello this is not a model at all, just text " * 10)
    elif case == "pickle":
        p.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    elif case == "zip":
        p.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    elif case == "header_len_lies":
        write_raw(p, good, b"\x00" * 16, header_len=10 ** 6)
    elif case == "bad_json":
        p.write_bytes((10).to_bytes(8, "little") + b"{not json}" + b"\x00" * 16)
    elif case == "unknown_dtype":
        write_raw(p, {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\x00" * 16)
    elif case == "offsets_out_of_range":
        write_raw(p, good, b"\x00" * 8)
    elif case == "byte_count_mismatch":
        write_raw(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\x00" * 16)
    elif case == "overlap":
        write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 16)
    elif case == "duplicate":
        p.write_bytes(b"")
        blob = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        p.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\x00" * 4)
    elif case == "ckpt_name":
        p.write_bytes(b"\x80\x04" + b"\x00" * 64)
    with pytest.raises(QuantError, match=message) as err:
        read_header(str(p))
    assert "\n" not in str(err.value)


def test_writer_output_loads_with_safetensors_and_keeps_large_tensors_aligned(tmp_path):
    out = tmp_path / "out.safetensors"
    tensors = {"odd_bias": torch.randn(3).half(), "marker": torch.tensor(list(b'{"format":"x"}'), dtype=torch.uint8),
               "big": torch.randn(64, 33), "int8": torch.randint(-5, 5, (7, 9), dtype=torch.int8),
               "scale": torch.tensor(0.5), "bf": torch.randn(10, 10).bfloat16(), "flag": torch.tensor([True, False, True])}
    entries = [(k, "F32", tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(str(out), header_reserve(entries, {"m": "v"})) as writer:
        for k, v in tensors.items():
            writer.add(k, v)
        writer.finish({"m": "v"})
        writer.publish()
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"m": "v"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    infos, _, data_start = read_header(str(out))
    assert data_start % 8 == 0
    for info in infos.values():
        if info.nbytes % 8 == 0:  # every tensor whose size allows it starts 8-byte aligned
            assert info.start % 8 == 0, info.name


def test_writer_survives_a_too_small_header_reservation(tmp_path):
    out = tmp_path / "out.safetensors"
    tensors = {f"tensor_with_a_long_name_{i}": torch.full((4, 4), float(i)) for i in range(50)}
    with StreamingWriter(str(out), reserve=16) as writer:
        for k, v in tensors.items():
            writer.add(k, v)
        writer.finish({"x": "y" * 1000})
        writer.publish()
    with safe_open(str(out), "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def test_failed_write_leaves_no_file_and_no_temp(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingWriter(str(out), 4096) as writer:
            writer.add("a", torch.randn(100, 100))
            raise RuntimeError("simulated crash mid-file")
    assert os.listdir(tmp_path) == []


def test_finished_but_unpublished_file_is_removed(tmp_path):
    out = tmp_path / "out.safetensors"
    with StreamingWriter(str(out), 4096) as writer:
        writer.add("a", torch.randn(4, 4))
        writer.finish({})
    assert os.listdir(tmp_path) == []


def test_existing_output_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(QuantError, match="already exists"):
        StreamingWriter(str(out), 4096)
    with StreamingWriter(str(out), 4096, overwrite=True) as writer:
        writer.add("a", torch.ones(2))
        writer.finish({})
        writer.publish()
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(2))


def test_missing_output_directory_is_a_clear_error(tmp_path):
    with pytest.raises(QuantError, match="does not exist"):
        StreamingWriter(str(tmp_path / "nope" / "out.safetensors"), 4096)


def test_disk_full_is_reported_and_cleaned(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(QuantError, match="disk full"):
        with StreamingWriter(str(out), 4096) as writer:
            writer._file.close()
            writer._file = _FullFile()
            writer.add("a", torch.randn(64, 64))
    assert os.listdir(tmp_path) == []


class _FullFile:
    """A file object whose writes fail like a full disk."""

    def write(self, _):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        pass


def test_background_writes_produce_the_same_file(tmp_path):
    tensors = {f"t{i}": torch.randn(257, 129) for i in range(20)} | {"odd": torch.randn(5).half()}
    paths = []
    for background in (0, 100_000):
        out = tmp_path / f"out{background}.safetensors"
        with StreamingWriter(str(out), 8192, background_bytes=background) as writer:
            for k, v in tensors.items():
                writer.add(k, v)
            writer.finish({"m": "v"})
            writer.publish()
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_background_write_error_surfaces_and_cleans_up(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(QuantError, match="disk full"):
        with StreamingWriter(str(out), 4096, background_bytes=1 << 20) as writer:
            writer._background._file = _FullFile()
            for i in range(10):
                writer.add(f"t{i}", torch.randn(64, 64))
            writer.finish({})
    assert os.listdir(tmp_path) == []


def test_background_writes_flush_to_disk_while_writing(tmp_path, monkeypatch):
    """Every SYNC_EVERY_BYTES the flusher thread fdatasyncs what is written, so the final fsync finds little dirty."""
    from quant_core.io import writer as writer_module
    synced = []
    real_sync = getattr(os, "fdatasync", os.fsync)
    monkeypatch.setattr(writer_module, "SYNC_EVERY_BYTES", 64 << 10)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_sync(fd))[1], raising=False)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_sync(fd))[1])
    out = tmp_path / "out.safetensors"
    tensors = {f"t{i}": torch.randn(128, 128) for i in range(16)}  # 64 KB each: 1 MB in all
    with StreamingWriter(str(out), 8192, background_bytes=256 << 10) as writer:
        for k, v in tensors.items():
            writer.add(k, v)
        deadline = time.monotonic() + 10
        while not synced and time.monotonic() < deadline:  # the flusher works on its own, before finish()
            time.sleep(0.01)
        assert synced
        writer.finish({})
        writer.publish()
    with safe_open(str(out), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_start_up_read_ahead_names_the_input_before_torch_loads(tmp_path, monkeypatch):
    from quant_core.__main__ import EARLY_READ_AHEAD_BYTES, read_ahead_input
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"x" * 100)
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)))
    read_ahead_input(["-i", str(path), "--int8"])
    read_ahead_input([f"--input={path}"])
    read_ahead_input(["-i", str(tmp_path / "missing.safetensors")])  # the CLI reports it; nothing happens here
    read_ahead_input(["verify", "x.safetensors"])
    assert advised == [(str(path), 0, EARLY_READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)] * 2


def test_device_feed_chunk_reads_are_exact_and_refuse_truncation(tmp_path):
    """The reads of the reader and of the CUDA feed's pinned buffers (runnable without a GPU)."""
    from quant_core.io.reader import read_exact as _read_exact
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 4)
    buffer = torch.zeros(100, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        _read_exact(f, buffer, 250, str(path), "t")
        assert bytes(buffer.numpy()) == (bytes(range(256)) * 2)[250:350]
        with pytest.raises(QuantError, match="truncated while reading tensor 't'"):
            _read_exact(f, buffer, 1000, str(path), "t")
