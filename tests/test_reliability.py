"""Crash safety, stale temporary files, full disks, determinism, and header fuzzing."""
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from quant_core.errors import QuantError
from quant_core.verify import verify_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "quant_core"]


def medium_checkpoint(path, layers=24, size=1024):
    g = torch.Generator().manual_seed(0)
    save_file({f"blocks.{i}.lin.weight": torch.randn(size, size, generator=g).bfloat16() for i in range(layers)}, path)
    return path


def leftovers(directory, keep):
    return sorted(set(os.listdir(directory)) - set(keep))


# each round sends SIGKILL, SIGINT and SIGTERM to one run each, at random points (QUANT_CORE_KILL_ROUNDS=20 for a
# longer soak)
KILL_ROUNDS = int(os.environ.get("QUANT_CORE_KILL_ROUNDS", "6"))


def test_kill_at_random_points_never_leaves_a_file_under_the_output_name(tmp_path, cli):
    src = medium_checkpoint(str(tmp_path / "src.safetensors"))
    out = str(tmp_path / "out.safetensors")
    start = time.perf_counter()
    subprocess.run(CLI + ["-i", src, "-o", out, "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    duration = time.perf_counter() - start
    os.unlink(out)
    rng = random.Random(1234)
    runs, clean, completed = 0, 0, 0
    for sig in [signal.SIGKILL, signal.SIGINT, signal.SIGTERM] * KILL_ROUNDS:
        proc = subprocess.Popen(CLI + ["-i", src, "-o", out, "--no-progress"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.05, 0.9 * duration))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        runs += 1
        if os.path.exists(out):  # the run finished before the signal: the file must be whole
            assert verify_file(out, reference=src).ok
            completed += 1
            os.unlink(out)
        else:
            clean += 1
            if sig != signal.SIGKILL:  # unwound: its own temporary file is gone too, one-line message, exit 130
                # (a SIGKILLed run's temporary is removed by the next run that reaches the writer; a run interrupted
                # before that point leaves it for the one after, so only this run's own PID must be absent)
                assert [p for p in leftovers(tmp_path, ["src.safetensors"]) if f".{proc.pid}." in p] == [], err
                # 130 after our own unwinding; -SIGINT/-SIGTERM when the signal lands while Python itself is
                # starting or shutting down (no conversion running then)
                assert proc.returncode in (130, -signal.SIGINT, -signal.SIGTERM), (proc.returncode, err)
                assert "Traceback" not in err, err
    print(f"\nkill test: {runs} runs, {clean} interrupted with no file under the output name, "
          f"{completed} finished first (whole, verified), 0 partial files")
    assert clean + completed == runs and clean >= runs // 3, (clean, completed)  # most signals land mid-run
    # a SIGKILLed run's temporary file is removed by the next run on the same output (in this process: its PID is
    # not one of the killed runs')
    code, _, err = cli("-i", src, "-o", out)
    assert code == 0, err
    assert leftovers(tmp_path, ["src.safetensors", "out.safetensors"]) == []


def test_stale_temp_of_a_dead_run_is_removed_but_a_live_one_is_not(tmp_path, flux_file, cli):
    out = tmp_path / "o.safetensors"
    dead = tmp_path / ".o.safetensors.999999999.partial"
    live = tmp_path / f".o.safetensors.{os.getppid()}.partial"  # a live process other than the converting one
    unrelated = tmp_path / ".o.safetensors.notes.partial"
    for p in (dead, live, unrelated):
        p.write_bytes(b"junk")
    code, stdout, err = cli("-i", flux_file, "-o", out)
    assert code == 0 and f"removed {dead}" in stdout, err
    assert not dead.exists() and live.exists() and unrelated.exists()


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_mid_write_is_a_clean_error(tmp_path):
    """A child process: the file size limit (and SIGXFSZ ignored) must not apply to pytest itself."""
    src = medium_checkpoint(str(tmp_path / "src.safetensors"), layers=3)  # 3 MB of int8 output: past the 2 MB limit
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    result = subprocess.run(CLI + ["-i", src, "-o", str(out), "--no-progress"], cwd=ROOT, capture_output=True,
                            text=True, preexec_fn=_limit_file_size(2 << 20))
    assert result.returncode == 2, result.stderr
    assert "disk full (or file size limit reached)" in result.stderr and result.stderr.count("\n") == 1
    assert os.listdir(out.parent) == []


def test_full_disk_on_a_small_tmpfs(tmp_path, cli):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = medium_checkpoint(str(tmp_path / "src.safetensors"), layers=3)  # 3 MB of int8 output on 2 MB
        code, _, err = cli("-i", src, "-o", mount / "o.safetensors")
        assert code == 2 and "disk full" in err, err
        assert "Traceback" not in err and os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize("options", [dict(format="int8"), dict(format="fp8"), dict(format="nvfp4"),
                                     dict(format="mxfp8"), dict(format="int8", convrot=True, convrot_group_size=16),
                                     dict(format="int4")],
                         ids=lambda o: "-".join(str(v) for v in o.values()))
def test_same_input_and_options_give_byte_identical_files(flux_file, tmp_path, options):
    a = quant_core.quantize(input=flux_file, output=str(tmp_path / "a.safetensors"), **options)
    # verify reads the file and does not change it: checked once, on `a`
    b = quant_core.quantize(input=flux_file, output=str(tmp_path / "b.safetensors"), low_memory=True, verify="off",
                            **options)
    with open(a.output, "rb") as fa, open(b.output, "rb") as fb:
        assert fa.read() == fb.read()


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("QUANT_CORE_FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def fuzz_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "src.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(32, 32, generator=g), "a.bias": torch.randn(32, generator=g),
               "b.weight": torch.randn(16, 32, generator=g).bfloat16(), "n.scale": torch.ones(8)}, str(path),
              metadata={"k": "v"})
    return path.read_bytes()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_header_mutations_give_a_clean_error_or_a_valid_file(fuzz_source, tmp_path, data):
    blob = bytearray(fuzz_source)
    header_end = 8 + int.from_bytes(blob[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "digit", "truncate", "length"]))
        end = min(header_end, len(blob))
        digits = [i for i in range(8, end) if chr(blob[i]).isdigit()]
        if not blob or (kind == "digit" and not digits):
            continue
        if kind == "flip":
            blob[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
        elif kind == "digit":
            blob[data.draw(st.sampled_from(digits))] = ord(str(data.draw(st.integers(0, 9))))
        elif kind == "truncate":
            del blob[data.draw(st.integers(0, len(blob) - 1)):]
        elif len(blob) >= 8:
            blob[:8] = data.draw(st.integers(0, 2 ** 64 - 1)).to_bytes(8, "little")
    src = tmp_path / f"m{abs(hash(bytes(blob)))}.safetensors"
    src.write_bytes(bytes(blob))
    out = tmp_path / f"o{abs(hash(bytes(blob)))}.safetensors"
    try:
        result = quant_core.quantize(input=str(src), output=str(out), verify="full")
    except QuantError as e:
        hypothesis.event("clean error")
        assert "\n" not in str(e)
        assert not out.exists()
    else:
        hypothesis.event("converted")
        assert result.verify.ok and verify_file(str(out), reference=str(src)).ok
    finally:
        for p in (src, out):
            if p.exists():
                p.unlink()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_a_temp_file_orphaned_before_enter_is_removed_by_the_interrupt_handler(tmp_path):
    """Ctrl-C can land between the writer's constructor and `__enter__` (no context manager runs then); the CLI's
    interrupt handler removes such temporaries (seen once in CI: a `.partial` left by the kill test)."""
    from quant_core.io.writer import StreamingWriter, remove_live_temps
    writer = StreamingWriter(str(tmp_path / "o.safetensors"), 4096)
    assert os.path.exists(writer.temp)
    remove_live_temps()
    assert os.listdir(tmp_path) == []
    with StreamingWriter(str(tmp_path / "p.safetensors"), 4096) as done:  # a published file is not touched
        done.add("w", torch.zeros(4))
        done.finish({})
        done.publish()
    remove_live_temps()
    assert os.listdir(tmp_path) == ["p.safetensors"]
