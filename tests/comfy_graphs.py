"""Tiny models that STOCK ComfyUI nodes load and sample on CPU, and API-format graphs (the JSON POSTed to /prompt)
that sample them, for end-to-end tests on a real ComfyUI server (tests/comfy_server.py).

- `tiny_flux_state_dict()`: a Flux diffusion model (a `diffusion_models/*.safetensors` file for UNETLoader) with
  1 double block and 1 single block, guidance_in, context_in_dim = vec_in_dim = 768 (a CLIP-L alone conditions it).
  Hidden size is 3072 (24 heads of 128), not smaller: ComfyUI 0.3.75 fixes num_heads = 24 and axes_dim = [16, 56, 56]
  for every Flux it detects, and the model refuses hidden // 24 != 128. About 535 M parameters, a 1.07 GB bf16 file.
- `random_clip_l_state_dict()`: a random CLIP-L text encoder (HF key names, 12 layers of 768, ~123 M parameters,
  fp16, 246 MB) for CLIPLoader type "stable_diffusion": conditioning [1, 77, 768], pooled_output [1, 768].
- `flux_txt2img()` / `flux_txt2img_custom()`: UNETLoader → CLIPLoader → CLIPTextEncode → FluxGuidance →
  EmptySD3LatentImage → KSampler (or SamplerCustomAdvanced) → SaveLatent, returned as a `Graph` (the prompt dict plus
  the ids of its nodes) that other nodes can be spliced into (`model_from=`, `clip_from=`, `Graph.add`).
- `read_latent()`: the tensor a SaveLatent node wrote in a run; `install_tiny_models()`: both files into a server.

Nothing of ComfyUI is copied here; only its stock node names and input names are used.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

UNET_NAME = "tiny_flux.safetensors"
CLIP_NAME = "tiny_clip_l.safetensors"
CLIP_TYPE = "stable_diffusion"  # CLIPLoader type that makes a lone CLIP-L an SD1 text encoder: 768-wide cond + pooled
LATENT_CHANNELS = 16

FLUX_HIDDEN = 3072  # = 24 heads x 128: the only hidden size ComfyUI 0.3.75's Flux detection can build (see above)
CLIP_WIDTH, CLIP_LAYERS, CLIP_FF, CLIP_VOCAB, CLIP_POSITIONS = 768, 12, 3072, 49408, 77


# --- models -----------------------------------------------------------------------------------------------------------

def tiny_flux_state_dict(hidden: int = FLUX_HIDDEN, double: int = 1, single: int = 1, context_dim: int = 768,
                         vec_dim: int = 768, dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flux diffusion-model keys (as in flux1-dev.safetensors) that UNETLoader detects as Flux (guidance distilled).

    Same key layout as conftest's flux_like_state_dict(), with ComfyUI's head size (query/key norm scales of 128),
    txt_in / vector_in as wide as CLIP-L, and vector_in/guidance_in out_layers. Weights are N(0, 1/fan_in) (unit-scale
    activations through the blocks), biases small, norm scales one, so sampled latents are finite and depend on the
    noise, the prompt and every block.
    """
    g = torch.Generator().manual_seed(seed)
    head = 128

    def w(n, k, gain=1.0):
        return (torch.randn(n, k, generator=g) * (gain / k ** 0.5)).to(dtype)

    def b(n):
        return (torch.randn(n, generator=g) * 0.01).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    h, mlp = hidden, 4 * hidden
    sd = {"img_in.weight": w(h, 64), "img_in.bias": b(h), "txt_in.weight": w(h, context_dim), "txt_in.bias": b(h)}
    for name, fan_in in (("time_in", 256), ("vector_in", vec_dim), ("guidance_in", 256)):
        sd |= {f"{name}.in_layer.weight": w(h, fan_in), f"{name}.in_layer.bias": b(h),
               f"{name}.out_layer.weight": w(h, h), f"{name}.out_layer.bias": b(h)}
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            sd |= {p + "mod.lin.weight": w(6 * h, h, 0.5), p + "mod.lin.bias": b(6 * h),
                   p + "attn.qkv.weight": w(3 * h, h), p + "attn.qkv.bias": b(3 * h),
                   p + "attn.norm.query_norm.scale": ones(head), p + "attn.norm.key_norm.scale": ones(head),
                   p + "attn.proj.weight": w(h, h), p + "attn.proj.bias": b(h),
                   p + "mlp.0.weight": w(mlp, h), p + "mlp.0.bias": b(mlp),
                   p + "mlp.2.weight": w(h, mlp), p + "mlp.2.bias": b(h)}
    for i in range(single):
        p = f"single_blocks.{i}."
        sd |= {p + "linear1.weight": w(3 * h + mlp, h), p + "linear1.bias": b(3 * h + mlp),
               p + "linear2.weight": w(h, h + mlp), p + "linear2.bias": b(h),
               p + "norm.query_norm.scale": ones(head), p + "norm.key_norm.scale": ones(head),
               p + "modulation.lin.weight": w(3 * h, h, 0.5), p + "modulation.lin.bias": b(3 * h)}
    sd |= {"final_layer.linear.weight": w(64, h), "final_layer.linear.bias": b(64),
           "final_layer.adaLN_modulation.1.weight": w(2 * h, h, 0.5), "final_layer.adaLN_modulation.1.bias": b(2 * h)}
    return sd


def random_clip_l_state_dict(layers: int = CLIP_LAYERS, dtype=torch.float16, seed: int = 0, width: int = CLIP_WIDTH,
                             ff: int = CLIP_FF) -> dict[str, torch.Tensor]:
    """A random CLIP-L text encoder with transformers' CLIPTextModel key names (`text_model.…`) plus
    `text_projection.weight` (identity), as ComfyUI's clip_l files have it.

    ComfyUI detects CLIP-L by `text_model.encoder.layers.0.mlp.fc1.weight` alone, but builds all 12 layers from its
    own config and loads with strict=False: a layer missing from the file is left uninitialised (torch.empty), so
    all 12 must be present (`layers` < 12 exists only to show that). `width`/`ff` other than CLIP-L's are for a
    loader told the architecture (ComfyUI's `<name>_model_config` option), as the in-process tests do."""
    g = torch.Generator().manual_seed(seed)
    d = width

    def w(n, k):
        return (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)

    def b(n):
        return (torch.randn(n, generator=g) * 0.01).to(dtype)

    t = "text_model."
    sd = {t + "embeddings.token_embedding.weight": (torch.randn(CLIP_VOCAB, d, generator=g) * 0.02).to(dtype),
          t + "embeddings.position_embedding.weight": (torch.randn(CLIP_POSITIONS, d, generator=g) * 0.01).to(dtype),
          t + "final_layer_norm.weight": torch.ones(d, dtype=dtype),
          t + "final_layer_norm.bias": torch.zeros(d, dtype=dtype),
          "text_projection.weight": torch.eye(d, dtype=dtype)}
    for i in range(layers):
        p = f"{t}encoder.layers.{i}."
        for x in ("q", "k", "v", "out"):
            sd |= {p + f"self_attn.{x}_proj.weight": w(d, d), p + f"self_attn.{x}_proj.bias": b(d)}
        for x in ("layer_norm1", "layer_norm2"):
            sd |= {p + x + ".weight": torch.ones(d, dtype=dtype), p + x + ".bias": torch.zeros(d, dtype=dtype)}
        sd |= {p + "mlp.fc1.weight": w(ff, d), p + "mlp.fc1.bias": b(ff),
               p + "mlp.fc2.weight": w(d, ff), p + "mlp.fc2.bias": b(d)}
    return sd


_MODEL_CACHE: dict[str, Path] = {}


def _cached_file(name: str, make) -> Path:
    """The model file written once per process (generating the 1 GB Flux takes seconds), then linked into servers."""
    if name not in _MODEL_CACHE:
        folder = Path(tempfile.mkdtemp(prefix="quant_core_tiny_models_"))
        atexit.register(shutil.rmtree, folder, True)
        from safetensors.torch import save_file
        path = folder / name
        save_file(make(), str(path))
        _MODEL_CACHE[name] = path
    return _MODEL_CACHE[name]


def install_tiny_models(server, unet: str = UNET_NAME, clip: str = CLIP_NAME) -> dict[str, Path]:
    """Put the tiny Flux into server.models("diffusion_models") and the CLIP-L into server.models("text_encoders")
    under the given names (hard links to one copy per process, a copy across file systems: replace these files,
    never write into them). Returns their paths, keys 'unet' and 'clip'. Idempotent. The first call in a process
    generates and writes 1.3 GB (about 15 s here); later calls (other servers, other modules) only link."""
    out = {}
    for key, folder, name, make in (("unet", "diffusion_models", unet, tiny_flux_state_dict),
                                    ("clip", "text_encoders", clip, random_clip_l_state_dict)):
        source = _cached_file(f"{key}.safetensors", make)
        target = server.models(folder) / name
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        out[key] = target
    return out


# --- API graphs -------------------------------------------------------------------------------------------------------

Link = list  # [node id, output index], as in API prompts


@dataclass
class Graph:
    """An API prompt (`prompt`, the dict POSTed as {"prompt": ...}) and the ids of its nodes by role (`ids`).

    Roles: 'unet', 'clip', 'encode', 'guidance' (absent with guidance=None), 'latent', 'sampler' (KSampler or
    SamplerCustomAdvanced), 'save'; the custom variant adds 'noise', 'guider', 'sampler_select', 'sigmas'."""
    prompt: dict
    ids: dict[str, str] = field(default_factory=dict)

    def node(self, role_or_id: str) -> dict:
        return self.prompt[self.ids.get(role_or_id, role_or_id)]

    def out(self, role_or_id: str, index: int = 0) -> Link:
        """A link to an output of a node (by role or id), e.g. graph.out('unet') == ['1', 0]."""
        return [self.ids.get(role_or_id, role_or_id), index]

    def add(self, class_type: str, inputs: dict, role: str | None = None, node_id: str | None = None) -> str:
        """Add a node (next free numeric id unless given); returns its id, also kept in ids[role] if a role is given."""
        if node_id is None:
            node_id = str(max((int(k) for k in self.prompt if k.isdigit()), default=0) + 1)
        if node_id in self.prompt:
            raise ValueError(f"node id {node_id} is taken")
        self.prompt[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        if role:
            self.ids[role] = node_id
        return node_id

    def set_input(self, role_or_id: str, name: str, value) -> None:
        self.node(role_or_id)["inputs"][name] = value


def _front(g: Graph, unet, clip, prompt, guidance, width, height, batch, clip_from) -> tuple[Link, Link]:
    """Loaders, text encoding, (FluxGuidance) and the empty latent; returns (conditioning, latent) links."""
    g.add("UNETLoader", {"unet_name": unet, "weight_dtype": "default"}, "unet", "1")
    g.add("CLIPLoader", {"clip_name": clip, "type": CLIP_TYPE, "device": "default"}, "clip", "2")
    g.add("CLIPTextEncode", {"text": prompt, "clip": list(clip_from) if clip_from else g.out("clip")}, "encode", "3")
    cond = g.out("encode")
    if guidance is not None:
        g.add("FluxGuidance", {"conditioning": cond, "guidance": float(guidance)}, "guidance", "4")
        cond = g.out("guidance")
    g.add("EmptySD3LatentImage", {"width": width, "height": height, "batch_size": batch}, "latent", "5")
    return cond, g.out("latent")


def flux_txt2img(unet: str = UNET_NAME, clip: str = CLIP_NAME, prompt: str = "a cat", seed: int = 1, steps: int = 4,
                 *, width: int = 64, height: int = 64, batch: int = 1, guidance: float | None = 3.5, cfg: float = 1.0,
                 sampler: str = "euler", scheduler: str = "simple", denoise: float = 1.0,
                 model_from: Link | None = None, clip_from: Link | None = None,
                 filename_prefix: str = "latents/tiny_flux") -> Graph:
    """UNETLoader(1) → CLIPLoader(2) → CLIPTextEncode(3) → FluxGuidance(4) → EmptySD3LatentImage(5) → KSampler(6)
    → SaveLatent(7). `model_from=[id, index]` feeds the KSampler's MODEL from that output instead of the UNETLoader;
    `clip_from` likewise the text encoder's CLIP. The negative is the positive conditioning (cfg 1 never runs it).
    Latent: [batch, 16, height // 8, width // 8] (width/height multiples of 16)."""
    g = Graph({})
    cond, latent = _front(g, unet, clip, prompt, guidance, width, height, batch, clip_from)
    g.add("KSampler", {"model": list(model_from) if model_from else g.out("unet"), "seed": seed, "steps": steps,
                       "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "positive": cond,
                       "negative": cond, "latent_image": latent, "denoise": denoise}, "sampler", "6")
    g.add("SaveLatent", {"samples": g.out("sampler"), "filename_prefix": filename_prefix}, "save", "7")
    return g


def flux_txt2img_custom(unet: str = UNET_NAME, clip: str = CLIP_NAME, prompt: str = "a cat", seed: int = 1,
                        steps: int = 4, *, width: int = 64, height: int = 64, batch: int = 1,
                        guidance: float | None = 3.5, sampler: str = "euler", scheduler: str = "simple",
                        denoise: float = 1.0, model_from: Link | None = None, clip_from: Link | None = None,
                        filename_prefix: str = "latents/tiny_flux_custom") -> Graph:
    """As flux_txt2img, sampled by SamplerCustomAdvanced(10) from RandomNoise(6), BasicGuider(7), KSamplerSelect(8)
    and BasicScheduler(9); SaveLatent(11) saves its first output. `model_from` feeds both BasicGuider and
    BasicScheduler."""
    g = Graph({})
    cond, latent = _front(g, unet, clip, prompt, guidance, width, height, batch, clip_from)
    model = list(model_from) if model_from else g.out("unet")
    g.add("RandomNoise", {"noise_seed": seed}, "noise", "6")
    g.add("BasicGuider", {"model": model, "conditioning": cond}, "guider", "7")
    g.add("KSamplerSelect", {"sampler_name": sampler}, "sampler_select", "8")
    g.add("BasicScheduler", {"model": model, "scheduler": scheduler, "steps": steps, "denoise": denoise}, "sigmas", "9")
    g.add("SamplerCustomAdvanced", {"noise": g.out("noise"), "guider": g.out("guider"),
                                    "sampler": g.out("sampler_select"), "sigmas": g.out("sigmas"),
                                    "latent_image": latent}, "sampler", "10")
    g.add("SaveLatent", {"samples": g.out("sampler"), "filename_prefix": filename_prefix}, "save", "11")
    return g


# --- results ----------------------------------------------------------------------------------------------------------

def latent_files(server, run, save_node_id: str) -> list[Path]:
    """The .latent files a SaveLatent node wrote in this run (from the run's /history outputs)."""
    outputs = (run.history.get("outputs") or {}).get(str(save_node_id)) or {}
    found = []
    for item in outputs.get("latents", []):
        folder = server.base / item.get("type", "output")
        found.append(folder / item.get("subfolder", "") / item["filename"])
    if not found:
        raise AssertionError(f"node {save_node_id} saved no latent in this run:\n{run.transcript()}")
    return found


def read_latent(server, run, save_node_id: str) -> torch.Tensor:
    """The latent (`latent_tensor`, [batch, 16, h, w], float32) that SaveLatent node `save_node_id` wrote in `run`."""
    from safetensors.torch import load_file
    return load_file(str(latent_files(server, run, save_node_id)[0]))["latent_tensor"]
