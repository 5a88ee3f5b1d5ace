"""The model presets of convert-to-quant: one table of what each keeps in high precision or removes.

Matching follows convert-to-quant exactly: a pattern is a plain, case-sensitive substring of the full tensor key
(`double_blocks.0.img_in.weight`), so the lists below can be compared with its lists line by line.
`only` (for --lora) restricts quantization to matching keys instead.
"""
from __future__ import annotations

from dataclasses import dataclass

# Layers convert-to-quant keeps for its text-encoder and video presets (norms, biases, embeddings, encoders, adapters).
AVOID_KEY_NAMES = (
    "norm", "bias", "embed_tokens", "lm_head", "shared", "patch_embedding", "audio_model.patch_embedding", "ref_conv",
    "control_adapter", "motion_encoder.enc.net_app", "face_encoder.conv", "pose_patch_embedding",
    "motion_encoder.enc.fc", "img_emb.proj", "k_norm", "q_norm", "motion_encoder.dec", "head.modulation",
    "casual_audio_encoder", "cond_encoder", "frame_packer", "norm_k", "norm_q", "tekken_model",
    "multi_modal_projector", "patch_conv", "ln_pre", "input_layernorm", "attention_norm", "post_attention_layernorm",
    "mm_input_projection_weight",
)
ZIMAGE_KEEP = (
    "cap_embedder.0", "cap_pad_token", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "k_norm",
    "q_norm", "x_pad_token", "x_embedder", "clip_text_pooled_proj", "final_layer", "cap_embedder.1",
    "adaLN_modulation", "t_embedder", "time_text_embed",
)


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    keep: tuple[str, ...] = ()  # substrings: keys holding one stay in high precision
    remove: tuple[str, ...] = ()  # substrings: keys holding one are dropped from the output
    only: tuple[str, ...] = ()  # substrings: if set, only keys holding one are quantized

    def keeps(self, key: str) -> bool:
        if self.only and not any(s in key for s in self.only):
            return True
        return any(s in key for s in self.keep)

    def removes(self, key: str) -> bool:
        return any(s in key for s in self.remove)


_TABLE = [
    # Text encoders
    Preset("t5xxl", "T5-XXL text encoder: remove the decoder and lm_head, keep norms/biases/embeddings",
           keep=AVOID_KEY_NAMES, remove=("decoder", "lm_head")),
    Preset("mistral", "Mistral text encoder: keep norms, embeddings, lm_head, projector", keep=AVOID_KEY_NAMES),
    Preset("visual", "Visual encoder: keep the MLP layers (down/up/gate proj)",
           keep=("mlp.down_proj", "mlp.up_proj", "mlp.gate_proj")),
    # Diffusion models (Flux-style)
    Preset("flux2", "Flux.2: keep modulation/guidance/time/final/input layers",
           keep=("stream_modulation", "guidance_in", "time_in", "final_layer", "img_in", "txt_in")),
    Preset("lora", "LoRA files: quantize only the lora_up/lora_down (lora_A/lora_B) matrices; alpha/scale stay",
           keep=("alpha", "dora_scale"), only=("lora_up.", "lora_down.", "lora_A.", "lora_B.")),
    Preset("distillation_large", "Chroma/distilled (large): keep distilled_guidance, final, img/txt_in",
           keep=("distilled_guidance_layer", "final_layer", "img_in", "txt_in")),
    Preset("distillation_small", "Chroma/distilled (small): keep only distilled_guidance",
           keep=("distilled_guidance_layer",)),
    Preset("nerf_large", "NeRF (large): keep nerf_blocks, distilled_guidance, txt_in",
           keep=("distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder", "txt_in", "_attn.proj")),
    Preset("nerf_small", "NeRF (small): keep nerf_blocks, distilled_guidance",
           keep=("distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder")),
    Preset("radiance", "Radiance: keep img_in_patch, nerf_final_layer",
           keep=("img_in_patch", "nerf_final_layer_conv", "__x0__")),
    # Video models
    Preset("wan", "WAN video: keep embeddings, encoders, head",
           keep=AVOID_KEY_NAMES + ("text_embedding", "time_embedding", "audio_model.text_embedding",
                                   "casual_audio_encoder", "frame_packer", "trainable_cond_mask", "cond_encoder",
                                   "audio_model.time_embedding", "time_projection", "video_model.time_projection",
                                   "head.head", "face_encoder.out_proj", "face_adapter", "audio_injector")),
    Preset("hunyuan", "Hunyuan Video 1.5: keep layernorm, attention norms, vision_in, img_in",
           keep=("layernorm", "img_attn_k_norm", "img_attn_q_norm", "txt_attn_k_norm", "txt_attn_q_norm", "norm1",
                 "norm2", "vision_in.proj.0", "vision_in.proj.4", "img_in.proj", "cond_type_embedding")),
    # Image models
    Preset("qwen", "Qwen-Image: keep added norms, time_text_embed, input/output layers, the first img_mod",
           keep=("norm_added_k", "norm_added_q", "norm_k", "norm_q", "txt_norm", "time_text_embed", "img_in",
                 "norm_out", "proj_out", "transformer_blocks.0.img_mod.1", "txt_in")),
    Preset("zimage", "Z-Image: keep cap_embedder, norms, x_embedder, final layer, modulation", keep=ZIMAGE_KEEP),
    Preset("zimage_refiner", "Z-Image refiner: as --zimage, plus the context/noise refiners",
           keep=ZIMAGE_KEEP + ("context_refiner", "noise_refiner")),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _TABLE}

MAX_ASPECT_RATIO = 64


def poor_shape_reason(shape: tuple[int, int], block: int) -> str:
    """Why `--heur` keeps an [N, K] weight unquantized ('' if it is fine). `block` is the format's natural block
    (16 for int8/fp8/nvfp4, 32 for mxfp8, the tile size of block modes): convert-to-quant's rule, plus the aspect-ratio
    check its manual promises."""
    n, k = shape
    if n < block or k < block:
        return f"dimension smaller than {block} ({n}×{k})"
    if n % block or k % block:
        return f"dimensions not divisible by {block} ({n}×{k})"
    if max(n, k) > MAX_ASPECT_RATIO * min(n, k):
        return f"aspect ratio above {MAX_ASPECT_RATIO} ({n}×{k})"
    return ""
