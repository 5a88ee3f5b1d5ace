"""Nodes keep their promises whatever a client sends through the API (ComfyUI skips its own min/max checks for nodes
that have `validate_inputs`), and settings that cannot take effect say so instead of doing nothing."""
import os

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from quant_core.calib.file import save_calibration
from quant_core.calib.stats import InputStats
from quant_core.errors import QuantError
from test_nodes import TREE, comfy_dirs, node, pack, quant_inputs, tiny_lora, tiny_model  # noqa: F401 (fixtures)


@pytest.fixture
def biased_model(tmp_path):
    path = str(tmp_path / "m.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(64, 64, generator=g), "a.bias": torch.randn(64, generator=g)}, path)
    return path


def test_bias_correction_without_input_mean_says_it_was_skipped(biased_model, tmp_path):
    calib = str(tmp_path / "c.safetensors")
    save_calibration(calib, {"a": InputStats(torch.ones(64), torch.ones(64), 10)}, "no means")
    result = quant_core.quantize(biased_model, str(tmp_path / "o.safetensors"), calibration_data=calib)
    assert any("bias correction skipped for 1 layers" in note for note in result.notes)
    assert "bias correction skipped" in result.report.layers[0].calibration
    with_mean = str(tmp_path / "c2.safetensors")
    save_calibration(with_mean, {"a": InputStats(torch.ones(64), torch.ones(64), 10, mean=torch.ones(64))}, "means")
    result = quant_core.quantize(biased_model, str(tmp_path / "o2.safetensors"), calibration_data=with_mean)
    assert not any("skipped" in note for note in result.notes) and result.report.layers[0].bias_shift > 0


def test_static_activations_without_statistics_are_refused(biased_model, tmp_path):
    with pytest.raises(QuantError, match="--static-activations needs --calibration-data"):
        quant_core.quantize(biased_model, str(tmp_path / "o.safetensors"), format="fp8", static_activations=True)
    assert not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.skipif(TREE is None, reason="no ComfyUI tree")
@pytest.mark.parametrize("strength", [1000.0, -50.0, float("inf"), True])
def test_merge_lora_strength_range_is_checked_by_the_node(pack, comfy_dirs, strength):  # noqa: F811
    model = tiny_model(comfy_dirs)
    lora, _ = tiny_lora(comfy_dirs)
    merge = node(pack, "QuantCoreMergeLoRA")
    message = merge.validate_inputs(lora=lora, strength=strength)
    assert isinstance(message, str) and "strength must be a number between -10 and 10" in message
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=model)[0]
    with pytest.raises(ValueError, match="strength must be"):
        merge.execute(plan=plan, lora=lora, strength=strength)


@pytest.mark.skipif(TREE is None, reason="no ComfyUI tree")
@pytest.mark.parametrize("inputs, expected", [(dict(gptq_damp=7.0, method="gptq"), "between 0 and 1"),
                                              (dict(gptq_damp=-1.0, method="gptq"), "between 0 and 1"),
                                              (dict(gptq_damp=0.05), "applies to --optimizer gptq or quip")])
def test_quantize_numeric_inputs_checked_against_the_declaration(pack, comfy_dirs, inputs, expected):  # noqa: F811
    message = node(pack, "QuantCoreQuantizeFP8").validate_inputs(**dict(quant_inputs(fp8_type="e4m3fn"), **inputs))
    assert isinstance(message, str) and expected in message


@pytest.mark.skipif(TREE is None, reason="no ComfyUI tree")
@pytest.mark.parametrize("node_id, inputs", [
    ("QuantCoreMergeLoRA", dict(strength=1.0)),
    ("QuantCoreQuantizeFP8", quant_inputs(fp8_type="e4m3fn")),
    ("QuantCoreSmoothQuant", dict(alpha=0.5)),
])
def test_a_string_where_a_plan_link_belongs_is_a_clear_error(pack, comfy_dirs, node_id, inputs):  # noqa: F811
    if node_id == "QuantCoreMergeLoRA":
        inputs = dict(inputs, lora=tiny_lora(comfy_dirs)[0])
    if node_id == "QuantCoreSmoothQuant":
        path = comfy_dirs["quant_calibration"] / "c.safetensors"
        save_calibration(str(path), {"a": InputStats(torch.ones(4), torch.ones(4), 1)}, "t")
        inputs = dict(inputs, calibration="quant_calibration/c.safetensors")
    with pytest.raises(ValueError, match="plan: expected a QUANT_PLAN link"):
        node(pack, node_id).execute(plan="diffusion_models/x.safetensors", **inputs)


@pytest.mark.skipif(TREE is None, reason="no ComfyUI tree")
def test_symlinks_follow_the_documented_policy(pack, comfy_dirs, tmp_path):  # noqa: F811
    """A link placed in a model folder is followed for reading, but must point at a regular file; errors never echo
    the content of what a link points at; saving never follows a link out of the destination folder."""
    model = tiny_model(comfy_dirs)
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=model)[0]
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"API_KEY=0123456789abcdef\n")
    os.symlink(secret, comfy_dirs["loras"] / "evil.safetensors")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", comfy_dirs["loras"] / "fifo.safetensors")
    import folder_paths
    folder_paths.filename_list_cache.clear()
    merge = node(pack, "QuantCoreMergeLoRA")
    with pytest.raises(ValueError) as refused:
        merge.execute(plan=plan, lora="loras/evil.safetensors", strength=1.0)
    leaked = str(int.from_bytes(b"API_KEY=", "little"))
    assert leaked not in str(refused.value) and "API_KEY" not in str(refused.value)
    message = merge.validate_inputs(lora="loras/fifo.safetensors", strength=1.0)
    assert isinstance(message, str) and "not a regular file" in message
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, comfy_dirs["output"] / "linked")
    save = node(pack, "QuantCoreSaveQuantized")
    quantized = node(pack, "QuantCoreQuantizeFP8").execute(plan=plan, **quant_inputs(fp8_type="e4m3fn"))[0]
    with pytest.raises(ValueError, match="leaves the output folder"):
        save.execute(plan=quantized, filename_prefix="linked/model", destination="output", verify="cheap")
    assert not list(outside.iterdir())


@pytest.mark.parametrize("verify", ["cheap", "full"])
def test_cancel_during_the_final_verify_leaves_no_file(biased_model, tmp_path, verify):
    """The progress callback is also consulted while the written file is verified; raising there (ComfyUI's
    Cancel) stops the run before the file is published."""
    calls = []

    class Cancelled(Exception):
        pass

    def on_layer(done, total):
        calls.append((done, total))
        if done == total and calls.count((total, total)) > 1:  # the stream is over: we are in the final checks
            raise Cancelled
    out = tmp_path / "o.safetensors"
    with pytest.raises(Cancelled):
        quant_core.quantize(biased_model, str(out), verify=verify, on_layer=on_layer)
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.skipif(TREE is None, reason="no ComfyUI tree")
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "output/../../etc/passwd", "output/nothere.safetensors"])
def test_verify_node_refuses_bad_file_names_at_validation(pack, comfy_dirs, name):  # noqa: F811
    verify = node(pack, "QuantCoreVerifyQuantized")
    message = verify.validate_inputs(file=name, reference="none")
    assert isinstance(message, str) and name in message


def test_a_lora_strength_that_overflows_is_the_strengths_fault(tmp_path, capsys):
    from quant_core.cli import main
    model, lora = str(tmp_path / "m.safetensors"), str(tmp_path / "l.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"blocks.0.attn.qkv.weight": torch.randn(64, 64, generator=g).bfloat16()}, model)
    save_file({"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.randn(4, 64, generator=g),
               "lora_unet_blocks_0_attn_qkv.lora_up.weight": torch.randn(64, 4, generator=g)}, lora)
    code = main(["-i", model, "-o", str(tmp_path / "o.safetensors"), "--merge-lora", lora, "--merge-lora-scale", "1e38",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "lower the LoRA strength" in err and "fix the checkpoint" not in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["l.safetensors", "m.safetensors"]  # no output, no temporary
