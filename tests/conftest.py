import os
import shutil
import sys

# One intra-op thread per process (this one and every CLI child, which inherits the variable) unless
# OMP_NUM_THREADS says otherwise: the tests' tensors are small, so a second thread gains little on a quiet machine,
# while on a busy one (a shared CI runner, other test runs) OpenMP threads spinning against each other make every
# torch op about ten times slower (the default suite took 4 minutes instead of 1 at a load of 6 on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

if os.environ["OMP_NUM_THREADS"].isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


_FLUX_CACHE: dict[tuple, dict] = {}


def flux_like_state_dict(hidden: int = 256, double: int = 2, single: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """A small checkpoint with Flux's key names and shape relations (hidden size scaled down). Built once per
    argument set and session; every call returns fresh copies (callers may change them)."""
    key = (hidden, double, single, dtype, seed)
    if key not in _FLUX_CACHE:
        _FLUX_CACHE[key] = _flux_like_state_dict(*key)
    return {k: v.clone() for k, v in _FLUX_CACHE[key].items()}


def _flux_like_state_dict(hidden, double, single, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def w(n, k, std=0.02):
        return (torch.randn(n, k, generator=g) * std).to(dtype)

    def b(n):
        return (torch.randn(n, generator=g) * 0.01).to(dtype)

    h, mlp = hidden, 4 * hidden
    sd = {"img_in.weight": w(h, 64), "img_in.bias": b(h), "txt_in.weight": w(h, 128), "txt_in.bias": b(h),
          "time_in.in_layer.weight": w(h, 256), "time_in.in_layer.bias": b(h),
          "time_in.out_layer.weight": w(h, h), "time_in.out_layer.bias": b(h),
          "vector_in.in_layer.weight": w(h, 128), "vector_in.in_layer.bias": b(h),
          "guidance_in.in_layer.weight": w(h, 256), "guidance_in.in_layer.bias": b(h)}
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            sd |= {p + "mod.lin.weight": w(6 * h, h), p + "mod.lin.bias": b(6 * h),
                   p + "attn.qkv.weight": w(3 * h, h), p + "attn.qkv.bias": b(3 * h),
                   p + "attn.norm.query_norm.scale": torch.ones(h // 4, dtype=dtype),
                   p + "attn.norm.key_norm.scale": torch.ones(h // 4, dtype=dtype),
                   p + "attn.proj.weight": w(h, h), p + "attn.proj.bias": b(h),
                   p + "mlp.0.weight": w(mlp, h), p + "mlp.0.bias": b(mlp),
                   p + "mlp.2.weight": w(h, mlp), p + "mlp.2.bias": b(h)}
    for i in range(single):
        p = f"single_blocks.{i}."
        sd |= {p + "linear1.weight": w(3 * h + mlp, h), p + "linear1.bias": b(3 * h + mlp),
               p + "linear2.weight": w(h, h + mlp), p + "linear2.bias": b(h),
               p + "norm.query_norm.scale": torch.ones(h // 4, dtype=dtype),
               p + "norm.key_norm.scale": torch.ones(h // 4, dtype=dtype),
               p + "modulation.lin.weight": w(3 * h, h), p + "modulation.lin.bias": b(3 * h)}
    sd |= {"final_layer.linear.weight": w(64, h), "final_layer.linear.bias": b(64),
           "final_layer.adaLN_modulation.1.weight": w(2 * h, h), "final_layer.adaLN_modulation.1.bias": b(2 * h)}
    return sd


@pytest.fixture(scope="session")
def _flux_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_source") / "flux_tiny.safetensors"
    save_file(flux_like_state_dict(), str(path), metadata={"modelspec.title": "tiny flux"})
    return path


@pytest.fixture
def flux_file(tmp_path, _flux_source):
    """The tiny Flux checkpoint in this test's own directory (a copy of one file written once per session)."""
    path = tmp_path / "flux_tiny.safetensors"
    shutil.copyfile(_flux_source, path)
    return str(path)


@pytest.fixture
def make_file(tmp_path):
    def make(tensors: dict, name: str = "model.safetensors", metadata=None):
        path = tmp_path / name
        save_file(tensors, str(path), metadata=metadata)
        return str(path)
    return make


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from quant_core.cli import main

    def run(*argv):
        code = main([str(a) for a in argv] + ["--no-progress"] if argv and argv[0] not in ("verify", "demo") else [str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run
