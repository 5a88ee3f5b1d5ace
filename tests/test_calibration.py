"""Calibration statistics: streaming accumulation, the forward-hook recorder, the FORMATS.md §4 file (round trip and
one-line errors), synthetic and LoRA-informed sources, and the `calibrate` subcommand."""
import pytest
import torch
from safetensors.torch import save_file

from quant_core.calib import (InputStats, StatsAccumulator, load_calibration, record_activation_stats,
                              save_calibration, synthetic_stats)
from quant_core.calib.file import CalibrationFile
from quant_core.errors import QuantError


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(tokens, k, generator=g) @ mix + torch.randn(k, generator=g)


def test_streaming_accumulation_equals_one_shot(monkeypatch):
    monkeypatch.setattr(StatsAccumulator, "FLUSH_TOKENS", 100)  # the streamed run flushes 9 times, one-shot once
    x = correlated_inputs(1000, 48)
    streamed = StatsAccumulator(48)
    for chunk in torch.split(x, 37):
        streamed.add(chunk.reshape(-1, 1, 48))  # any leading shape
    one = StatsAccumulator(48)
    one.add(x)
    a, b = streamed.result(), one.result()
    assert a.n_tokens == b.n_tokens == 1000
    for field in ("hessian", "mean", "mean_sq", "absmax"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-6)
    x64 = x.double()
    torch.testing.assert_close(a.hessian.double(), x64.T @ x64 / 1000, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mean.double(), x64.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.absmax, x.abs().amax(0))


def test_accumulator_without_hessian_keeps_the_diagonal():
    acc = StatsAccumulator(16, hessian=False)
    x = correlated_inputs(64, 16)
    acc.add(x)
    stats = acc.result()
    assert stats.hessian is None
    torch.testing.assert_close(stats.second_moment(), torch.diag((x.double() ** 2).mean(0)).float())


def test_recorder_hooks_every_linear_and_holds_out_calls():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    batches = [correlated_inputs(5, 8, seed) for seed in range(6)]
    stats = record_activation_stats(model, lambda: [model(b) for b in batches], heldout_every=3)
    assert set(stats) == {"0", "2"}
    fit = torch.cat([b for i, b in enumerate(batches) if (i + 1) % 3])
    held = torch.cat([b for i, b in enumerate(batches) if (i + 1) % 3 == 0])
    assert stats["0"].n_tokens == len(fit)
    torch.testing.assert_close(stats["0"].hessian, (fit.T @ fit) / len(fit), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["0"].heldout_hessian, (held.T @ held) / len(held), rtol=1e-5, atol=1e-6)
    hidden = torch.relu(model[0](fit))
    torch.testing.assert_close(stats["2"].mean, hidden.mean(0).detach(), rtol=1e-5, atol=1e-6)
    assert not model[0]._forward_hooks  # hooks removed afterwards


def test_file_round_trip(tmp_path):
    path = str(tmp_path / "calib.safetensors")
    acc = StatsAccumulator(12)
    acc.add(correlated_inputs(40, 12))
    stats = acc.result()
    stats.input_scale = torch.tensor(0.5)
    save_calibration(path, {"blocks.0.attn.qkv": stats, "diag.only": InputStats(torch.ones(4), torch.ones(4), 7)},
                     "test")
    back = load_calibration(path)
    assert set(back) == {"blocks.0.attn.qkv", "diag.only"}
    for field in ("hessian", "mean", "mean_sq", "absmax"):
        torch.testing.assert_close(getattr(back["blocks.0.attn.qkv"], field), getattr(stats, field))
    assert back["blocks.0.attn.qkv"].n_tokens == 40 and float(back["blocks.0.attn.qkv"].input_scale) == 0.5
    assert back["diag.only"].hessian is None and back["diag.only"].n_tokens == 7
    assert CalibrationFile(path).source == "test"


META = {"format": "quant_calibration", "version": "1", "source": "x"}
GOOD = {"l.input_absmax": torch.ones(4), "l.n_tokens": torch.tensor(3)}
BAD_FILES = [
    (GOOD, {"format": "other", "version": "1"}, "expected 'quant_calibration'"),
    (GOOD, {"format": "quant_calibration", "version": "9"}, "version '9'"),
    ({**GOOD, "l.hessian": torch.ones(3, 3)}, META, "l: hessian has shape [3, 3], expected [4, 4]"),
    ({"l.input_absmax": torch.ones(4)}, META, "layer l has no l.n_tokens"),
    ({**GOOD, "l.n_tokens": torch.tensor(0)}, META, "l.n_tokens must be one positive integer"),
    ({**GOOD, "l.input_mean": torch.tensor([1.0, float("nan"), 0, 0])}, META, "mean must hold finite"),
    ({**GOOD, "l.weird": torch.ones(1)}, META, "unknown key 'l.weird'"),
]


@pytest.mark.parametrize("tensors,meta,message", BAD_FILES)
def test_bad_calibration_files_are_one_line_errors(tmp_path, tensors, meta, message):
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(QuantError) as e:
        load_calibration(path)
    assert message in str(e.value) and "\n" not in str(e.value) and path in str(e.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(QuantError, match="not a safetensors file"):
        load_calibration(str(path))


def test_layer_width_is_checked_against_the_model(tmp_path):
    path = str(tmp_path / "c.safetensors")
    save_file(GOOD, path, metadata=META)
    with pytest.raises(QuantError, match=r"absmax has shape \[4\], expected \[8\]"):
        CalibrationFile(path).get("l", k=8)


def test_synthetic_statistics():
    syn = synthetic_stats(6)
    assert torch.equal(syn.hessian, torch.eye(6)) and torch.equal(syn.mean, torch.zeros(6))


def test_calibrate_subcommand_synthetic(cli, make_file, tmp_path):
    src = make_file({"a.weight": torch.randn(8, 32), "a.bias": torch.zeros(8), "b.weight": torch.randn(4, 8)})
    out = str(tmp_path / "calib.safetensors")
    code, stdout, err = cli("calibrate", "-i", src, "-o", out, "--samples", "64", "--seed", "3", "--heldout-every", "4")
    assert code == 0, err
    stats = load_calibration(out)
    assert set(stats) == {"a", "b"} and stats["a"].n_tokens == 48  # 4 calls of 16, one held out
    assert stats["a"].hessian.shape == (32, 32) and stats["a"].heldout_hessian.shape == (32, 32)
    assert float(stats["a"].input_scale) == pytest.approx(float(stats["a"].absmax.max()) / 448)
    # seeded: same file twice
    out2 = str(tmp_path / "calib2.safetensors")
    assert cli("calibrate", "-i", src, "-o", out2, "--samples", "64", "--seed", "3", "--heldout-every", "4")[0] == 0
    assert torch.equal(load_calibration(out2)["a"].hessian, stats["a"].hessian)


def test_calibrate_subcommand_errors(cli, make_file, tmp_path):
    src = make_file({"a.weight": torch.randn(8, 32)})
    code, _, err = cli("calibrate", "-i", src, "-o", str(tmp_path / "c.safetensors"), "--text", "x.txt")
    assert code != 0 and "--hf-model and --text go together" in err and err.count("\n") == 1


def test_range_readers_never_load_a_layers_hessian_and_negative_ranges_are_refused(tmp_path):
    """SmoothQuant/static scales read through the shared reader with `only=`: a [K,K] tensor is not even read (a bad
    one does not matter to them), while every range is still validated."""
    from quant_core.calib.ranges import read_calibration
    meta = {"format": "quant_calibration", "version": "1", "source": "test"}
    path = str(tmp_path / "c.safetensors")
    save_file({"l.input_absmax": torch.ones(4), "l.n_tokens": torch.tensor(3), "l.hessian": torch.ones(3, 3)},
              path, metadata=meta)
    assert float(read_calibration(path).input_absmax("l").sum()) == 4.0
    with pytest.raises(QuantError, match="hessian has shape"):
        CalibrationFile(path).get("l")
    save_file({"l.input_absmax": -torch.ones(4), "l.n_tokens": torch.tensor(3)}, path, metadata=meta)
    with pytest.raises(QuantError, match="absmax has negative values"):
        read_calibration(path)
