"""The CUDA path writes the same bytes as the CPU path (every format). Skipped without CUDA."""
import pytest
import torch

import quant_core

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [dict(format="int8"), dict(format="int8", scaling_mode="tensor"),
         dict(format="int8", convrot=True, convrot_group_size=64), dict(format="fp8"), dict(format="fp8_e5m2"),
         dict(format="nvfp4"), dict(format="mxfp8"), dict(format="int8", scaling_mode="block", block_size=64)]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_cuda_output_is_byte_identical_to_cpu(flux_file, tmp_path, options):
    cpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "cpu.safetensors"), device="cpu", **options)
    gpu = quant_core.quantize(input=flux_file, output=str(tmp_path / "gpu.safetensors"), device="cuda",
                              verify="full", **options)
    assert gpu.verify.ok
    with open(cpu.output, "rb") as a, open(gpu.output, "rb") as b:
        assert a.read() == b.read()
