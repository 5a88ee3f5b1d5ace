"""A real ComfyUI server (CPU) samples the tiny Flux of tests/comfy_graphs.py with stock nodes only: UNETLoader,
CLIPLoader (a random CLIP-L), CLIPTextEncode, FluxGuidance, EmptySD3LatentImage, KSampler or SamplerCustomAdvanced,
SaveLatent. The infrastructure for end-to-end tests of nodes spliced into a sampling graph (calibration capture …).
"""

import pytest
import torch

from comfy_env import comfyui_servers
from comfy_graphs import flux_txt2img, flux_txt2img_custom, install_tiny_models, read_latent
from comfy_server import ComfyServer

pytestmark = pytest.mark.server
SHAPE = (1, 16, 8, 8)  # 64 x 64 px


@pytest.fixture(scope="module", params=comfyui_servers())
def server(request, tmp_path_factory):
    tree, python = request.param
    with ComfyServer(tree, tmp_path_factory.mktemp("comfyui_sampling"), python) as running:
        install_tiny_models(running)
        yield running


def sample(server, graph) -> torch.Tensor:
    run = server.run(graph.prompt)
    assert run.status == 200 and run.end == "execution_success", run.transcript() + server.log_text()[-3000:]
    cached = {n for m in run.of("execution_cached") for n in m.get("nodes", [])}
    assert graph.ids["sampler"] not in cached, "the sampler did not run (cached result)"
    latent = read_latent(server, run, graph.ids["save"])
    assert latent.shape == SHAPE and latent.dtype == torch.float32 and torch.isfinite(latent).all(), latent
    return latent


@pytest.fixture(scope="module")
def seed1(server):
    return sample(server, flux_txt2img(seed=1))


def test_ksampler_same_seed_is_bit_identical_other_seed_differs(server, seed1):
    assert seed1.std() > 0.5  # not collapsed to a constant
    other = sample(server, flux_txt2img(seed=2))  # also evicts the seed-1 sampler from the cache
    again = sample(server, flux_txt2img(seed=1))  # so this one samples again
    assert torch.equal(seed1, again)
    assert (seed1 - other).abs().mean() > 0.5
    prompt = sample(server, flux_txt2img(seed=1, prompt="a dog"))
    assert not torch.equal(seed1, prompt)  # the text conditioning reaches the model
    guidance = sample(server, flux_txt2img(seed=1, guidance=10.0))
    assert not torch.equal(seed1, guidance)  # and FluxGuidance (guidance_in); without the node Flux uses 3.5


def test_sampler_custom_advanced_matches_ksampler(server, seed1):
    assert torch.equal(sample(server, flux_txt2img_custom(seed=1)), seed1)  # same noise, sigmas and steps


def test_spliced_pass_through_nodes_change_nothing(server, seed1):
    """How other tests splice nodes in: model_from/clip_from take the sampler's MODEL and the encoder's CLIP from
    any output; stock nodes that do not change the computation give the same latent."""
    graph = flux_txt2img(seed=1, model_from=["20", 0], clip_from=["21", 0])
    graph.add("DifferentialDiffusion", {"model": graph.out("unet")}, "patch", "20")
    graph.add("CLIPSetLastLayer", {"clip": graph.out("clip"), "stop_at_clip_layer": -1}, "clip_patch", "21")
    assert torch.equal(sample(server, graph), seed1)
