"""--streaming-mode / --stream-hadamard-threshold, --bf16-compute, --no-memory-limits and the out-of-memory retry.
No GPU here: CUDA is simulated where the code only needs a device object, and OOM by raising the real exception."""
import pytest
import torch

import quant_core
from quant_core import pipeline as convert_module
from quant_core.quantization.layer import LayerRun, compute_dtype, streaming_threshold
from quant_core.errors import QuantError
from quant_core.io.reader import SafetensorsReader
from quant_core.job import Job

CUDA = torch.device("cuda")


def device(**changes):
    return Job.build(changes).device


def learned(**changes):
    return Job.build(dict(method="learned", **changes)).method_config


def test_streaming_thresholds(monkeypatch):
    assert streaming_threshold(device(streaming_mode="balanced"), CUDA) == 50_000_000
    assert streaming_threshold(device(streaming_mode="aggressive"), CUDA) == 25_000_000
    assert streaming_threshold(device(streaming_mode="minimal"), CUDA) == 100_000_000
    assert streaming_threshold(device(streaming_mode="off"), CUDA) == float("inf")
    assert streaming_threshold(device(cpu_threshold=7), CUDA) == 7
    assert streaming_threshold(device(streaming_mode="aggressive", no_memory_limits=True), CUDA) == float("inf")
    assert streaming_threshold(device(streaming_mode="aggressive"), torch.device("cpu")) == float("inf")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 << 30, 80 << 30))
    assert streaming_threshold(device(), CUDA) == (64 << 30) / 64  # auto: 16 fp32 copies of the weight fit


def test_layers_above_the_threshold_run_on_the_cpu():
    run = LayerRun(None, CUDA, False, "m", 1000, [])
    assert run.device_for(1000) == CUDA and run.device_for(1001) == torch.device("cpu")


def test_bf16_compute_modes(monkeypatch):
    cpu = torch.device("cpu")
    assert compute_dtype(10 ** 7, cpu, learned(bf16_compute="auto")) == torch.float32  # auto: CUDA only
    assert compute_dtype(10, cpu, learned(bf16_compute="on")) == torch.bfloat16
    assert compute_dtype(10 ** 7, cpu, learned(bf16_compute="off")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype(10 ** 6, CUDA, learned()) == torch.bfloat16
    assert compute_dtype(10 ** 6 - 1, CUDA, learned()) == torch.float32
    assert compute_dtype(500, CUDA, learned(bf16_threshold=500)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere: fp32 even when on
    assert compute_dtype(10 ** 8, CUDA, learned(bf16_compute="on")) == torch.float32


def test_bf16_compute_changes_the_learned_rounding_arithmetic(flux_file, tmp_path):
    """Without recorded statistics learned rounding is judged on the weight error, where round-to-nearest is optimal:
    RTN's codes are written either way, and the report shows the learned codes (which bf16 changes) lost."""
    files, reports = {}, {}
    for mode in ("on", "off"):
        out = str(tmp_path / f"{mode}.safetensors")
        result = quant_core.quantize(input=flux_file, output=out, format="fp8", method="learned", bf16_compute=mode,
                                     exclude_layers=r"^(?!double_blocks\.0\.img_attn\.qkv$)", verify="off",
                                     optimizer="adamw", num_iter=30, lr=0.2)
        reports[mode] = result.report.layers[0]
        with SafetensorsReader(out) as reader:
            files[mode] = reader.get_tensor("double_blocks.0.img_attn.qkv.weight").view(torch.uint8)
    assert torch.equal(files["on"], files["off"])
    assert reports["on"].method_kept is False and reports["off"].method_kept is False
    assert reports["on"].method_sqnr_db != reports["off"].method_sqnr_db


def simulate_cuda_oom(monkeypatch, fail_layers=None):
    """The converter believes it has a CUDA device; computing a layer there raises OutOfMemoryError."""
    real = LayerRun._compute_on
    attempts = []

    def compute_on(self, device, decision, *args):
        attempts.append((decision.layer, device.type))
        if device.type == "cuda":
            if fail_layers is None or decision.layer in fail_layers:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            device = torch.device("cpu")  # the "GPU" computation of layers that fit, done on the CPU here
        return real(self, device, decision, *args)

    monkeypatch.setattr(LayerRun, "_compute_on", compute_on)
    monkeypatch.setattr(convert_module, "pick_device", lambda options: CUDA)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return attempts


def test_out_of_memory_retries_that_layer_on_the_cpu(monkeypatch, flux_file, tmp_path):
    layer = "double_blocks.1.img_mlp.0"
    attempts = simulate_cuda_oom(monkeypatch, {layer})
    result = quant_core.quantize(input=flux_file, output=str(tmp_path / "o.safetensors"), streaming_mode="off",
                                 verify="full")
    assert result.verify.ok
    assert [n for n in result.notes if "out of memory" in n] == [f"{layer}: CUDA out of memory; quantized on the "
                                                                 "CPU instead"]
    assert [a for a in attempts if a[0] == layer] == [(layer, "cuda"), (layer, "cpu")]


def test_no_memory_limits_makes_out_of_memory_fatal(monkeypatch, flux_file, tmp_path):
    simulate_cuda_oom(monkeypatch)
    with pytest.raises(QuantError, match=r"CUDA out of memory \(--no-memory-limits: no CPU retry\)"):
        quant_core.quantize(input=flux_file, output=str(tmp_path / "o.safetensors"), no_memory_limits=True)
    assert not (tmp_path / "o.safetensors").exists()


def test_streaming_threshold_sends_big_layers_to_the_cpu_first(monkeypatch, flux_file, tmp_path):
    attempts = simulate_cuda_oom(monkeypatch, set())
    quant_core.quantize(input=flux_file, output=str(tmp_path / "o.safetensors"), cpu_threshold=200_000)
    big = {layer for layer, device in attempts if device == "cpu"}
    assert big and all(layer.endswith(("mlp.0", "mlp.2", "mod.lin", "linear1", "linear2")) for layer in big)
    assert all(device == "cuda" for layer, device in attempts if layer not in big)
