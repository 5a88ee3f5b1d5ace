"""GPTQ and QuIP: output error on held-out correlated inputs against RTN, every format, the column sweep's
options, ConvRot storage read back through comfy-kitchen, bias correction and the report, and the CLI flags."""
import os
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quant_core
from quant_core.calib import StatsAccumulator, save_calibration
from quant_core.errors import QuantError
from quant_core.quantization.formats import make_format
from quant_core.quantization.methods import GPTQ, QuIP, QuipConfig, make_method
from quant_core.quantization.methods.sweep import SweepConfig, sweep
from quant_core.quantization.formats import CONTRACTS

N, K = 96, 256


def correlated(tokens: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features and a non-zero mean (like a layer after a norm)."""
    g = torch.Generator().manual_seed(100)  # the same mixing for fit and held-out sets
    mix = torch.randn(K, K, generator=g) / K ** 0.5 * torch.linspace(0.1, 3, K)
    offset = torch.randn(K, generator=g)
    return torch.randn(tokens, K, generator=torch.Generator().manual_seed(seed)) @ mix + offset


@pytest.fixture(scope="module")
def layer():
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(5)) * 0.05
    acc = StatsAccumulator(K)
    acc.add(correlated(2048, seed=1))
    return weight, acc.result(), correlated(1024, seed=2)


def output_sqnr(weight, approx, x) -> float:
    return float(10 * torch.log10((x @ weight.T).pow(2).sum() / (x @ (weight - approx).T).pow(2).sum()))


def quantize(fmt, method, weight, stats):
    grid = fmt.grid(weight.clone())
    return fmt.reconstruct(method.codes(fmt, grid, "layer", stats), grid)


# measured margins (dB) on this layer: int8 3.4, fp8 3.7, nvfp4 3.2, mxfp8 3.6, ConvRot 3.7
@pytest.mark.parametrize("family,group", [("int8", 0), ("fp8", 0), ("nvfp4", 0), ("mxfp8", 0), ("int8", 64)])
def test_gptq_beats_rtn_on_held_out_outputs(layer, family, group):
    weight, stats, heldout = layer
    fmt = make_format(family, None, 128, group)
    rtn = output_sqnr(weight, quantize(fmt, make_method("rtn"), weight, stats), heldout)
    gptq = output_sqnr(weight, quantize(fmt, GPTQ(), weight, stats), heldout)
    assert gptq > rtn + 2.0, (family, group, rtn, gptq)


def test_gptq_without_hessian_is_rtn_and_without_stats_is_exactly_rtn(layer):
    weight, stats, _ = layer
    fmt = make_format("nvfp4")  # block scales: no scale search, so diagonal-only stats give plain RTN
    rtn = quantize(fmt, make_method("rtn"), weight, None)
    assert torch.equal(quantize(fmt, GPTQ(), weight, None), rtn)
    diagonal = type(stats)(stats.absmax, stats.mean_sq, stats.n_tokens)
    assert torch.equal(quantize(fmt, GPTQ(), weight, diagonal), rtn)


def test_sweep_with_identity_hessian_is_round_to_nearest(layer):
    weight, _, _ = layer
    fmt = make_format("int8")
    grid = fmt.grid(weight.clone())
    codes = sweep(grid.work, grid.scale, torch.eye(K), fmt.round, SweepConfig(damp=0.0))
    assert torch.equal(codes, make_method("rtn").codes(fmt, fmt.grid(weight.clone()), ""))


def test_offloaded_factor_gives_the_same_codes(layer):
    weight, stats, _ = layer
    fmt = make_format("int8")
    plain = sweep(weight, fmt.grid(weight).scale, stats.hessian, fmt.round, SweepConfig(block_size=32))
    offloaded = sweep(weight, fmt.grid(weight).scale, stats.hessian, fmt.round,
                      SweepConfig(block_size=32, offload_segments=3, offload_min_k=K))
    torch.testing.assert_close(offloaded, plain, rtol=0, atol=1)  # fp reassociation may flip a rare tie
    assert float((offloaded != plain).float().mean()) < 0.01


def test_act_order_and_damping_change_the_result(layer):
    weight, stats, _ = layer
    fmt = make_format("int8")
    base = quantize(fmt, GPTQ(), weight, stats)
    from quant_core.quantization.methods import GPTQConfig
    assert not torch.equal(base, quantize(fmt, GPTQ(GPTQConfig(gptq_actorder=False)), weight, stats))
    assert not torch.equal(base, quantize(fmt, GPTQ(GPTQConfig(gptq_damp=0.001)), weight, stats))


def test_quip_convrot_equals_ldlq_in_comfyui_basis_and_beats_rtn(layer):
    weight, stats, heldout = layer
    fmt = make_format("int8", "row", 128, 64)
    quip = output_sqnr(weight, quantize(fmt, QuIP(), weight, stats), heldout)
    rtn = output_sqnr(weight, quantize(make_format("int8"), make_method("rtn"), weight, stats), heldout)
    assert quip > rtn + 2.0


def test_quip_original_space_is_reproducible_and_seeded(layer):
    weight, stats, _ = layer
    fmt = make_format("int8")
    a = quantize(fmt, QuIP(QuipConfig(quip_seed=1)), weight, stats)
    assert torch.equal(a, quantize(fmt, QuIP(QuipConfig(quip_seed=1)), weight, stats))
    assert not torch.equal(a, quantize(fmt, QuIP(QuipConfig(quip_seed=2)), weight, stats))
    assert not torch.equal(a, quantize(fmt, QuIP(QuipConfig(quip_seed=1, quip_hadamard=False)), weight, stats))


@pytest.fixture
def calibrated_model(tmp_path):
    """A two-layer checkpoint (with biases) and a calibration file with Hessians, means and held-out moments."""
    g = torch.Generator().manual_seed(0)
    src = str(tmp_path / "m.safetensors")
    save_file({"enc.a.weight": torch.randn(N, K, generator=g) * 0.05, "enc.a.bias": torch.randn(N, generator=g),
               "enc.b.weight": torch.randn(64, K, generator=g) * 0.05}, src)
    fit, held = StatsAccumulator(K), StatsAccumulator(K)
    fit.add(correlated(2048, 1))
    held.add(correlated(512, 2))
    stats = fit.result()
    stats.heldout_hessian, stats.heldout_mean = held.result().hessian, held.result().mean
    calib = str(tmp_path / "calib.safetensors")
    save_calibration(calib, {"enc.a": stats, "enc.b": stats}, "test")
    return src, calib, stats


def test_convert_with_gptq_corrects_biases_and_reports_output_sqnr(calibrated_model, tmp_path):
    src, calib, stats = calibrated_model
    out = str(tmp_path / "o.safetensors")
    result = quant_core.quantize(src, out, method="gptq", calibration_data=calib, verify="full")
    assert result.verify.ok
    layer = next(s for s in result.report.layers if s.layer == "enc.a")
    assert layer.output_sqnr_db > layer.rtn_output_sqnr_db + 2
    summary = result.report.summary()
    assert "held-out" in layer.calibration and "better than RTN" in summary and "NOT better" not in summary
    with safe_open(out, "pt") as f, safe_open(src, "pt") as s:
        weight = s.get_tensor("enc.a.weight")
        approx = CONTRACTS["int8_tensorwise"].dequantize({"weight": f.get_tensor("enc.a.weight"),
                                                          "weight_scale": f.get_tensor("enc.a.weight_scale")}, {}, (N, K))
        expected = s.get_tensor("enc.a.bias") + (weight - approx) @ stats.mean
        torch.testing.assert_close(f.get_tensor("enc.a.bias"), expected, rtol=1e-5, atol=1e-5)
        assert layer.bias_shift == pytest.approx(float(((weight - approx) @ stats.mean).norm()), rel=1e-4)
    off = quant_core.quantize(src, str(tmp_path / "p.safetensors"), method="gptq", calibration_data=calib,
                              bias_correction=False)
    with safe_open(off.output, "pt") as f, safe_open(src, "pt") as s:
        assert torch.equal(f.get_tensor("enc.a.bias"), s.get_tensor("enc.a.bias"))


def test_quip_convrot_file_dequantizes_through_comfy_kitchen(calibrated_model, tmp_path):
    src, calib, _ = calibrated_model
    out = str(tmp_path / "q.safetensors")
    result = quant_core.quantize(src, out, method="quip", quip_store_transformed=True, convrot_group_size=64,
                                 calibration_data=calib, verify="full")
    assert result.verify.ok
    with safe_open(out, "pt") as f:
        conf = json.loads(f.get_tensor("enc.a.comfy_quant").numpy().tobytes())
        assert conf == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64, "orig_dtype": "float32"}
        tensors = {"weight": f.get_tensor("enc.a.weight"), "weight_scale": f.get_tensor("enc.a.weight_scale")}
    ours = make_format("int8", "row", 128, 64).dequantize(tensors, (N, K))
    torch.testing.assert_close(CONTRACTS["int8_tensorwise"].dequantize(tensors, conf, (N, K)), ours)
    layer = next(s for s in result.report.layers if s.layer == "enc.a")
    assert layer.output_sqnr_db > layer.rtn_output_sqnr_db + 2


def test_synthetic_calibration_is_said_and_changes_no_bias(make_file, tmp_path):
    src = make_file({"x.weight": torch.randn(32, 64), "x.bias": torch.ones(32)})
    result = quant_core.quantize(src, str(tmp_path / "o.safetensors"), method="gptq")
    assert result.report.layers[0].calibration == "synthetic N(0, I): round-to-nearest"
    assert result.report.layers[0].output_sqnr_db is None  # synthetic inputs say nothing about real outputs
    with safe_open(result.output, "pt") as f:
        assert torch.equal(f.get_tensor("x.bias"), torch.ones(32))
        assert json.loads(f.metadata()["quant_core"])["calibration"] == "synthetic N(0, I)"


def test_lora_informed_calibration_is_refused(make_file, tmp_path):
    """LoRA directions are not recorded inputs: GPTQ/QuIP would run as RTN on them, so the setting is inert."""
    src = make_file({"blk.proj.weight": torch.randn(48, 64)})
    with pytest.raises(quant_core.QuantError, match="--calibration-lora is refused: LoRA-informed directions are "
                                                    "not recorded inputs.*--calibration-data"):
        quant_core.quantize(src, str(tmp_path / "o.safetensors"), method="gptq", calibration_lora=src)
    assert not (tmp_path / "o.safetensors").exists()


def test_layers_missing_from_the_file_fall_back_and_say_so(calibrated_model, make_file, tmp_path):
    _, calib, _ = calibrated_model
    g = torch.Generator().manual_seed(0)
    src = make_file({f"{n}.weight": torch.randn(16, K, generator=g) for n in ("enc.a", "enc.b", "other")})
    result = quant_core.quantize(src, str(tmp_path / "o.safetensors"), method="gptq", calibration_data=calib)
    notes = {s.layer: s.calibration for s in result.report.layers}
    assert notes["other"] == "not in the calibration file: round-to-nearest"


def test_statistics_of_another_model_are_refused_naming_the_layers(calibrated_model, make_file, tmp_path):
    _, calib, _ = calibrated_model
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(quant_core.QuantError, match="none of its 2 layers.*enc.a, enc.b.*other"):
        quant_core.quantize(make_file({"other.weight": torch.randn(16, K)}), out, method="gptq", calibration_data=calib)
    with pytest.raises(quant_core.QuantError, match="another model.*other.*enc.b"):  # one shared name is not enough
        quant_core.quantize(make_file({"enc.a.weight": torch.randn(16, K), "other.weight": torch.randn(16, K)}), out,
                            method="gptq", calibration_data=calib)
    with pytest.raises(quant_core.QuantError, match="another input width.*enc.a"):
        quant_core.quantize(make_file({"enc.a.weight": torch.randn(16, K + 8), "enc.b.weight": torch.randn(16, K)}),
                            out, method="gptq", calibration_data=calib)
    assert not os.path.exists(out)


def test_calibration_names_are_aligned_across_prefixes(calibrated_model, make_file, tmp_path):
    """A capture names layers under the module that ran (no checkpoint prefix); the file may carry one."""
    _, calib, _ = calibrated_model
    g = torch.Generator().manual_seed(0)
    src = make_file({f"model.diffusion_model.{n}.weight": torch.randn(16, K, generator=g) for n in ("enc.a", "enc.b")})
    result = quant_core.quantize(src, str(tmp_path / "o.safetensors"), method="gptq", calibration_data=calib)
    assert all(s.calibration.startswith("calibration file") for s in result.report.layers), result.report.layers


CLI_ERRORS = [
    (["--optimizer", "adamw", "--num_iter", "-1"], "--num_iter must be 0 or more"),
    (["--optimizer", "gptq", "--simple"], "--simple is round-to-nearest"),
    (["--optimizer", "quip", "--quip-store-transformed", "--fp8"], "INT8 per-row ConvRot"),
    (["--quip-checkpointed"], "--quip-checkpointed applies to --optimizer quip"),
    (["--optimizer", "gptq", "--calibration-data", "nope.safetensors"], "--calibration-data nope.safetensors: no such"),
    (["--optimizer", "gptq", "--gptq-damp", "-1"], "--gptq-damp must be between 0 and 1"),
    (["--optimizer", "quip", "--quip-checkpoint-segments", "0"], "must be 1 or more"),
    (["--num_iter", "10"], "--num_iter applies to --optimizer original|adamw|radam"),
    (["--smoothquant"], "--smoothquant needs --calibration-data"),
]


@pytest.mark.parametrize("flags,message", CLI_ERRORS)
def test_cli_refuses_with_one_line(cli, flux_file, flags, message):
    code, out, err = cli("-i", flux_file, *flags)
    assert code != 0 and message in err and err.count("\n") == 1, err


def test_cli_gptq_with_calibration_file_prints_what_it_bought(cli, calibrated_model, tmp_path):
    src, calib, _ = calibrated_model
    code, out, err = cli("-i", src, "-o", tmp_path / "o.safetensors", "--optimizer", "gptq", "--calibration-data",
                         calib, "--gptq-damp", "0.05", "--no-gptq-actorder", "--report-quality")
    assert code == 0, err
    assert "output SQNR on held-out calibration inputs" in out and "RTN out" in out


def test_quip_checkpointed_cli_matches_plain(cli, calibrated_model, tmp_path):
    src, calib, _ = calibrated_model
    common = ["--optimizer", "quip", "--quip-store-transformed", "--convrot-group-size", "64", "--calibration-data",
              calib, "--gptq-block-size", "32"]
    assert cli("-i", src, "-o", tmp_path / "a.safetensors", *common)[0] == 0
    assert cli("-i", src, "-o", tmp_path / "b.safetensors", *common, "--quip-checkpointed",
               "--quip-checkpoint-threshold", "128", "--quip-checkpoint-segments", "3")[0] == 0
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(str(tmp_path / "b.safetensors"), "pt") as b:
        diff = (a.get_tensor("enc.a.weight").int() - b.get_tensor("enc.a.weight").int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def test_a_method_that_does_not_beat_rtn_falls_back_and_says_so(calibrated_model, tmp_path):
    """QuIP stored in the original space re-quantizes by RTN: on these inputs it loses on every layer, so every
    layer is written with RTN's codes (every tensor is RTN's, biases included), and the report counts it."""
    src, calib, _ = calibrated_model
    result = quant_core.quantize(src, str(tmp_path / "o.safetensors"), method="quip", calibration_data=calib)
    rtn = quant_core.quantize(src, str(tmp_path / "r.safetensors"), calibration_data=calib)
    with safe_open(result.output, "pt") as a, safe_open(rtn.output, "pt") as b:
        assert a.keys() == b.keys() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    for layer in result.report.layers:
        assert layer.method_kept is False and layer.method_sqnr_db < layer.rtn_output_sqnr_db - 0.5
        assert layer.output_sqnr_db == layer.rtn_output_sqnr_db and layer.compared_on == "held-out inputs"
        assert "quip not better than RTN on held-out inputs" in layer.calibration
    summary = result.report.summary()
    assert "NOT better than RTN" in summary and "quip: round-to-nearest on all 2 layers (not better than RTN on " \
        "held-out inputs: " in summary


@pytest.mark.parametrize("method,flags", [
    ("gptq", ["--no-scale-search"]), ("gptq", ["--no-gptq-actorder"]), ("gptq", ["--gptq-damp", "0.01"]),
    ("quip", ["--quip-seed", "7"]), ("quip", ["--no-quip-hadamard"]), ("quip", ["--no-quip-actorder"]),
])
def test_method_flags_change_the_codes(cli, calibrated_model, tmp_path, method, flags):
    """GPTQ beats RTN here, so its flags change the written codes; original-space QuIP loses to RTN on every
    layer, so RTN's codes are written either way and its flags change the rejected candidate (reported)."""
    src, calib, _ = calibrated_model
    base = ["-i", src, "--optimizer", method, "--calibration-data", calib, "-o"]
    assert cli(*base, tmp_path / "a.safetensors", "--report", tmp_path / "a.json")[0] == 0
    code, _, err = cli(*base, tmp_path / "b.safetensors", "--report", tmp_path / "b.json", *flags)
    assert code == 0, err
    reports = [{s["layer"]: s for s in json.load(open(tmp_path / f"{n}.json"))["layers"]}["enc.a"] for n in "ab"]
    assert reports[0]["method_kept"] is (method == "gptq") and reports[1]["method_kept"] is (method == "gptq")
    assert reports[0]["method_sqnr_db"] != reports[1]["method_sqnr_db"]
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(str(tmp_path / "b.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor("enc.a.weight"), b.get_tensor("enc.a.weight")) is (method == "quip")


def test_lazy_batch_size_does_not_change_the_result(layer):
    """Lazy batches only regroup the trailing updates: any --gptq-block-size gives the same codes (up to float
    reassociation flipping a rare tie)."""
    weight, stats, _ = layer
    fmt = make_format("int8")
    scale = fmt.grid(weight).scale
    a = sweep(weight, scale, stats.hessian, fmt.round, SweepConfig(block_size=128))
    b = sweep(weight, scale, stats.hessian, fmt.round, SweepConfig(block_size=16))
    assert float((a != b).float().mean()) < 0.005 and float((a - b).abs().max()) <= 1
