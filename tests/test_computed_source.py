"""A computed source (`quant_core.io.source.ComputedSource`: the tensors of a model another program holds, e.g.
ComfyUI's patched MODEL) converts exactly like a file holding the same values, streams one tensor at a time, gives
the quantizer the unrounded fp32 weights, writes kept tensors in the dtypes it names, and is refused cleanly."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quant_core
from quant_core.errors import QuantError
from quant_core.io.source import ComputedSource, SourceTensor


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 values that bf16 cannot hold (a patched weight before rounding), in a Flux-like naming."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(3):
        out[f"blocks.{i}.attn.qkv.weight"] = torch.randn(192, 64, generator=g) / 8
        out[f"blocks.{i}.attn.qkv.bias"] = torch.randn(192, generator=g)
        out[f"blocks.{i}.norm.scale"] = torch.randn(64, generator=g)
    return out


class Recorder:
    """compute(name, exact) over a dict of fp32 values, stored as `dtype`; records every call and how many
    computed tensors are alive at once."""

    def __init__(self, values, dtype=torch.bfloat16):
        self.values, self.dtype, self.calls = values, dtype, []

    def __call__(self, name, exact):
        self.calls.append((name, exact))
        value = self.values[name]
        return value.clone() if exact else value.to(self.dtype)

    def source(self, **extra):
        tensors = [SourceTensor(k, self.dtype, tuple(v.shape)) for k, v in self.values.items()]
        return ComputedSource("test model", tensors, self, {"origin": "test"}, **extra)


def tensors_of(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nvfp4"])
def test_quantized_layers_are_those_of_a_file_holding_the_unrounded_values(tmp_path, fmt):
    values = model()
    recorder = Recorder(values)
    out = str(tmp_path / "computed.safetensors")
    result = quant_core.convert(recorder.source(), out, quant_core.Job.build({"format": fmt, "progress": False,
                                                                               "verify": "full"}))
    assert result.verify.ok and result.verify.checked_reference
    # the same weights from a file: fp32 where quantized (the exact value), bf16 where kept
    f32 = {k: (v if k.endswith(".weight") else v.to(torch.bfloat16)) for k, v in values.items()}
    save_file(f32, str(tmp_path / "file.safetensors"))
    quant_core.quantize(str(tmp_path / "file.safetensors"), str(tmp_path / "from_file.safetensors"), format=fmt)
    got, meta = tensors_of(out)
    want, _ = tensors_of(str(tmp_path / "from_file.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), want[key].reshape(-1).view(torch.uint8)), key
    assert meta["origin"] == "test" and json.loads(meta["quant_core"])["format"] == fmt
    # quantized weights were asked for exactly (fp32), everything else as stored
    asked = dict(recorder.calls[: len(values)])
    assert {k for k, exact in asked.items() if exact} == {k for k in values if k.endswith(".weight")}
    assert result.input_bytes == sum(v.numel() * 2 for v in values.values())


def test_each_tensor_is_computed_once_per_pass_in_stream_order(tmp_path):
    recorder = Recorder(model())
    quant_core.convert(recorder.source(), str(tmp_path / "o.safetensors"),
                       quant_core.Job.build({"format": "int8", "progress": False, "verify": "cheap"}))
    names = [name for name, _ in recorder.calls]
    assert sorted(names) == sorted(model())  # one computation per tensor: nothing read ahead or twice


def test_unquantized_save_keeps_the_source_dtypes_bit_for_bit(tmp_path):
    values = model()
    for dtype in (torch.bfloat16, torch.float32):
        recorder = Recorder(values, dtype)
        out = str(tmp_path / f"{dtype}.safetensors")
        quant_core.convert(recorder.source(), out, quant_core.Job.build({"format": "fp16", "progress": False,
                                                                          "verify": "full"}))
        got, meta = tensors_of(out)
        assert all(torch.equal(got[k], v.to(dtype)) and got[k].dtype == dtype for k, v in values.items())
        assert json.loads(meta["quant_core"])["format"] == "unquantized"


def test_refusals(tmp_path):
    values = model()
    job = quant_core.Job.build({"format": "int8", "progress": False})
    with pytest.raises(QuantError, match="name the output"):
        quant_core.convert(Recorder(values).source(), None, job)
    wrong = Recorder(values)
    wrong.values = {**values, "blocks.1.attn.qkv.weight": torch.zeros(64, 192)}
    source = ComputedSource("test model", [SourceTensor(k, torch.bfloat16, tuple(v.shape)) for k, v in values.items()],
                            wrong)
    out = tmp_path / "o.safetensors"
    with pytest.raises(QuantError, match=r"blocks\.1\.attn\.qkv\.weight came out with shape \[64, 192\]"):
        quant_core.convert(source, str(out), job)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(QuantError, match="two tensors would be written as a"):
        ComputedSource("m", [SourceTensor("a", torch.float32, (2,)), SourceTensor("a", torch.float32, (2,))],
                       lambda n, e: None)
    source_file = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(source_file))
    with pytest.raises(QuantError, match="source model"):
        quant_core.convert(Recorder(values).source(files=(("source model", str(source_file)),)), str(source_file),
                           quant_core.Job.build({"format": "int8", "progress": False, "overwrite": True}))
