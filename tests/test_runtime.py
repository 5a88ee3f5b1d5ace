"""Run-time quality (quant_core.quantization.runtime): what ComfyUI computes per format and GPU class, emulated
through comfy-kitchen's reference ops, and the rows it is measured on (the calibration file's input sample)."""
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from quant_core.calib import load_calibration, record_activation_stats
from quant_core.calib.file import CalibrationFile, save_calibration
from quant_core.calib.stats import SAMPLE_ROWS, InputStats, StatsAccumulator, merge_samples
from quant_core.quantization.formats import make_format
from quant_core.quantization.runtime import (FORMAT_QUALITY, emulate, evaluation_rows, runtime, runtime_fields,
                                             warn_below_db)
from quant_core.report import QualityReport, layer_stats, sqnr_db

G = torch.Generator().manual_seed(0)


def quantized(family: str, n: int = 96, k: int = 256, **opts):
    """(weight, marker, stored tensors, fp32 reconstruction) of a random layer, round-to-nearest."""
    weight = torch.randn(n, k, generator=G) / k ** 0.5
    fmt = make_format(family, **opts)
    grid = fmt.grid(weight.clone())
    codes = fmt.round(grid.work / grid.scale)
    return weight, fmt.marker(), fmt.pack(codes.clone(), grid), fmt.reconstruct(codes, grid)


def activations(m: int = 48, k: int = 256, outliers: bool = True) -> torch.Tensor:
    x = torch.randn(m, k, generator=G)
    if outliers:
        x[:, :4] *= 20  # real activations have a few large channels
    return x


def bf16_close(got: torch.Tensor, want: torch.Tensor):
    """Equal up to a few bf16 roundings of the output (the reference ops round partial results to bf16 too)."""
    assert float((got - want).abs().max()) <= 4 * 2 ** -8 * float(want.abs().max())


def test_w4a4_emulation_is_comfy_kitchens_convrot_w4a4_linear():
    from comfy_kitchen.backends.eager.convrot_w4a4 import convrot_w4a4_linear
    weight, marker, packed, approx = quantized("int4", convrot_group=64)
    x = activations().bfloat16()
    direct = convrot_w4a4_linear(x, packed["weight"], packed["weight_scale"], convrot_groupsize=64).float()
    bf16_close(emulate(x, approx, runtime(marker, None, "ampere")), direct)
    # the per-row INT4 activations cost real accuracy: far from the weights-only product
    weights_only = x.float() @ approx.T
    assert float((direct - weights_only).norm()) > 0.2 * float((weights_only - x.float() @ weight.T).norm())


@pytest.mark.parametrize("convrot", [0, 64])
def test_w8a8_emulation_is_comfy_kitchens_int8_linear(convrot):
    from comfy_kitchen.backends.eager.quantization import int8_linear
    weight, marker, packed, approx = quantized("int8", convrot_group=convrot)
    x = activations().bfloat16()
    direct = int8_linear(x, packed["weight"], packed["weight_scale"], None, torch.bfloat16, bool(convrot),
                         convrot or 256).float()
    rt = runtime(marker, None, "hopper")
    assert rt.gpu == "every GPU class" and "INT8 per row" in rt.activations
    bf16_close(emulate(x, approx, rt), direct)


def test_classes_follow_comfyui_capability_checks():
    _, int4, _, _ = quantized("int4", convrot_group=64)
    assert "W4A4" in runtime(int4, None, "ampere").activations and "W4A4" in runtime(int4, None, "ada").activations
    assert "W4A8" in runtime(int4, None, "hopper").activations and "W4A8" in runtime(int4, None, "blackwell").activations
    assert runtime(int4, None).gpu.startswith("Turing/Ampere")  # auto: where W4A4 runs natively
    w4a8 = dict(int4, linear_dtype="int8")
    assert runtime(w4a8, None, "ampere").gpu == "every GPU class"
    fp8 = {"format": "float8_e4m3fn"}
    assert runtime(fp8, None, "ampere").quantize is None and runtime(fp8, None, "ada").quantize is not None
    assert runtime(fp8, None).gpu.startswith("Ada")
    for name in ("nvfp4", "mxfp8"):
        assert runtime({"format": name}, None, "hopper").quantize is None
        assert runtime({"format": name}, None).gpu.startswith("Blackwell")
    assert runtime({"format": "nvfp4", "full_precision_matrix_mult": True}, None, "blackwell").quantize is None
    assert runtime({"format": "int8_blockwise"}, None, "blackwell").quantize is None  # not loaded upstream
    assert runtime_fields("l", {"format": "int8_blockwise"}, None, None, torch.ones(2, 4), torch.ones(2, 4),
                          None) == {"threshold_db": 30.0}


def test_fp8_without_input_scale_is_a_plain_cast_that_clips_at_448():
    """ComfyUI's FP8 layout quantizes activations with scale 1.0 unless the layer has an input_scale."""
    weight, marker, _, approx = quantized("fp8")
    x = activations(outliers=False) * 1000  # beyond E4M3's ±448
    reference = x @ weight.T
    plain = emulate(x, approx, runtime(marker, None, "ada"))
    scaled = emulate(x, approx, runtime(marker, x.abs().max() / 448, "ada"))
    from comfy_kitchen.backends.eager.quantization import quantize_per_tensor_fp8
    direct = quantize_per_tensor_fp8(x.bfloat16(), torch.ones(()), torch.float8_e4m3fn).float() @ approx.T
    bf16_close(plain, direct)
    assert sqnr_db(reference.square().sum(), (plain - reference).square().sum()) < 5
    assert sqnr_db(reference.square().sum(), (scaled - reference).square().sum()) > 25


def test_a_static_input_scale_that_clips_shows_up():
    weight, marker, _, approx = quantized("nvfp4")
    x = activations()
    dynamic = runtime_fields("l", marker, None, None, weight, approx, None, "blackwell")["runtime_sqnr_db"]
    clipping = runtime_fields("l", marker, torch.tensor(2e-4), None, weight, approx, None,  # clips |x| > 0.54
                              "blackwell")["runtime_sqnr_db"]
    assert dynamic > 14 and clipping < dynamic - 3
    from comfy_kitchen.backends.eager.quantization import dequantize_nvfp4, quantize_nvfp4
    xb = x.bfloat16()
    scale = (xb.abs().amax() / 2688).float()
    codes, blocks = quantize_nvfp4(xb, scale)
    direct = dequantize_nvfp4(codes, scale, blocks, torch.float32) @ approx.T
    bf16_close(emulate(x, approx, runtime(marker, None, "blackwell")), direct)


def test_as_computed_is_below_weights_only_and_measured_on_the_files_rows(tmp_path, make_file):
    src = make_file({f"blocks.{i}.weight": torch.randn(128, 256, generator=G) * 0.05 for i in range(3)})
    rows = {f"blocks.{i}": activations(400) for i in range(3)}
    stats = {}
    for layer, x in rows.items():
        acc = StatsAccumulator(256, sample_rows=SAMPLE_ROWS)
        acc.add(x)
        stats[layer] = acc.result()
    calib = str(tmp_path / "c.safetensors")
    save_calibration(calib, stats, "test")
    result = quant_core.quantize(src, str(tmp_path / "q.safetensors"), format="int4", convrot_group_size=64,
                                 calibration_data=calib)
    for s in result.report.layers:
        assert s.runtime_sqnr_db < s.runtime_weights_db - 1, s
        assert "128 calibration rows (in-sample)" in s.runtime_note and s.runtime_gpu.startswith("Turing/Ampere")
    summary = result.report.summary()
    assert "as computed on Turing/Ampere (RTX 20/30, A100)" in summary and "weights only" in summary
    hopper = quant_core.quantize(src, str(tmp_path / "h.safetensors"), format="int4", convrot_group_size=64,
                                 calibration_data=calib, runtime_gpu="hopper")
    for s, h in zip(result.report.layers, sorted(hopper.report.layers, key=lambda s: s.sqnr_db)):
        assert h.runtime_sqnr_db > s.runtime_sqnr_db + 3  # W4A8 there
    data = result.report.to_json()
    assert data["runtime"]["Turing/Ampere (RTX 20/30, A100)"]["layers"] == 3
    json.dumps(data)


def test_without_samples_the_figures_are_estimated_and_say_so(tmp_path, make_file):
    src = make_file({"a.weight": torch.randn(64, 128, generator=G) * 0.05})
    result = quant_core.quantize(src, str(tmp_path / "q.safetensors"), format="nvfp4")
    (s,) = result.report.layers
    assert "N(0, I) rows (no recorded statistics)" in s.runtime_note and s.runtime_sqnr_db < s.runtime_weights_db
    x = activations(200, 128)
    stats = InputStats(x.abs().amax(0), (x * x).mean(0), 200, mean=x.mean(0))  # an older file: no input_sample
    rows = evaluation_rows("a", 128, stats)
    assert "Gaussian rows with the file's per-feature moments" in rows.basis
    assert float(rows.x[:, :4].std()) > 5 * float(rows.x[:, 4:].std())  # the outlier channels are kept


def test_thresholds_are_per_format():
    assert warn_below_db("nvfp4") == FORMAT_QUALITY["nvfp4"].warn_below_db < 20
    assert warn_below_db("convrot_w4a4 (G=64)") < warn_below_db("int8_tensorwise (per-row)") == 30
    _, nv_marker, _, _ = quantized("nvfp4")
    src_layers = []
    for i in range(4):  # a normal NVFP4 file: nothing flagged (a single 30 dB level would flag every layer)
        weight, _, _, approx = quantized("nvfp4")
        fields = runtime_fields(f"l{i}", nv_marker, None, None, weight, approx, None)
        src_layers.append(replace(layer_stats(f"l{i}", make_format("nvfp4"), weight, approx.clone()), **fields))
    report = QualityReport(src_layers)
    assert all(s.sqnr_db < 30 for s in report.layers) and not report.below_threshold()
    assert "17.5 dB (nvfp4's level)" in report.summary()
    assert len(QualityReport(src_layers, threshold_db=30).below_threshold()) == 4


def test_reservoir_is_a_uniform_sample_of_all_rows():
    acc = StatsAccumulator(3, hessian=False, buffered=False, sample_rows=256, seed=3)
    index = torch.arange(20000)
    for start, size in ((0, 7), (7, 5000), (5007, 13), (5020, 14980)):  # uneven batches
        rows = index[start:start + size]  # row i holds (i // 128, i % 128, −i // 128): exact in bf16
        acc.add(torch.stack([rows // 128, rows % 128, -(rows // 128)], dim=1).float())
    sample = acc.result().input_sample.float()
    assert sample.shape == (256, 3) and torch.equal(sample[:, 2], -sample[:, 0])  # whole rows
    drawn = (sample[:, 0] * 128 + sample[:, 1]).tolist()
    assert len(set(drawn)) == 256  # without replacement
    mean = sum(drawn) / 256  # uniform over 0…19999: mean 10000, std of the mean ≈ 5774 / 16
    assert abs(mean - 10000) < 4 * 5774 / 16
    small = StatsAccumulator(2, hessian=False, sample_rows=256)
    small.add(torch.ones(10, 2))
    assert small.result().input_sample.shape == (10, 2)


def test_merged_samples_draw_from_each_side_by_its_row_count():
    a, b = torch.zeros(256, 3), torch.ones(256, 3)
    picks = [float(merge_samples(a, 1000 + i, b, 3000, rows=256)[:, 0].mean()) for i in range(20)]
    assert abs(sum(picks) / len(picks) - 0.75) < 0.02
    assert merge_samples(torch.zeros(5, 3), 5, torch.ones(7, 3), 7).shape == (12, 3)  # both complete: all rows
    assert merge_samples(None, 10, b, 10) is None  # one side has rows but no sample


def test_sample_in_the_file_is_bf16_rows_and_validated(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.a(x)
    net, xs = Net(), [torch.randn(50, 16, generator=G) for _ in range(4)]
    stats = record_activation_stats(net, lambda: [net(x) for x in xs], heldout_every=2)
    path = str(tmp_path / "c.safetensors")
    save_calibration(path, stats, "test")
    reader = CalibrationFile(path)
    assert reader._file.info("a.input_sample").dtype == "BF16" and reader.sample_rows("a") == 100
    got = load_calibration(path)["a"]
    fit_rows = torch.cat([xs[0], xs[2]]).bfloat16().float()
    assert all(any(torch.equal(r, f) for f in fit_rows) for r in got.input_sample)  # fitting rows only
    assert got.heldout_input_sample.shape == (100, 16)
    bad = {"a.input_absmax": torch.ones(16), "a.n_tokens": torch.tensor(5), "a.input_sample": torch.ones(4, 15)}
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"format": "quant_calibration", "version": "1"})
    with pytest.raises(quant_core.QuantError, match=r"input_sample has shape \[4, 15\], expected \[S, 16\]"):
        load_calibration(str(tmp_path / "bad.safetensors"))


def test_runtime_gpu_is_refused_where_every_class_computes_the_same():
    quant_core.Job.build({"format": "nvfp4", "runtime_gpu": "ada"})
    for settings in ({"format": "int8"}, {"format": "int4", "int4_linear_dtype": "int8"}, {"format": "fp16"}):
        with pytest.raises(quant_core.QuantError, match="--runtime-gpu applies to formats ComfyUI computes"):
            quant_core.Job.build({**settings, "runtime_gpu": "hopper"})
    with pytest.raises(quant_core.QuantError, match="--runtime-gpu has no effect with --t5xxl: ComfyUI computes text"):
        quant_core.Job.build({"format": "nvfp4", "presets": ("t5xxl",), "runtime_gpu": "blackwell"})


def test_text_encoders_are_computed_with_dequantized_weights(tmp_path, make_file):
    src = make_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(64, 128, generator=G)})
    result = quant_core.quantize(src, str(tmp_path / "q.safetensors"), format="nvfp4", presets=("t5xxl",))
    (s,) = result.report.layers
    assert s.runtime_sqnr_db is None and s.runtime_gpu == "every GPU class (text encoder)"
    assert "as computed on every GPU class (text encoder): weights dequantized" in result.report.summary()


def test_figures_are_finite_json(tmp_path, make_file):
    src = make_file({"a.weight": torch.zeros(32, 64), "b.weight": torch.randn(32, 64, generator=G)})
    result = quant_core.quantize(src, str(tmp_path / "q.safetensors"), format="fp8")
    text = json.dumps(result.report.to_json())
    assert "NaN" not in text and math.isfinite(json.loads(text)["runtime"]["Ada (RTX 40, L40S)"]["computed_db"])


def test_capture_keeps_a_sample_of_all_runs_and_of_the_held_out_runs(tmp_path):
    from quant_core.calib.capture import linear_widths, new_session, save_capture
    from test_capture import Net, batches, capture_run
    net, path = Net(), str(tmp_path / "cap.safetensors")
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    data = [batches(s, n=4) for s in range(4)]  # 4 runs of 128 rows; the 2nd and 4th held out
    for i, d in enumerate(data):
        save_capture(path, capture_run(session, net, i, d), heldout_every=2)
    got = load_calibration(path)["up"]
    assert got.input_sample.shape == (256, 24) and got.heldout_input_sample.shape == (256, 24)
    fit_rows = torch.cat([x.reshape(-1, 24) for run in (data[0], data[2]) for x in run]).bfloat16().float()
    held_rows = torch.cat([x.reshape(-1, 24) for run in (data[1], data[3]) for x in run]).bfloat16().float()
    assert torch.equal(torch.sort(got.input_sample, dim=0).values, torch.sort(fit_rows, dim=0).values)  # all 256
    assert all(any(torch.equal(r, h) for h in held_rows) for r in got.heldout_input_sample[:20])


@pytest.mark.slow
def test_minilm_benchmark_rows(tmp_path):
    """benchmarks/runtime_quality.py end to end on one format: W4A4 as computed is worse than weights only, W4A8
    (Hopper) is nearly weights only."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import runtime_quality
    out = str(tmp_path / "rows.json")
    assert runtime_quality.main(["--formats", "int4", "--methods", "rtn", "--json", out]) == 0
    rows = {row["as"]: row["sqnr_db"] for row in json.load(open(out))}
    weights = rows["weights only"]
    assert rows["as computed on Turing/Ampere (RTX 20/30, A100)"] < weights - 1.5
    assert abs(rows["as computed on Hopper (H100, H200)"] - weights) < 0.3
