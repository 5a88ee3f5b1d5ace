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
    from quant_core.formats import make_format
    from quant_core.methods import ldlq
    from quant_core.methods.ldlq import SweepConfig, sweep
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
    from quant_core.formats import make_format
    from quant_core.methods import ldlq, ldlq_triton
    from quant_core.methods.ldlq import SweepConfig, sweep
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
