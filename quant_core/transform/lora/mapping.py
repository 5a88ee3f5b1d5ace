"""LoRA key styles and how their module names map onto the weights of a checkpoint: one table.

A LoRA key is `<prefix><module><separator><part>`: the prefix says the trainer's style (kohya `lora_unet_`,
PEFT `base_model.model.`, diffusers `transformer.`, ComfyUI `diffusion_model.` …), the module names a layer in
dotted (diffusers/BFL) or underscored (kohya) form, the part says which factor it is (`lora_up.weight`, `alpha`,
`hada_w1_a`, …). Modules are matched against the checkpoint's own layer names; Flux LoRAs trained on diffusers
naming are mapped onto BFL's fused layers (`to_q/to_k/to_v` → row slices of `img_attn.qkv`, …).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# (style name, key prefix) — longest first; the prefix is stripped before matching.
STYLE_PREFIXES = [
    ("kohya", "lora_transformer_"), ("kohya", "lora_unet_"), ("kohya", "lora_te1_"), ("kohya", "lora_te2_"),
    ("kohya", "lora_te3_"), ("kohya", "lora_te_"), ("lycoris", "lycoris_"),
    ("peft", "base_model.model."), ("diffusers", "transformer."), ("diffusers", "unet."),
    ("diffusers", "text_encoder_2."), ("diffusers", "text_encoder."), ("comfyui", "diffusion_model."),
    ("comfyui", "model.diffusion_model."),
]
# Parts of a LoRA module, longest first. Values: the factor's role.
PARTS = [
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight", "lora.up.weight",
    "lora.down.weight", "lora_A.default.weight", "lora_B.default.weight", "alpha", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b",
]
PART_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight"}
# Prefixes a checkpoint's own layer names may carry; a LoRA module may be written with or without them.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.",
                       "text_encoders.t5xxl.transformer.", "text_encoders.clip_l.transformer.", "encoder_model.")


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """LoRA key → (style, module without the style prefix, part, module as written) or None if no LoRA key."""
    part = next((p for p in PARTS if key.endswith("." + p)), None)
    if part is None:
        return None
    module = raw = key[: -len(part) - 1]
    style = "plain"
    for name, prefix in STYLE_PREFIXES:
        if module.startswith(prefix):
            style, module = name, module[len(prefix):]
            break
    return style, module, PART_ALIASES.get(part, part), raw


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's delta goes: a checkpoint weight, optionally a row range of it."""

    weight_key: str
    rows: tuple[int, int] | None = None  # None: the whole weight
    swap_halves: bool = False  # diffusers' norm_out is [scale, shift]; BFL's final adaLN is [shift, scale]


# Flux diffusers module regex → (BFL layer template, kind). kind None: the whole weight; "qkv": the q/k/v third of a
# fused layer, K rows each (K = hidden size = the fused weight's in-features); "mlp": a single block's proj_mlp rows,
# after q/k/v at 3K; "swap": diffusers' [scale, shift] halves go to BFL's [shift, scale].
FLUX_DIFFUSERS = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks.{0}.img_attn.qkv", "qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks.{0}.txt_attn.qkv", "qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{0}.img_attn.proj", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{0}.txt_attn.proj", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{0}.img_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{0}.img_mlp.2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks.{0}.txt_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks.{0}.txt_mlp.2", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks.{0}.img_mod.lin", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks.{0}.txt_mod.lin", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks.{0}.linear1", "qkv"),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", "single_blocks.{0}.linear1", "mlp"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{0}.linear2", None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks.{0}.modulation.lin", None),
    (r"x_embedder", "img_in", None),
    (r"context_embedder", "txt_in", None),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None),
    (r"proj_out", "final_layer.linear", None),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", "swap"),
]
# each pattern also in kohya's underscored form (`lora_transformer_single_transformer_blocks_0_attn_to_k`)
_DOT = r"\."
_FLUX_COMPILED = [(re.compile(f"^{p}$"), template, kind) for p, template, kind in FLUX_DIFFUSERS] + \
                 [(re.compile(f"^{p.replace(_DOT, '_')}$"), template, kind) for p, template, kind in FLUX_DIFFUSERS]


class ModuleIndex:
    """The checkpoint's weights under every name a LoRA may use for them."""

    def __init__(self, weights: dict[str, tuple[int, ...]]):
        """`weights`: checkpoint key → shape, for every `<layer>.weight`."""
        self.shapes = weights
        self.dotted: dict[str, str] = {}
        self.underscored: dict[str, str | None] = {}  # None: two layers share the underscored name (ambiguous)
        for key in weights:
            layer = key[: -len(".weight")]
            for alias in self._aliases(layer):
                self.dotted.setdefault(alias, key)
                flat = alias.replace(".", "_")
                if self.underscored.get(flat, key) != key:
                    self.underscored[flat] = None
                else:
                    self.underscored[flat] = key

    @staticmethod
    def _aliases(layer: str):
        yield layer
        for prefix in CHECKPOINT_PREFIXES:
            if layer.startswith(prefix):
                yield layer[len(prefix):]

    def resolve(self, module: str, overrides: dict[str, Target]) -> Target | None:
        if module in overrides:
            return overrides[module]
        key = self.dotted.get(module) or self.underscored.get(module.replace(".", "_"))
        if key is not None:
            return Target(key)
        return self._flux_diffusers(module)

    def _flux_diffusers(self, module: str) -> Target | None:
        for pattern, template, kind in _FLUX_COMPILED:
            match = pattern.match(module)
            if not match:
                continue
            key = self.dotted.get(template.format(*match.groups()))
            if key is None:
                return None
            if kind is None:
                return Target(key)
            if kind == "swap":
                return Target(key, swap_halves=True)
            shape = tuple(self.shapes[key])
            if len(shape) != 2 or shape[0] < 3 * shape[1] + (kind == "mlp"):
                return None  # not BFL's fused layout ([3K (+ mlp), K]): no row range to map onto
            hidden = shape[1]
            if kind == "qkv":
                offset = "qkv".index(match.group(2)) * hidden
                return Target(key, (offset, offset + hidden))
            return Target(key, (3 * hidden, shape[0]))  # proj_mlp
        return None
