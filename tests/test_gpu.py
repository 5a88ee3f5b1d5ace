"""The CUDA path writes the same bytes as the CPU path (every format but ConvRot, whose rotation is a matmul whose
summation order differs between devices: there codes may differ by one step). Skipped without CUDA."""
import pytest
import torch

import quant_core

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [dict(format="int8"), dict(format="int8", scaling_mode="tensor"), dict(format="fp8"), dict(format="fp8_e5m2"),
         dict(format="nvfp4"), dict(format="mxfp8"), dict(format="int8", scaling_mode="block", block_size=64)]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_cuda_output_is_byte_identical_to_cpu(flux_file, tmp_path, options):
    cpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "cpu.safetensors"), device="cpu", **options)
    gpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "gpu.safetensors"), device="cuda",
                              verify="full", **options)
    assert gpu.verify.ok
    with open(cpu.output, "rb") as a, open(gpu.output, "rb") as b:
        assert a.read() == b.read()


def test_cuda_convrot_matches_cpu_within_one_code(flux_file, tmp_path):
    from safetensors import safe_open
    options = dict(format="int8", convrot=True, convrot_group_size=64)
    cpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "cpu.safetensors"), device="cpu", **options)
    gpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "gpu.safetensors"), device="cuda", **options)
    with safe_open(cpu.output, "pt") as a, safe_open(gpu.output, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.dtype == torch.int8:
                diff = (x.int() - y.int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3, key
            elif x.is_floating_point():
                assert torch.allclose(x.float(), y.float(), rtol=1e-6, atol=0), key
            else:
                assert torch.equal(x, y), key


@pytest.mark.parametrize("family", ["int8", "fp8", "nvfp4", "mxfp8"])
def test_graphed_gptq_sweep_gives_the_eager_codes(monkeypatch, family):
    """The CUDA-graph replay of the column loop must choose exactly the codes of the eager loop."""
    from quant_core.quantization.formats import make_format
    from quant_core.quantization.methods import sweep as ldlq
    from quant_core.quantization.methods.sweep import SweepConfig, sweep
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(256, 1024, generator=g) * 0.02).cuda()
    x = torch.randn(4096, 64, generator=g) @ torch.randn(64, 1024, generator=g) + 0.1 * torch.randn(4096, 1024, generator=g)
    hessian = (x.T @ x / x.shape[0]).cuda()
    fmt = make_format(family, None, 128, 0)
    grid = fmt.grid(weight)
    hessian_work = torch.nn.functional.pad(hessian, (0, grid.work.shape[1] - 1024, 0, grid.work.shape[1] - 1024))
    hessian_work.diagonal()[1024:] = 1.0
    graphed = sweep(grid.work, grid.scale, hessian_work, fmt.round, SweepConfig())
    if family != "nvfp4":  # NVFP4's rounding cannot be captured: it falls back to the eager loop (same codes)
        assert ldlq.GraphedBlock.create(grid.work.shape[0], 128, fmt.round, grid.work.device) is not None
    monkeypatch.setattr(ldlq.GraphedBlock, "create", classmethod(lambda cls, *a: None))
    eager = sweep(grid.work, grid.scale, hessian_work, fmt.round, SweepConfig())
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("family, act_order", [("int8", True), ("int8", False), ("fp8", True), ("fp8", False)])
def test_fused_sweep_matches_the_eager_loop(monkeypatch, family, act_order):
    """The Triton block kernel: codes equal to the eager loop's except rare FMA ties; same output error."""
    pytest.importorskip("triton")
    from quant_core.quantization.formats import make_format
    from quant_core.quantization.methods import sweep as ldlq
    from quant_core.quantization.methods.kernels import triton_sweep as ldlq_triton
    from quant_core.quantization.methods.sweep import SweepConfig, sweep
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(300, 1024, generator=g) * 0.02).cuda()
    x = (torch.randn(4096, 64, generator=g) @ torch.randn(64, 1024, generator=g)
         + 0.1 * torch.randn(4096, 1024, generator=g)).cuda()
    hessian = x.T @ x / x.shape[0]
    fmt = make_format(family, None, 128, 0)
    grid = fmt.grid(weight)
    assert ldlq_triton.block_runner(fmt.round, 128, weight.device) is not None
    config = SweepConfig(act_order=act_order)
    fused = sweep(grid.work, grid.scale, hessian, fmt.round, config)
    monkeypatch.setattr(ldlq_triton, "block_runner", lambda *a: None)
    monkeypatch.setattr(ldlq.GraphedBlock, "create", classmethod(lambda cls, *a: None))
    eager = sweep(grid.work, grid.scale, hessian, fmt.round, config)
    assert (fused != eager).float().mean() < 1e-3

    def output_error(codes):
        delta = codes * grid.scale - grid.work
        return float(torch.einsum("nk,kl,nl->", delta, hessian, delta))
    assert output_error(fused) == pytest.approx(output_error(eager), rel=1e-2)


def small_ring(monkeypatch, slot_bytes=4096, slots=2):
    """Pinned rings of a few KB, so that every weight crosses several buffers (the chunked path)."""
    from quant_core.io import device_feed
    monkeypatch.setattr(device_feed, "SLOT_BYTES", slot_bytes)
    monkeypatch.setattr(device_feed, "SLOTS", slots)


def test_device_feed_hands_over_every_tensor_unchanged(monkeypatch, flux_file):
    from quant_core.io.device_feed import DeviceFeed
    from quant_core.io.reader import SafetensorsReader
    small_ring(monkeypatch)
    with SafetensorsReader(flux_file) as reader:
        keys = reader.keys()
        to_device = {k for k in keys if k.endswith(".weight")}
        seen = []
        for key, tensor in DeviceFeed(reader, torch.device("cuda")).iter_tensors(keys, to_device):
            assert tensor.is_cuda == (key in to_device)
            torch.cuda.synchronize()
            assert torch.equal(tensor.cpu(), reader.get_tensor(key)), key
            seen.append(key)
        assert seen == keys


def test_device_feed_stops_cleanly_when_the_consumer_stops(monkeypatch, flux_file):
    import threading
    from quant_core.io.device_feed import DeviceFeed
    from quant_core.io.reader import SafetensorsReader
    small_ring(monkeypatch)
    before = threading.active_count()
    with SafetensorsReader(flux_file) as reader:
        keys = reader.keys()
        feed = DeviceFeed(reader, torch.device("cuda")).iter_tensors(keys, set(keys))
        next(feed)
        feed.close()  # the generator's finally joins the reader thread
    assert threading.active_count() == before


def test_writer_copies_device_tensors_through_pinned_buffers(monkeypatch, tmp_path):
    from safetensors.torch import load_file
    from quant_core.io import StreamingWriter, header_reserve
    small_ring(monkeypatch)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randint(-128, 127, (300, 77), generator=g, dtype=torch.int8),
               "b": torch.randn(513, 40, generator=g).to(torch.float8_e4m3fn), "c": torch.randn(7, generator=g),
               "d": torch.randn(64, 64, generator=g).bfloat16()}
    path = str(tmp_path / "w.safetensors")
    entries = [(k, "F32", tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, header_reserve(entries, {}), background_bytes=8192) as writer:
        for name, value in tensors.items():
            writer.add(name, value.cuda())  # the caller drops it at once: the copy must not depend on it
        writer.finish({})
        writer.publish()
    loaded = load_file(path)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name].view(torch.uint8),
                                                                 value.view(torch.uint8)), name


@pytest.mark.parametrize("options", [dict(format="int8"), dict(format="nvfp4"), dict(format="fp8", method="gptq")],
                         ids=["int8", "nvfp4", "fp8-gptq"])
def test_chunked_device_pipeline_matches_cpu(monkeypatch, flux_file, tmp_path, options):
    small_ring(monkeypatch)
    cpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "cpu.safetensors"), device="cpu", **options)
    gpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "gpu.safetensors"), device="cuda",
                              prefetch_bytes=1 << 16, verify="full", **options)
    assert gpu.verify.ok and gpu.peak_gpu_bytes > 0
    if options.get("method") == "gptq":  # matrix products differ in summation order between devices
        assert abs(gpu.report.mean_sqnr() - cpu.report.mean_sqnr()) < 0.05
        return
    with open(cpu.output, "rb") as a, open(gpu.output, "rb") as b:
        assert a.read() == b.read()


def test_lora_merge_on_the_device_matches_cpu(flux_file, tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(3)
    lora = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 256, generator=g) * 0.1,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(768, 4, generator=g) * 0.1,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}, lora)
    cpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "cpu.safetensors"), device="cpu", loras=((lora, 1.0),))
    gpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "gpu.safetensors"), device="cuda",
                              loras=((lora, 1.0),), verify="full")
    assert gpu.verify.ok
    with open(cpu.output, "rb") as a, open(gpu.output, "rb") as b:
        assert a.read() == b.read()
