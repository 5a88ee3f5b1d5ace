"""LoRA merging: every key style onto Flux-shaped and T5-shaped checkpoints, checked against an independent dense
computation (fp64), plus the CLI end to end and bad LoRAs."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from conftest import flux_like_state_dict
from quant_core.errors import QuantError
from quant_core.transform.lora.merge import LoraMerger, lora_scales

H, R = 256, 8
G = torch.Generator().manual_seed(7)


def rnd(*shape):
    return torch.randn(*shape, generator=G) * 0.05


def flux_base():
    sd = {k: v.float() for k, v in flux_like_state_dict(hidden=H).items()}
    sd["pos_conv.weight"] = rnd(64, 16, 3, 3)  # a conv weight, for LoCon
    return sd


def t5_base():
    sd = {"shared.weight": rnd(100, 64), "encoder.final_layer_norm.weight": torch.ones(64)}
    for i in range(2):
        p = f"encoder.block.{i}.layer."
        sd |= {p + f"0.SelfAttention.{x}.weight": rnd(64, 64) for x in "qkvo"}
        sd |= {p + "1.DenseReluDense.wi_0.weight": rnd(128, 64), p + "1.DenseReluDense.wi_1.weight": rnd(128, 64),
               p + "1.DenseReluDense.wo.weight": rnd(64, 128), p + "0.layer_norm.weight": torch.ones(64)}
    return sd


def lora_pair(prefix, n, k, style="kohya", alpha=None, rank=R):
    """(LoRA tensors, dense delta) for one Linear module; alpha None means no alpha key (alpha = rank)."""
    down, up = rnd(rank, k), rnd(n, rank)
    names = {"kohya": ("lora_down.weight", "lora_up.weight"), "peft": ("lora_A.weight", "lora_B.weight")}[style]
    tensors = {f"{prefix}.{names[0]}": down, f"{prefix}.{names[1]}": up}
    if alpha is not None:
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    factor = (alpha if alpha is not None else rank) / rank
    return tensors, (up.double() @ down.double()) * factor


class Expected:
    """Independent dense merge: target key → fp64 weight with deltas added where they belong."""

    def __init__(self, base):
        self.base = base
        self.delta = {}

    def add(self, key, delta, rows=None, scale=1.0):
        total = self.delta.setdefault(key, torch.zeros_like(self.base[key], dtype=torch.float64))
        if rows is None:
            total += scale * delta
        else:
            total[rows[0]:rows[1]] += scale * delta

    def check(self, merger, tol=1e-5):
        assert set(merger.pending) == set(self.delta), set(merger.pending) ^ set(self.delta)
        for key, delta in self.delta.items():
            got = merger.apply(key, self.base[key]).double()
            want = self.base[key].double() + delta
            rel = float((got - want).norm() / want.norm())
            assert rel <= tol, (key, rel)


def save(tmp_path, tensors, name="lora.safetensors"):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def merger_for(base, loras, **kw):
    return LoraMerger(loras, {k: tuple(v.shape) for k, v in base.items()}, **kw)


def test_kohya_peft_comfy_prefixes_locon_loha_lokr_diff_on_flux(tmp_path):
    base, exp, lora = flux_base(), None, {}
    exp = Expected(base)
    t, d = lora_pair("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, alpha=4)
    lora |= t; exp.add("double_blocks.0.img_attn.qkv.weight", d)
    t, d = lora_pair("diffusion_model.single_blocks.0.linear1", 3 * H + 4 * H, H, style="peft")
    lora |= t; exp.add("single_blocks.0.linear1.weight", d)
    t, d = lora_pair("base_model.model.double_blocks.1.txt_mlp.0", 4 * H, H, style="peft", alpha=16)
    lora |= t; exp.add("double_blocks.1.txt_mlp.0.weight", d)
    # LoCon on a conv weight
    down, up = rnd(R, 16, 3, 3), rnd(64, R, 1, 1)
    lora |= {"lora_unet_pos_conv.lora_down.weight": down, "lora_unet_pos_conv.lora_up.weight": up,
             "lora_unet_pos_conv.alpha": torch.tensor(2.0)}
    exp.add("pos_conv.weight", (up.double().flatten(1) @ down.double().flatten(1)).reshape(64, 16, 3, 3) * 2 / R)
    # LoHa
    w = {s: rnd(H, R) if s.endswith("a") else rnd(R, 4 * H) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    lora |= {f"lora_unet_double_blocks_1_img_mlp_2.{s}": v for s, v in w.items()}
    exp.add("double_blocks.1.img_mlp.2.weight", (w["hada_w1_a"].double() @ w["hada_w1_b"].double()) *
            (w["hada_w2_a"].double() @ w["hada_w2_b"].double()))
    # LoKr with a low-rank second factor and alpha
    w1, w2a, w2b = rnd(16, 16), rnd(16, 4), rnd(4, 16)
    lora |= {"lora_unet_double_blocks_0_txt_attn_proj.lokr_w1": w1, "lora_unet_double_blocks_0_txt_attn_proj.lokr_w2_a": w2a,
             "lora_unet_double_blocks_0_txt_attn_proj.lokr_w2_b": w2b, "lora_unet_double_blocks_0_txt_attn_proj.alpha": torch.tensor(2.0)}
    exp.add("double_blocks.0.txt_attn.proj.weight", torch.kron(w1.double(), w2a.double() @ w2b.double()) * 2 / 4)
    # full weight and bias deltas
    diff, diff_b = rnd(H, H), rnd(H)
    lora |= {"diffusion_model.time_in.out_layer.diff": diff, "diffusion_model.time_in.out_layer.diff_b": diff_b}
    exp.add("time_in.out_layer.weight", diff.double())
    exp.add("time_in.out_layer.bias", diff_b.double())
    merger = merger_for(base, [(save(tmp_path, lora), 1.0)])
    exp.check(merger)
    assert merger.report.matched == 8 and not merger.report.unmatched
    assert set(merger.report.styles) == {"kohya", "comfyui", "peft"}


def test_diffusers_flux_lora_goes_into_the_fused_bfl_layers(tmp_path):
    base = flux_base()
    exp, lora = Expected(base), {}
    for j, x in enumerate("qkv"):  # separate q/k/v LoRAs → row thirds of the fused qkv
        t, d = lora_pair(f"transformer.transformer_blocks.0.attn.to_{x}", H, H, style="peft", alpha=R // 2)
        lora |= t; exp.add("double_blocks.0.img_attn.qkv.weight", d, rows=(j * H, (j + 1) * H))
    t, d = lora_pair("transformer.transformer_blocks.1.attn.add_k_proj", H, H, style="peft")
    lora |= t; exp.add("double_blocks.1.txt_attn.qkv.weight", d, rows=(H, 2 * H))
    t, d = lora_pair("transformer.single_transformer_blocks.1.attn.to_v", H, H, style="peft")
    lora |= t; exp.add("single_blocks.1.linear1.weight", d, rows=(2 * H, 3 * H))
    t, d = lora_pair("transformer.single_transformer_blocks.1.proj_mlp", 4 * H, H, style="peft")
    lora |= t; exp.add("single_blocks.1.linear1.weight", d, rows=(3 * H, 7 * H))
    t, d = lora_pair("transformer.single_transformer_blocks.0.proj_out", H, 5 * H, style="peft")
    lora |= t; exp.add("single_blocks.0.linear2.weight", d)
    t, d = lora_pair("transformer.transformer_blocks.0.ff_context.net.2", H, 4 * H, style="peft")
    lora |= t; exp.add("double_blocks.0.txt_mlp.2.weight", d)
    t, d = lora_pair("transformer.x_embedder", H, 64, style="peft")
    lora |= t; exp.add("img_in.weight", d)
    t, d = lora_pair("transformer.norm_out.linear", 2 * H, H, style="peft")  # diffusers [scale, shift] → BFL [shift, scale]
    lora |= t; exp.add("final_layer.adaLN_modulation.1.weight", torch.cat([d[H:], d[:H]]))
    t, d = lora_pair("lora_transformer_single_transformer_blocks_0_attn_to_k", H, H)  # kohya, diffusers names
    lora |= t; exp.add("single_blocks.0.linear1.weight", d, rows=(H, 2 * H))
    merger = merger_for(base, [(save(tmp_path, lora), 1.0)])
    exp.check(merger)


def test_t5_text_encoder_loras_kohya_and_diffusers(tmp_path):
    base = t5_base()
    exp, lora = Expected(base), {}
    t, d = lora_pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 64, 64, alpha=1)
    lora |= t; exp.add("encoder.block.0.layer.0.SelfAttention.q.weight", d)
    t, d = lora_pair("text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wo", 64, 128, style="peft")
    lora |= t; exp.add("encoder.block.1.layer.1.DenseReluDense.wo.weight", d)
    exp.check(merger_for(base, [(save(tmp_path, lora), 1.0)]))


def test_several_loras_scale_and_dampening(tmp_path):
    base = flux_base()
    paths, deltas = [], []
    for i in range(3):
        t, d = lora_pair("lora_unet_double_blocks_0_img_attn_proj", H, H, alpha=R)
        paths.append(save(tmp_path, t, f"l{i}.safetensors"))
        deltas.append(d)
    for dampen, scale in [(True, 1.0), (False, 0.5)]:
        loras = lora_scales(None, tuple(paths), scale, dampen)
        assert [s for _, s in loras] == ([1.0, 0.9, 0.81] if dampen else [0.5, 0.5, 0.5])
        exp = Expected(base)
        for (_, s), d in zip(loras, deltas):
            exp.add("double_blocks.0.img_attn.proj.weight", d, scale=s)
        exp.check(merger_for(base, loras))
    assert lora_scales(paths[0], (), 0.7, True) == [(paths[0], 0.7)]


@pytest.mark.parametrize("case,message", [
    ("unmatched", "match no weight of the model (e.g. lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    ("shape", "gives a delta of shape [256, 256] but double_blocks.0.img_attn.qkv.weight has shape [768, 256]"),
    ("nan", "has NaN/Inf values"),
    ("dora", "DoRA"),
    ("incomplete", "lacks ['lora_up.weight']"),
    ("not_lora", "is not a LoRA key"),
    ("pickle", "refused"),
])
def test_bad_loras_are_refused_with_a_message(tmp_path, case, message):
    base = flux_base()
    t, _ = lora_pair("lora_unet_double_blocks_0_img_attn_proj", H, H)
    if case == "unmatched":
        t |= lora_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 32, 32)[0]
    elif case == "shape":
        t = lora_pair("lora_unet_double_blocks_0_img_attn_qkv", H, H)[0]
    elif case == "nan":
        t["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"][0, 0] = float("nan")
    elif case == "dora":
        t["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, H)
    elif case == "incomplete":
        del t["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"]
    elif case == "not_lora":
        t["some.random.weight"] = torch.ones(3)
    path = save(tmp_path, t)
    if case == "pickle":
        path = str(tmp_path / "lora.ckpt")
        with open(path, "wb") as f:
            f.write(b"\x80\x04\x95 not really a pickle")
    with pytest.raises(QuantError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        merger_for(base, [(path, 1.0)])


def test_unmatched_allowed_and_mapping_override(tmp_path):
    base = flux_base()
    t, d = lora_pair("my_custom_name", H, H)
    path = save(tmp_path, t)
    with pytest.raises(QuantError, match="detected style: plain"):
        merger_for(base, [(path, 1.0)])
    merger = merger_for(base, [(path, 1.0)], max_unmatched=1)
    assert merger.report.unmatched and not merger.pending
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"my_custom_name": {"weight": "single_blocks.0.linear1.weight", "rows": [256, 512]}}))
    exp = Expected(base)
    exp.add("single_blocks.0.linear1.weight", d, rows=(256, 512))
    exp.check(merger_for(base, [(path, 1.0)], mapping=str(mapping)))
    mapping.write_text(json.dumps({"my_custom_name": "nope.weight"}))
    with pytest.raises(QuantError, match="is not a weight of the model"):
        merger_for(base, [(path, 1.0)], mapping=str(mapping))


def test_cli_merges_then_quantizes_and_verifies(tmp_path, cli):
    base = flux_base()
    src = save(tmp_path, base, "base.safetensors")
    t, d = lora_pair("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, alpha=R)
    t = {k: v * 20 for k, v in t.items() if not k.endswith("alpha")} | {k: v for k, v in t.items() if k.endswith("alpha")}
    lora = save(tmp_path, t)
    out = str(tmp_path / "merged_int8.safetensors")
    code, stdout, err = cli("-i", src, "-o", out, "--merge-lora", lora, "--merge-lora-scale", "0.5", "--verify", "full")
    assert code == 0, err
    assert "LoRA: 1 modules merged into 1 weights (1 kohya)" in stdout and "verify OK" in stdout
    from quant_core.dequantize import load_dequantized
    rebuilt = load_dequantized(out, {k: tuple(v.shape) for k, v in base.items()})
    key = "double_blocks.0.img_attn.qkv.weight"
    up, down = t[key.replace(".weight", "") .replace("double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv") + ".lora_up.weight"], \
        t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    merged = base[key] + 0.5 * (up @ down)
    assert float((rebuilt[key] - merged).norm() / merged.norm()) < 0.02  # the quantized weight is the merged one
    assert float((rebuilt[key] - base[key]).norm() / base[key].norm()) > 0.1
    # unmatched modules stop the run before anything is written
    bad = save(tmp_path, lora_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 32, 32)[0], "bad.safetensors")
    code, _, err = cli("-i", src, "-o", str(tmp_path / "x.safetensors"), "--merge-loras", lora, bad)
    assert code == 2 and "match no weight" in err and not os.path.exists(tmp_path / "x.safetensors")
    result = quant_core.quantize(input=src, output=str(tmp_path / "api.safetensors"), loras=((lora, 1.0), (bad, 0.9)),
                                 lora_max_unmatched=1, format="fp8", verify="full")
    assert result.verify.ok and result.lora.unmatched


def test_ambiguous_kohya_name_is_not_guessed(tmp_path):
    base = {"blocks.a_b.weight": rnd(16, 16), "blocks.a.b.weight": rnd(16, 16)}
    path = save(tmp_path, lora_pair("lora_unet_blocks_a_b", 16, 16)[0])
    with pytest.raises(QuantError, match="match no weight"):
        merger_for(base, [(path, 1.0)])
    dotted = save(tmp_path, lora_pair("diffusion_model.blocks.a_b", 16, 16, style="peft")[0], "dotted.safetensors")
    assert set(merger_for(base, [(dotted, 1.0)]).pending) == {"blocks.a_b.weight"}
