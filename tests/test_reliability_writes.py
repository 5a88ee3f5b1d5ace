"""Writes that must neither destroy nor leak, and reads that must not hang or crash: where the report and the
calibration file may go, exclusive locked temporaries, full disks at every point, FIFOs given as any input, and
calibration files that are truncated or hold the wrong kind of tensor."""
import errno
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quant_core.calib import load_calibration, save_calibration
from quant_core.calib.stats import InputStats
from quant_core.errors import QuantError
from quant_core.io import writer as writer_module
from quant_core.io.writer import StreamingWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"format": "quant_calibration", "version": "1", "source": "x"}


@pytest.fixture
def model(make_file):
    g = torch.Generator().manual_seed(0)
    return make_file({"a.weight": torch.randn(64, 64, generator=g), "b.weight": torch.randn(32, 64, generator=g)})


def one_line_error(code, err, *words):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def partials(directory):
    return [name for name in os.listdir(directory) if name.endswith(".partial")]


# --- 1. the report follows the output's rules ------------------------------------------------------------------

REPORT_CASES = ["input", "input_overwrite", "output", "existing", "layer_config_overwrite", "directory",
                "missing_folder", "dev_full_overwrite", "output_is_layer_config"]


@pytest.mark.parametrize("case", REPORT_CASES)
def test_report_and_output_go_only_where_an_output_may(cli, model, tmp_path, case):
    out = tmp_path / "out.safetensors"
    existing = tmp_path / "notes.txt"
    existing.write_text("keep")
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"rules": [{"match": "a", "format": "int8"}]}))
    report = {"input": model, "input_overwrite": model, "output": str(out), "existing": str(existing),
              "layer_config_overwrite": str(config), "directory": str(tmp_path),
              "missing_folder": str(tmp_path / "nope" / "r.json"), "dev_full_overwrite": "/dev/full",
              "output_is_layer_config": str(tmp_path / "r.json")}[case]
    if case == "dev_full_overwrite" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    target = config if case == "output_is_layer_config" else out
    argv = ["-i", model, "-o", target, "--report", report, "--layer-config", config]
    if case.endswith("overwrite") or case == "output_is_layer_config":
        argv.append("--overwrite")
    before = {p: open(p, "rb").read() for p in (model, existing, config)}
    code, _, err = cli(*argv)
    one_line_error(code, err)
    assert not out.exists()  # refused before the conversion started
    assert {p: open(p, "rb").read() for p in before} == before
    assert not os.path.exists(tmp_path / "r.json") and partials(tmp_path) == []


def test_report_is_replaced_only_with_overwrite_and_by_rename(cli, model, tmp_path):
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    report.write_text("old")
    code, _, err = cli("-i", model, "-o", out, "--report", report)
    one_line_error(code, err, "already exists")
    assert not out.exists() and report.read_text() == "old"
    os.link(report, tmp_path / "hard.json")  # a write in place would change this name's content too
    code, _, err = cli("-i", model, "-o", out, "--report", report, "--overwrite")
    assert code == 0, err
    assert json.loads(report.read_text())["layers"] and (tmp_path / "hard.json").read_text() == "old"
    assert partials(tmp_path) == []


def test_report_write_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from quant_core.io.writer import write_file_atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(QuantError, match="disk full") as e:
        write_file_atomic(str(tmp_path / "r.json"), b"{}" * 1000)
    assert "\n" not in str(e.value) and "needs 2000 bytes" in str(e.value) and os.listdir(tmp_path) == []


# --- 2. temporaries are created exclusively, never through a link ----------------------------------------------

def test_temporary_is_created_exclusively_never_through_a_planted_link(tmp_path, monkeypatch):
    out = tmp_path / "o.safetensors"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    tokens = iter(["t0000000a", "t0000000b"])
    monkeypatch.setattr(writer_module, "_new_token", lambda: next(tokens), raising=False)
    links = [tmp_path / f".o.safetensors.{os.getpid()}.partial", tmp_path / f".o.safetensors.{os.getpid()}.t0000000a.partial"]
    for link in links:
        os.symlink(victim, link)
    with StreamingWriter(str(out), 4096) as writer:
        writer.add("w", torch.ones(4))
        writer.finish({})
        writer.publish()
    assert victim.read_bytes() == b"precious" and all(os.path.islink(link) for link in links)
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.ones(4))


# --- 3. calibrate -o: the converter's rules, and a progress bar ------------------------------------------------

def test_calibrate_output_follows_the_converters_rules(cli, make_file, tmp_path):
    src = make_file({"a.weight": torch.randn(8, 32)})
    source_bytes = open(src, "rb").read()
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"old")
    code, _, err = cli("calibrate", "-i", src, "-o", out, "--samples", "16")
    one_line_error(code, err, "already exists")
    assert out.read_bytes() == b"old"
    code, _, err = cli("calibrate", "-i", src, "-o", src, "--samples", "16", "--overwrite")
    one_line_error(code, err, "equals the input")
    assert open(src, "rb").read() == source_bytes
    code, _, err = cli("calibrate", "-i", src, "-o", tmp_path / "nope" / "c.safetensors", "--samples", "16")
    one_line_error(code, err, "does not exist")
    code, _, err = cli("calibrate", "-i", src, "-o", out, "--samples", "16", "--overwrite")
    assert code == 0, err
    assert set(load_calibration(str(out))) == {"a"} and partials(tmp_path) == []


def test_calibrate_shows_progress_unless_no_progress(make_file, tmp_path, capsys):
    from quant_core.cli import main
    src = make_file({"a.weight": torch.randn(8, 32), "b.weight": torch.randn(4, 8)})
    assert main(["calibrate", "-i", src, "-o", str(tmp_path / "a.safetensors"), "--samples", "16"]) == 0
    assert re.search(r"calibrate.*2/2.*layer", capsys.readouterr().err)
    assert main(["calibrate", "-i", src, "-o", str(tmp_path / "b.safetensors"), "--samples", "16", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


# --- 4. a full disk at every point: one line with the size, no temporary ---------------------------------------

class _FullDiskFile:
    """Wraps the writer's file: writes (or the final flush, and so the close after it) fail like a full disk."""

    def __init__(self, real, point):
        self._real, self._point = real, point

    def write(self, data):
        if self._point == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._real.write(data)

    def flush(self):
        if self._point == "flush":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._real.flush()

    def close(self):
        closed = self._real.closed
        self._real.close()
        if self._point == "flush" and not closed:  # a buffered file flushes again on close, and fails again
            raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("point", ["write", "flush", "fsync"])
def test_disk_full_at_any_point_is_one_line_with_the_size_and_no_temporary(cli, model, tmp_path, monkeypatch, point):
    if point == "fsync":
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
        monkeypatch.setattr(os, "fdatasync", full, raising=False)
    else:
        real_enter = StreamingWriter.__enter__

        def enter(self):
            self._file = _FullDiskFile(self._file, point)
            if self._background is not None:
                self._background._file = self._file
            return real_enter(self)
        monkeypatch.setattr(StreamingWriter, "__enter__", enter)
    code, _, err = cli("-i", model, "-o", tmp_path / "o.safetensors")
    one_line_error(code, err, "disk full")
    assert re.search(r"needs [\d.]+ (MB|GB|bytes)", err), err
    assert os.listdir(tmp_path) == [os.path.basename(model)]


# --- 5. a FIFO (or any non-regular file) is refused before it is opened ----------------------------------------

def _guarded(fn, fifo, timeout=30):
    """Run fn on a thread; if it blocks (opening the FIFO for reading waits for a writer), open the FIFO's write end
    so the blocked open returns, and fail."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the test
            result["error"] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout)
        pytest.fail(f"blocked on the FIFO {fifo}")
    if "error" in result:
        raise result["error"]
    return result["value"]


FIFO_ROLES = ["input", "lora", "layer_config", "calibration", "verify", "verify_reference", "calibrate_input",
              "calibrate_text"]


@pytest.mark.parametrize("role", FIFO_ROLES)
def test_a_fifo_is_refused_before_it_is_opened(cli, model, tmp_path, role):
    fifo = str(tmp_path / "pipe.safetensors")
    os.mkfifo(fifo)
    out = str(tmp_path / "o.safetensors")
    if role == "verify_reference":
        import quant_core
        quant_core.quantize(input=model, output=str(tmp_path / "q.safetensors"))
    argv = {"input": ["-i", fifo, "-o", out], "lora": ["-i", model, "-o", out, "--merge-lora", fifo],
            "layer_config": ["-i", model, "-o", out, "--layer-config", fifo],
            "calibration": ["-i", model, "-o", out, "--optimizer", "gptq", "--calibration-data", fifo],
            "verify": ["verify", fifo], "verify_reference": ["verify", str(tmp_path / "q.safetensors"), "--reference", fifo],
            "calibrate_input": ["calibrate", "-i", fifo, "-o", out],
            "calibrate_text": ["calibrate", "-i", model, "-o", out, "--hf-model", str(tmp_path), "--text", fifo]}[role]
    code, _, err = _guarded(lambda: cli(*argv), fifo)
    one_line_error(code, err, "FIFO")
    assert not os.path.exists(out)


def test_start_up_read_ahead_never_opens_a_fifo(tmp_path, monkeypatch):
    from quant_core.__main__ import read_ahead_input
    fifo = str(tmp_path / "pipe.safetensors")
    os.mkfifo(fifo)
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(a), raising=False)
    _guarded(lambda: read_ahead_input(["-i", fifo]), fifo)
    assert advised == []


# --- 6. stale temporaries: judged by their lock, not by a PID ---------------------------------------------------

def test_a_locked_temporary_is_live_whatever_its_pid_and_an_unlocked_one_is_stale(tmp_path, monkeypatch):
    if sys.platform == "win32":
        pytest.skip("no flock on this platform (stale temporaries are judged by PID there)")
    out = str(tmp_path / "o.safetensors")
    with monkeypatch.context() as m:  # a run in another PID namespace: its PID number means nothing here
        m.setattr(os, "getpid", lambda: 4194303)
        other = StreamingWriter(out, 4096)
    # an unlocked temporary whose PID number is alive here (PID 1, or a reused PID): its writer is gone
    stale = tmp_path / ".o.safetensors.1.t0badc0de.partial"
    stale.write_bytes(b"junk")
    with StreamingWriter(out, 4096) as mine:
        assert mine.stale_removed == [str(stale)]
        assert os.path.exists(other.temp) and not stale.exists()
        mine.add("w", torch.ones(2))
        mine.finish({})
        mine.publish()
    other.abort()
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


# --- 7. calibration files: never memory-mapped, wrong kinds refused ---------------------------------------------

def test_calibration_file_truncated_while_read_is_a_one_line_error_not_sigbus(tmp_path):
    path = str(tmp_path / "c.safetensors")
    stats = InputStats(absmax=torch.ones(256), mean_sq=torch.ones(256), n_tokens=3, hessian=torch.eye(256))
    save_calibration(path, {"l": stats}, "test")
    with open(path, "rb") as f:
        header_end = 8 + int.from_bytes(f.read(8), "little")
    script = ("import os\nfrom quant_core.calib.file import CalibrationFile\nfrom quant_core.errors import QuantError\n"
              f"f = CalibrationFile({path!r})\nos.truncate({path!r}, {header_end + 64})\n"
              "try:\n    f.get('l')\nexcept QuantError as e:\n    print('error:', e)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "truncated" in run.stdout and run.stdout.count("\n") == 1, run.stdout


@pytest.mark.parametrize("tensors,message", [
    ({"l.input_absmax": torch.ones(4).to(torch.float8_e4m3fn), "l.n_tokens": torch.tensor(3)}, "float8_e4m3fn"),
    ({"l.input_absmax": torch.ones(4), "l.hessian": torch.eye(4).to(torch.float8_e5m2), "l.n_tokens": torch.tensor(3)},
     "float8_e5m2"),
    ({"l.input_absmax": torch.tensor(1.0), "l.n_tokens": torch.tensor(3)}, "expected [K]"),
    ({"l.input_absmax": torch.full((4,), 1e300, dtype=torch.float64), "l.n_tokens": torch.tensor(3)}, "finite"),
    ({"l.input_absmax": torch.ones(4), "l.n_tokens": torch.tensor(True)}, "n_tokens must be one positive integer"),
], ids=["fp8-absmax", "fp8-hessian", "scalar-absmax", "f64-beyond-f32", "bool-n_tokens"])
def test_statistics_of_the_wrong_kind_are_one_line_errors(tmp_path, tensors, message):
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path, metadata=META)
    with pytest.raises(QuantError) as e:
        load_calibration(path)
    assert message in str(e.value) and "\n" not in str(e.value)
