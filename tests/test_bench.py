"""`python benchmarks/bench.py`: the checkpoint it builds, the way it measures, and a small end-to-end run."""
import math
import os
import sys

import pytest

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402


def test_default_checkpoint_is_flux_dev_shaped():
    shapes, norms = bench.flux_layers(*bench.FLUX_DEV_BLOCKS)
    params = sum(n * k + n for n, k in shapes.values()) + 128 * len(norms)
    assert len(shapes) == 10 + 19 * 10 + 38 * 3 == 314
    assert 11.8e9 < params < 12.0e9  # Flux-dev: 11.9 B
    assert max(n * k for n, k in shapes.values()) == 21504 * 3072  # single_blocks.*.linear1
    assert bench.blocks_for_size(23.7) == (19, 38)  # weights alone: 23.79 GB


def test_expected_output_size_is_about_one_byte_per_int8_weight():
    shapes = {"a": (100, 200), "b": (30, 40)}
    assert bench.expected_output_bytes(shapes, "int8") == 100 * 200 + 30 * 40 + 6 * 130
    assert bench.expected_output_bytes(shapes, "nvfp4") < bench.expected_output_bytes(shapes, "int8")


def test_child_peak_rss_is_not_inherited_from_the_benchmark_process(tmp_path):
    """Linux keeps a process's peak RSS across exec: a child forked from a big parent would report the parent's
    size. The launcher must measure the child alone."""
    ballast = bytearray(400 << 20)  # this process: +400 MB resident
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    small = bench.Run("t", "int8", "rtn", "warm", [sys.executable, "-c", "open(__import__('sys').argv[1], 'w')",
                                                      str(tmp_path / "o")], str(tmp_path / "o"))
    big = bench.Run("t", "int8", "rtn", "warm", [sys.executable, "-c", "x = bytearray(300 << 20); x[::4096] = "
                    "b'1' * len(x[::4096]); open(__import__('sys').argv[1], 'w')", str(tmp_path / "p")], str(tmp_path / "p"))
    with open(os.devnull, "w") as log:
        bench.run_child(small, str(tmp_path), log)
        bench.run_child(big, str(tmp_path), log)
    assert not small.error and not big.error
    assert small.rss_gb < 0.2
    assert 0.3 < big.rss_gb < 0.6
    del ballast


def test_ratios_compare_like_with_like():
    runs = [bench.Run("quant_core", "int8", "rtn", "cold", [], "", seconds=20.0, rss_gb=1.2),
            bench.Run("ctq 1.3.4", "int8", "rtn", "cold", [], "", seconds=100.0, rss_gb=35.0),
            bench.Run("quant_core", "int8", "rtn", "warm", [], "", seconds=10.0, rss_gb=1.2),
            bench.Run("ctq 1.3.4", "int8", "rtn", "warm", [], "", error="exit 1"),
            bench.Run("quant_core", "int8", "rtn --low-memory", "warm", [], "", seconds=30.0, rss_gb=1.0)]
    floor = {"read_cold": 10.0, "write_fsync": 6.0, "overlapped": 12.0}
    lines = bench.ratios(runs, floor, 10 ** 9, 1000)
    assert "int8 rtn cold: ctq takes 5.0x as long (100.0 s vs 20.0 s); peak RSS 35.0 GB vs 1.2 GB" in lines
    assert "int8 rtn cold: 1.25x the serial I/O floor (16.0 s), 1.67x the overlapped one (12.0 s)" in lines
    assert not any("warm: ctq" in line for line in lines)  # ctq failed there: no ratio
    assert any(line.startswith("int8 --low-memory: peak RSS 1.00 GB") for line in lines)


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--methods", "rtn,awq", "--ctq", "none"])
    assert "--methods: unknown awq" in capsys.readouterr().err


def test_small_benchmark_end_to_end(tmp_path, capsys):
    code = bench.main(["--size-gb", "0.03", "--ctq", "none", "--no-cold", "--quality-layers", "3",
                       "--workdir", str(tmp_path), "--log", str(tmp_path / "log.txt")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("quant_core ")]
    assert [row[2] for row in rows] == ["rtn", "rtn"] and rows[1][3] == "--low-memory"
    for row in rows:
        seconds, rss, sqnr = float(row[-5]), float(row[-3]), float(row[-1])
        assert seconds > 0 and 0 < rss < 4 and 25 < sqnr < 40 and math.isfinite(sqnr)
    names = sorted(os.listdir(tmp_path))  # outputs removed, the checkpoint kept (--workdir)
    assert len(names) == 2 and names[0].startswith("flux_synthetic_") and names[1] == "log.txt"
    assert "wrote " in (tmp_path / "log.txt").read_text()
