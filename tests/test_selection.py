"""Layer selection: defaults, every preset on a realistic key list of its model family, regex, layer config,
--heur, and per-layer fallbacks when a format does not fit."""
import json

import pytest

from quant_core.errors import QuantError
from quant_core.io.reader import TensorInfo
from quant_core.job import Job
from quant_core.select.plan import KEEP, QUANTIZE, REMOVE, build_plan
from quant_core.select.presets import PRESETS


def infos(spec):
    """spec: {key: shape} (bf16) or {key: (shape, dtype)}"""
    out = []
    for key, value in spec.items():
        shape, dtype = (value if isinstance(value, tuple) and isinstance(value[1], str) else (value, "BF16"))
        out.append(TensorInfo(key, dtype, tuple(shape), 0, 0))
    return out


def plan_sets(spec, **opts):
    plan = build_plan(infos(spec), Job.build(opts))
    return ({d.key for d in plan.of(QUANTIZE)}, {d.key for d in plan.of(KEEP)}, {d.key for d in plan.of(REMOVE)}, plan)


def test_defaults_quantize_only_linear_weights():
    spec = {"blocks.0.attn.qkv.weight": [768, 256], "blocks.0.attn.qkv.bias": [768],
            "blocks.0.norm.weight": [256], "blocks.0.conv.weight": [64, 32, 3, 3],
            "pos_embed": [1, 64, 256], "embeddings.position_ids": ([1, 512], "I64"),
            "embeddings.word_embeddings.weight": [30522, 256], "lm_head.weight": [32000, 256],
            "img_in.weight": [256, 64], "final_layer.linear.weight": [64, 256],
            "blocks.0.mlp.fc1.weight": ([1024, 256], "F32"), "blocks.0.fp8.weight": ([256, 256], "F8_E4M3")}
    quantized, kept, removed, plan = plan_sets(spec)
    assert quantized == {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"}
    assert not removed
    reasons = {d.key: d.reason for d in plan.of(KEEP)}
    assert "embedding" in reasons["embeddings.word_embeddings.weight"] and "embedding" in reasons["lm_head.weight"]
    assert "input/output" in reasons["img_in.weight"] and "input/output" in reasons["final_layer.linear.weight"]
    assert reasons["blocks.0.attn.qkv.bias"] == "bias"
    assert "4-D" in reasons["blocks.0.conv.weight"]
    quantized, _, _, _ = plan_sets(spec, quantize_embeddings=True, quantize_io_layers=True)
    assert {"embeddings.word_embeddings.weight", "lm_head.weight", "img_in.weight"} <= quantized


T5 = {**{f"{side}.block.{i}.layer.0.SelfAttention.{p}.weight": [4096, 4096] for side in ("encoder", "decoder")
         for i in range(2) for p in "qkvo"},
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": [32, 64],
      "encoder.block.0.layer.0.layer_norm.weight": [4096],
      "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": [10240, 4096],
      "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": [10240, 4096],
      "encoder.block.0.layer.1.DenseReluDense.wo.weight": [4096, 10240],
      "encoder.final_layer_norm.weight": [4096], "shared.weight": [32128, 4096], "lm_head.weight": [32128, 4096]}
MISTRAL = {**{f"model.layers.0.self_attn.{p}_proj.weight": [4096, 5120] for p in "qkvo"},
           **{f"model.layers.0.mlp.{p}_proj.weight": [14336, 5120] for p in ("gate", "up", "down")},
           "model.layers.0.input_layernorm.weight": [5120], "model.layers.0.post_attention_layernorm.weight": [5120],
           "model.embed_tokens.weight": [131072, 5120], "model.norm.weight": [5120], "lm_head.weight": [131072, 5120],
           "multi_modal_projector.linear_1.weight": [5120, 1024]}
VISUAL = {"visual.blocks.0.attn.qkv.weight": [3840, 1280], "visual.blocks.0.attn.proj.weight": [1280, 1280],
          "visual.blocks.0.mlp.gate_proj.weight": [3420, 1280], "visual.blocks.0.mlp.up_proj.weight": [3420, 1280],
          "visual.blocks.0.mlp.down_proj.weight": [1280, 3420], "visual.merger.mlp.0.weight": [5120, 5120]}
FLUX2 = {"double_blocks.0.img_attn.qkv.weight": [18432, 6144], "double_blocks.0.txt_mlp.0.weight": [36864, 6144],
         "double_stream_modulation_img.lin.weight": [36864, 6144], "single_stream_modulation.lin.weight": [18432, 6144],
         "single_blocks.0.linear1.weight": [55296, 6144], "img_in.weight": [6144, 128], "txt_in.weight": [6144, 15360],
         "time_in.in_layer.weight": [6144, 256], "guidance_in.in_layer.weight": [6144, 256],
         "final_layer.linear.weight": [128, 6144], "final_layer.adaLN_modulation.1.weight": [12288, 6144]}
LORA = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [16, 3072],
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": [9216, 16],
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": ([], "F32"),
        "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": [16, 3072],
        "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": [3072, 16],
        "transformer.single_transformer_blocks.0.attn.to_k.dora_scale": [1, 3072],
        "lora_unet_single_blocks_0_linear2.diff.weight": [3072, 15360]}
CHROMA = {"distilled_guidance_layer.in_proj.weight": [5120, 64],
          "distilled_guidance_layer.layers.0.in_layer.weight": [5120, 5120],
          "double_blocks.0.img_attn.qkv.weight": [9216, 3072], "double_blocks.0.img_attn.proj.weight": [3072, 3072],
          "single_blocks.0.linear1.weight": [21504, 3072], "final_layer.linear.weight": [64, 3072],
          "img_in.weight": [3072, 64], "txt_in.weight": [3072, 4096],
          "nerf_blocks.0.param_generator.weight": [2048, 3072], "nerf_image_embedder.embedder.0.weight": [64, 48]}
RADIANCE = {"img_in_patch.weight": [3072, 3, 16, 16], "nerf_final_layer_conv.conv.weight": [3, 64, 3, 3],
            "__x0__": ([1], "BF16"), "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
            "img_in_patch_linear.weight": [3072, 768]}
WAN = {"blocks.0.self_attn.q.weight": [5120, 5120], "blocks.0.self_attn.norm_q.weight": [5120],
       "blocks.0.cross_attn.k.weight": [5120, 5120], "blocks.0.ffn.0.weight": [13824, 5120],
       "blocks.0.ffn.2.weight": [5120, 13824], "text_embedding.0.weight": [5120, 4096],
       "text_embedding.2.weight": [5120, 5120], "time_embedding.0.weight": [5120, 256],
       "time_projection.1.weight": [30720, 5120], "head.head.weight": [64, 5120],
       "img_emb.proj.1.weight": [1280, 1280], "patch_embedding.weight": [5120, 16, 1, 2, 2]}
HUNYUAN = {"double_blocks.0.img_attn_qkv.weight": [6144, 2048], "double_blocks.0.img_attn_proj.weight": [2048, 2048],
           "double_blocks.0.img_mlp.fc1.weight": [8192, 2048], "double_blocks.0.img_attn_q_norm.weight": [128],
           "double_blocks.0.img_mod.linear.weight": [12288, 2048],
           "txt_in.individual_token_refiner.blocks.0.norm1.weight": [2048],
           "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight": [8192, 2048],
           "vision_in.proj.0.weight": [1152, 1152], "vision_in.proj.4.weight": [2048, 1152],
           "img_in.proj.weight": [2048, 65, 1, 1, 1], "cond_type_embedding.weight": [3, 2048],
           "byt5_in.layernorm.weight": [1472]}
QWEN = {"transformer_blocks.0.attn.to_q.weight": [3072, 3072], "transformer_blocks.0.attn.add_q_proj.weight": [3072, 3072],
        "transformer_blocks.0.attn.norm_added_q.weight": [128], "transformer_blocks.0.img_mod.1.weight": [18432, 3072],
        "transformer_blocks.1.img_mod.1.weight": [18432, 3072], "transformer_blocks.0.txt_mod.1.weight": [18432, 3072],
        "transformer_blocks.0.img_mlp.net.0.proj.weight": [12288, 3072], "txt_norm.weight": [3584],
        "time_text_embed.timestep_embedder.linear_1.weight": [3072, 256], "img_in.weight": [3072, 64],
        "txt_in.weight": [3072, 3584], "norm_out.linear.weight": [6144, 3072], "proj_out.weight": [64, 3072]}
ZIMAGE = {"layers.0.attention.qkv.weight": [11520, 3840], "layers.0.attention.out.weight": [3840, 3840],
          "layers.0.attention.k_norm.weight": [128], "layers.0.feed_forward.w1.weight": [10240, 3840],
          "layers.0.adaLN_modulation.0.weight": [15360, 256], "layers.0.attention_norm1.weight": [3840],
          "cap_embedder.0.weight": [2560], "cap_embedder.1.weight": [3840, 2560], "x_embedder.weight": [3840, 64],
          "t_embedder.mlp.0.weight": [1024, 256], "final_layer.linear.weight": [64, 3840],
          "final_layer.adaLN_modulation.1.weight": [3840, 256],
          "context_refiner.0.attention.qkv.weight": [11520, 3840], "noise_refiner.0.feed_forward.w2.weight": [3840, 10240],
          "x_pad_token": [1, 3840], "cap_pad_token": [1, 3840]}

# preset -> (key list, keys it must quantize, keys it must keep, keys it must remove); all io keeps disabled so
# only the preset decides (defaults are tested above)
PRESET_CASES = {
    "t5xxl": (T5, {"encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wo.weight"},
              {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"},
              {"decoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight"}),
    "mistral": (MISTRAL, {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"},
                {"model.embed_tokens.weight", "lm_head.weight", "multi_modal_projector.linear_1.weight"}, set()),
    "visual": (VISUAL, {"visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"},
               {"visual.blocks.0.mlp.gate_proj.weight", "visual.blocks.0.mlp.down_proj.weight"}, set()),
    "flux2": (FLUX2, {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"},
              {"double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight", "img_in.weight",
               "txt_in.weight", "time_in.in_layer.weight", "guidance_in.in_layer.weight", "final_layer.linear.weight"}, set()),
    "lora": (LORA, {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                    "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight"},
             {"lora_unet_double_blocks_0_img_attn_qkv.alpha", "lora_unet_single_blocks_0_linear2.diff.weight"}, set()),
    "distillation_large": (CHROMA, {"double_blocks.0.img_attn.qkv.weight"},
                           {"distilled_guidance_layer.in_proj.weight", "final_layer.linear.weight", "img_in.weight",
                            "txt_in.weight"}, set()),
    "distillation_small": (CHROMA, {"double_blocks.0.img_attn.qkv.weight", "img_in.weight", "txt_in.weight"},
                           {"distilled_guidance_layer.layers.0.in_layer.weight"}, set()),
    "nerf_large": (CHROMA, {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"},
                   {"nerf_blocks.0.param_generator.weight", "nerf_image_embedder.embedder.0.weight", "txt_in.weight",
                    "double_blocks.0.img_attn.proj.weight", "distilled_guidance_layer.in_proj.weight"}, set()),
    "nerf_small": (CHROMA, {"double_blocks.0.img_attn.proj.weight", "txt_in.weight"},
                   {"nerf_blocks.0.param_generator.weight", "distilled_guidance_layer.in_proj.weight"}, set()),
    "radiance": (RADIANCE, {"double_blocks.0.img_attn.qkv.weight"},
                 {"img_in_patch_linear.weight", "img_in_patch.weight", "__x0__"}, set()),
    "wan": (WAN, {"blocks.0.self_attn.q.weight", "blocks.0.ffn.2.weight"},
            {"text_embedding.0.weight", "time_embedding.0.weight", "time_projection.1.weight", "head.head.weight",
             "img_emb.proj.1.weight"}, set()),
    "hunyuan": (HUNYUAN, {"double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_mlp.fc1.weight"},
                {"vision_in.proj.0.weight", "vision_in.proj.4.weight", "cond_type_embedding.weight"}, set()),
    "qwen": (QWEN, {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.img_mod.1.weight",
                    "transformer_blocks.0.txt_mod.1.weight"},
             {"transformer_blocks.0.img_mod.1.weight", "time_text_embed.timestep_embedder.linear_1.weight",
              "img_in.weight", "txt_in.weight", "norm_out.linear.weight", "proj_out.weight"}, set()),
    "zimage": (ZIMAGE, {"layers.0.attention.qkv.weight", "context_refiner.0.attention.qkv.weight"},
               {"cap_embedder.1.weight", "x_embedder.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight",
                "layers.0.adaLN_modulation.0.weight"}, set()),
    "zimage_refiner": (ZIMAGE, {"layers.0.attention.qkv.weight"},
                       {"context_refiner.0.attention.qkv.weight", "noise_refiner.0.feed_forward.w2.weight",
                        "cap_embedder.1.weight", "x_embedder.weight"}, set()),
}


def test_every_seed_preset_is_in_the_table_and_tested():
    seed_presets = {"t5xxl", "mistral", "visual", "flux2", "lora", "distillation_large", "distillation_small",
                    "nerf_large", "nerf_small", "radiance", "wan", "hunyuan", "qwen", "zimage", "zimage_refiner"}
    assert seed_presets == set(PRESETS) == set(PRESET_CASES)


@pytest.mark.parametrize("preset", sorted(PRESET_CASES))
def test_preset_on_its_model_family(preset):
    spec, must_quantize, must_keep, must_remove = PRESET_CASES[preset]
    quantized, kept, removed, _ = plan_sets(spec, presets=(preset,), quantize_io_layers=True, quantize_embeddings=True)
    assert must_quantize <= quantized, must_quantize - quantized
    assert must_keep <= kept, must_keep - kept
    assert must_remove <= removed and all(("decoder" in k or "lm_head" in k) for k in removed)
    without, _, _, _ = plan_sets(spec, quantize_io_layers=True, quantize_embeddings=True)
    assert (must_keep | must_remove) & without, "the preset must change something"


def test_exclude_layers_regex_and_bad_regex():
    quantized, kept, _, _ = plan_sets(FLUX2, exclude_layers=r"txt_mlp|linear1")
    assert "double_blocks.0.txt_mlp.0.weight" in kept and "single_blocks.0.linear1.weight" in kept
    assert "double_blocks.0.img_attn.qkv.weight" in quantized
    with pytest.raises(QuantError, match="bad regular expression"):
        plan_sets(FLUX2, exclude_layers="(unclosed")


def test_layer_config_rules_first_match_wins(tmp_path):
    config = {"rules": [{"match": r"img_attn\.qkv", "format": "fp8"},
                        {"match": r"single_blocks", "skip": True},
                        {"match": r"txt_mlp", "format": "int8", "scaling": "row", "convrot": 256,
                         "full_precision_matrix_mult": True},
                        {"match": r"never_matches", "format": "nvfp4"}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    quantized, kept, _, plan = plan_sets(FLUX2, layer_config=str(path))
    d = plan.decisions
    assert d["double_blocks.0.img_attn.qkv.weight"].format.name == "float8_e4m3fn"
    assert "single_blocks.0.linear1.weight" in kept
    txt = d["double_blocks.0.txt_mlp.0.weight"]
    assert txt.format.convrot_group == 256 and txt.full_precision_matrix_mult
    assert plan.rules_unmatched == ["layer-config rule 3 ('never_matches')"]


def test_layer_config_seed_form_is_accepted():
    config = {"_default": {"format": "float8_e4m3fn"},
              "img_attn\\.qkv": {"format": "int8_blockwise", "scaling_mode": "block", "block_size": 128, "simple": True},
              "txt_mlp": {"skip": True}}
    quantized, kept, _, plan = plan_sets(FLUX2, layer_config=config)
    assert plan.decisions["double_blocks.0.img_attn.qkv.weight"].format.name == "int8_blockwise"
    assert plan.decisions["single_blocks.0.linear1.weight"].format.name == "float8_e4m3fn"
    assert "double_blocks.0.txt_mlp.0.weight" in kept


@pytest.mark.parametrize("config,message", [
    ({"rules": [{"match": "a", "formatt": "fp8"}]}, r"rule 0 \('a'\): unknown key 'formatt'|rule 0: unknown key"),
    ({"rules": [{"format": "fp8"}]}, "rule 0: needs a 'match'"),
    ({"rules": [{"match": "(", "format": "fp8"}]}, "rule 0: bad regex"),
    ({"rules": [{"match": "a", "format": "int3"}]}, r"rule 0 \('a'\): unknown format 'int3'"),
    ({"rules": [{"match": "a"}, {"match": "b", "format": "nvfp4", "scaling": "row"}]}, r"rule 1 \('b'\): nvfp4 has fixed"),
    ({"rules": [{"match": "a", "block_size": -1, "format": "int8"}]}, "'block_size' must be a positive integer"),
    ({"rules": [{"match": "a", "skip": "yes"}]}, "'skip' must be true or false"),
    ({"rules": "nope"}, "'rules' must be a list"),
    ([1, 2], "JSON object with a 'rules' list"),
])
def test_layer_config_errors_name_the_bad_entry(config, message):
    with pytest.raises(QuantError, match=message):
        plan_sets(FLUX2, layer_config=config)


def test_malformed_layer_config_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(QuantError, match="malformed layer config JSON"):
        plan_sets(FLUX2, layer_config=str(path))


def test_heur_skips_poor_shapes():
    spec = {"a.weight": [3072, 3072], "tiny.weight": [8, 3072], "odd.weight": [100, 3072], "thin.weight": [65536, 64]}
    quantized, kept, _, plan = plan_sets(spec, heur=True)
    assert quantized == {"a.weight"}
    reasons = {d.key: d.reason for d in plan.of(KEEP)}
    assert "smaller than 16" in reasons["tiny.weight"] and "not divisible" in reasons["odd.weight"]
    assert "aspect ratio" in reasons["thin.weight"]
    quantized, _, _, _ = plan_sets(spec)
    assert quantized == set(spec)


def test_block_mode_falls_back_instead_of_crashing_on_a_64x256_layer():
    # the seed tool crashes mid-file on this layer in block mode
    spec = {"ok.weight": [256, 256], "small.weight": [64, 256]}
    quantized, _, _, plan = plan_sets(spec, format="int8", scaling_mode="block", block_size=128)
    assert quantized == set(spec)
    assert plan.decisions["ok.weight"].format.name == "int8_blockwise"
    small = plan.decisions["small.weight"]
    assert small.format.name == "int8_tensorwise" and small.format.per_row
    assert "fell back" in small.reason and "128×128" in small.reason


def test_convrot_falls_back_to_plain_rows_when_k_does_not_divide():
    spec = {"ok.weight": [256, 512], "odd.weight": [256, 320]}
    _, _, _, plan = plan_sets(spec, convrot=True, convrot_group_size=256)
    assert plan.decisions["ok.weight"].format.convrot_group == 256
    odd = plan.decisions["odd.weight"]
    assert odd.format.convrot_group == 0 and "not a multiple of the ConvRot group size" in odd.reason


def test_fp16_plan_quantizes_nothing():
    quantized, kept, _, _ = plan_sets(FLUX2, format="fp16")
    assert not quantized and kept == set(FLUX2)
