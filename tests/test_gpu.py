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
