"""Every conversion flag does something: it changes the output file, the report or what the run prints, or it is
refused, or it prints its notice. The walk covers the parser's own list of flags, so a flag added without a case here
fails the test; README's flags table is the one the parser generates."""
import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from quant_core.calib.file import save_calibration
from quant_core.calib.stats import InputStats
from quant_core.cli import main
from quant_core.cli.parser import build_convert_parser, flags_table
from quant_core.select.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = 64
LINEARS = {"layers.0.self_attn.q_proj": (H, H), "layers.0.self_attn.k_proj": (H, H),
           "layers.0.self_attn.v_proj": (H, H), "layers.0.self_attn.o_proj": (H, H),
           "layers.0.mlp.up_proj": (4 * H, H), "layers.0.mlp.down_proj": (H, 4 * H),
           "img_in": (H, H), "layers.0.narrow": (H, 8)}


def _model(nonfinite: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {f"{name}.weight": (torch.randn(*shape, generator=g) / shape[1] ** 0.5).bfloat16()
          for name, shape in LINEARS.items()}
    sd["layers.0.mlp.up_proj.bias"] = (torch.randn(4 * H, generator=g) * 0.1).bfloat16()
    sd["layers.0.input_layernorm.weight"] = torch.ones(H).bfloat16()
    sd["embed_tokens.weight"] = torch.randn(100, H, generator=g).bfloat16()
    for i, preset in enumerate(PRESETS.values()):  # a layer each preset acts on
        pattern = (preset.keep or preset.remove or ("zz_not_only",))[0]
        sd[f"p{i}_{pattern}_x.weight"] = torch.randn(H, H, generator=g).bfloat16()
    if nonfinite:
        sd["layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    paths = {"model": str(d / "m.safetensors"), "nan": str(d / "nan.safetensors"), "calib": str(d / "c.safetensors"),
             "lora": str(d / "l.safetensors"), "rules": str(d / "rules.json"), "mapping": str(d / "map.json"),
             "dir": str(d)}
    save_file(_model(), paths["model"])
    save_file(_model(nonfinite=True), paths["nan"])
    g = torch.Generator().manual_seed(1)
    stats = {}
    for name, (n, k) in LINEARS.items():
        x = torch.randn(256, k, generator=g) * torch.linspace(0.1, 4.0, k) + 0.5
        stats[name] = InputStats(x.abs().amax(0), (x * x).mean(0), 256, x.T @ x / 256, x.mean(0),
                                 input_scale=x.abs().max().reshape(()) / 448)
    save_calibration(paths["calib"], stats, "test")
    lora = {"lora_unet_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, H, generator=g),
            "lora_unet_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(H, 4, generator=g) * 0.1}
    save_file(lora, paths["lora"])
    with open(paths["rules"], "w") as f:
        json.dump({"rules": [{"match": "mlp", "format": "fp8"}]}, f)
    with open(paths["mapping"], "w") as f:
        json.dump({"lora_unet_layers_0_self_attn_q_proj": "layers.0.self_attn.k_proj.weight"}, f)
    return paths


CAL, GPTQ, QUIP, LEARN = ["--calibration-data", "{calib}"], ["--optimizer", "gptq"], ["--optimizer", "quip"], \
    ["--optimizer", "adamw", "--num_iter", "3", "--exclude-layers", r"^(?!layers\.0\.mlp\.up_proj$)"]
# flag -> (argv that uses it, context it needs). Context-free flags must change something alone; flags with a
# context must change something against the context alone, and must be refused without it.
CASES = {
    "--scaling_mode": (["--scaling_mode", "tensor"], []), "--block_size": (["--block_size", "32"], ["--scaling_mode", "block"]),
    "--convrot": (["--convrot", "--convrot-group-size", "16"], []),
    "--convrot-group-size": (["--convrot-group-size", "64"], ["--convrot"]),
    "--int4-linear-dtype": (["--int4-linear-dtype", "int8"], ["--int4", "--convrot-group-size", "64"]),
    "--full_precision_matrix_mult": (["-fpmm"], []), "--allow-nonfinite": (["--allow-nonfinite"], ["-i", "{nan}"]),
    "--exclude-layers": (["--exclude-layers", "mlp"], []), "--layer-config": (["--layer-config", "{rules}"], []),
    "--heur": (["--heur"], []), "--quantize-embeddings": (["--quantize-embeddings"], []),
    "--quantize-io-layers": (["--quantize-io-layers"], []), "--calibration-data": (CAL, []),
    "--calibration-lora": (["--calibration-lora", "{lora}"], GPTQ),
    "--bias-correction": (["--no-bias-correction"], CAL), "--static-activations": (["--static-activations"], CAL + ["--fp8"]),
    "--smoothquant": (["--smoothquant"], CAL), "--smoothquant-alpha": (["--smoothquant-alpha", "0.8"], CAL + ["--smoothquant"]),
    "--lora-mapping": (["--lora-mapping", "{mapping}"], ["--merge-lora", "{lora}"]),
    "--lora-max-unmatched": (["--lora-max-unmatched", "1"], ["--merge-lora", "{lora}", "--lora-mapping", "{mapping}"]),
    "--device": (["--device", "cuda:7"], []), "--low-memory": (["--low-memory"], []),
    "--streaming-mode": (["--streaming-mode", "off"], ["--device", "cuda"]),
    "--cpu-threshold": (["--cpu-threshold", "5"], ["--device", "cuda"]),
    "--no-memory-limits": (["--no-memory-limits"], ["--device", "cuda"]),
    "--verify": (["--verify", "off"], []), "--report-quality": (["--report-quality"], []),
    "--quality-threshold": (["--quality-threshold", "99"], []), "--report": (["--report", "{dir}/r.json"], []),
    "--runtime-gpu": (["--runtime-gpu", "hopper"], ["--int4", "--convrot-group-size", "64"]),
    "--overwrite": (["--overwrite"], []), "--no-progress": (["--no-progress"], []),
    "--auto-bits": (["--auto-bits", "10"], []), "--auto-size-gb": (["--auto-size-gb", "0.001"], []),
    "--target-gpu": (["--target-gpu", "blackwell"], ["--auto-bits", "10"]),
    "--gptq-damp": (["--gptq-damp", "0.9"], GPTQ + CAL), "--gptq-block-size": (["--gptq-block-size", "8"], GPTQ + CAL),
    "--scale-search": (["--no-scale-search"], GPTQ + CAL), "--gptq-actorder": (["--no-gptq-actorder"], GPTQ + CAL),
    "--quip-seed": (["--quip-seed", "3"], QUIP + CAL), "--quip-hadamard": (["--no-quip-hadamard"], QUIP + CAL),
    "--quip-actorder": (["--no-quip-actorder"], QUIP + CAL),
    "--quip-store-transformed": (["--quip-store-transformed", "--convrot-group-size", "16"], QUIP + CAL),
    "--quip-checkpointed": (["--quip-checkpointed", "--quip-checkpoint-threshold", "1"], QUIP + CAL),
    "--quip-checkpoint-threshold": (["--quip-checkpoint-threshold", "100000"], QUIP + CAL + ["--quip-checkpointed", "--gptq-block-size", "8"]),
    "--quip-checkpoint-segments": (["--quip-checkpoint-segments", "2"], QUIP + CAL + ["--quip-checkpointed"]),
    "--format": (["--format", "nvfp4"], []), "--optimizer": (GPTQ, CAL), "--simple": (["--simple"], []),
    "--merge-lora": (["--merge-lora", "{lora}"], []), "--merge-loras": (["--merge-loras", "{lora}", "{lora}"], []),
    "--merge-lora-scale": (["--merge-lora-scale", "0.5"], ["--merge-lora", "{lora}"]),
    "--merge-lora-dampen": (["--no-merge-lora-dampen"], ["--merge-loras", "{lora}", "{lora}"]),
    "--comfy_quant": (["--comfy_quant"], []), "--save-quant-metadata": (["--save-quant-metadata"], []),
    "--num_iter": (["--num_iter", "5"], LEARN), "--lr": (["--lr", "0.5"], LEARN),
    "--lr_schedule": (["--lr_schedule", "exponential"], LEARN),
    "--lr_gamma": (["--lr_gamma", "0.5"], LEARN + ["--lr_schedule", "exponential"]),
    "--lr_patience": (["--lr_patience", "0"], LEARN + ["--lr_schedule", "plateau"]),
    "--lr_factor": (["--lr_factor", "0.1"], LEARN + ["--lr_schedule", "plateau", "--lr_patience", "0"]),
    "--lr_min": (["--lr_min", "0.3"], LEARN + ["--lr_schedule", "exponential", "--lr_gamma", "0.1"]),
    "--lr_cooldown": (["--lr_cooldown", "0"], LEARN + ["--lr_schedule", "plateau", "--lr_patience", "0"]),
    "--lr_threshold": (["--lr_threshold", "0.9"], LEARN), "--lr_adaptive_mode": (["--lr_adaptive_mode", "no-reset"], LEARN),
    "--lr-shape-influence": (["--lr-shape-influence", "0"], LEARN + ["--lr_schedule", "plateau", "--lr_patience", "0"]),
    "--lr-threshold-mode": (["--lr-threshold-mode", "abs"], LEARN + ["--lr_threshold", "0.01"]),
    "--early-stop-loss": (["--early-stop-loss", "1e9"], LEARN), "--early-stop-lr": (["--early-stop-lr", "1e9"], LEARN),
    "--early-stop-stall": (["--early-stop-stall", "0"], LEARN), "--top_p": (["--top_p", "1.0"], LEARN),
    "--min_k": (["--min_k", "1", "--max_k", "1"], LEARN), "--max_k": (["--max_k", "2"], LEARN),
    "--full_matrix": (["--full_matrix", "--top_p", "0.05", "--min_k", "1"], LEARN),
    "--bf16-compute": (["--bf16-compute", "on"], LEARN),
    "--bf16-threshold": (["--bf16-threshold", "0"], LEARN + ["--device", "cuda"]),
}
CASES.update({f"--{p}": ([f"--{p}"], []) for p in PRESETS})
# Flags that act only on a CUDA device: refused with --device cpu; their effect is checked where CUDA exists.
CUDA_ONLY = {"--streaming-mode", "--cpu-threshold", "--no-memory-limits", "--bf16-threshold"}
NOT_AVAILABLE = ["--actcal", "--stream-hessian-threshold", "--stream-ldlq-threshold", "--stream-ortho-threshold",
                 "--bf16-hadamard-threshold", "--bf16-hessian-threshold"]
SHORTHANDS = {"--int8": ["--fp8"], "--int4": [], "--fp8": [], "--nvfp4": [], "--mxfp8": [], "--fp16": []}


def _run(files, argv, capsys, tag, keep=False):
    out = os.path.join(files["dir"], f"out_{tag}.safetensors")
    argv = [a.format(**files) for a in argv]
    if "-i" not in argv:
        argv = ["-i", files["model"], *argv]
    if os.path.exists(out) and not keep:
        os.remove(out)
    report = os.path.join(files["dir"], "r.json")
    if os.path.exists(report):
        os.remove(report)
    code = main([*argv, "-o", out])
    captured = capsys.readouterr()
    digest = hashlib.sha256(open(out, "rb").read()).hexdigest() if code == 0 and os.path.exists(out) else None
    if os.path.exists(report):
        digest = (digest, re.sub(r'"seconds": [0-9.e+-]+', "", open(report).read()))
    text = re.sub(r"[0-9.]+ (s|MB|GB/s)\b|\d+it/s|[0-9.]+s/it|\d\d:\d\d", "", captured.out + captured.err)
    return code, digest, text.replace(out, "OUT")


def _flags_of_parser():
    parser = build_convert_parser("x", "", "", "")
    return {a.option_strings[0] if not a.option_strings[0].startswith("--") or len(a.option_strings) == 1
            else next(f for f in a.option_strings if f.startswith("--")): a
            for a in parser._actions if a.option_strings and a.dest not in ("help", "input", "output")}


def test_every_flag_has_a_case():
    names = set(_flags_of_parser())
    covered = set(CASES) | set(NOT_AVAILABLE) | set(SHORTHANDS)
    missing = sorted(n for n in names if n not in covered and not {"-fpmm", "-lm"} & {n})
    assert not missing, f"flags without a case in tests/test_flags.py: {missing}"


@pytest.mark.parametrize("flag", sorted(CASES))
def test_flag_changes_something_or_is_refused(flag, files, capsys):
    used, context = CASES[flag]
    if flag in CUDA_ONLY:
        cpu_context = [a for a in context if a not in ("--device", "cuda")] + ["--device", "cpu"]
        code, _, text = _run(files, cpu_context + used, capsys, "cpu")
        assert code == 2 and "applies to a CUDA device" in text, text
        if not torch.cuda.is_available():
            return
    baseline = _run(files, context, capsys, "base")
    if flag == "--overwrite":  # an existing output: refused without, replaced with
        _run(files, context, capsys, "ow")
        without = _run(files, ["--quality-threshold", "1"], capsys, "ow", keep=True)
        with_flag = _run(files, used + ["--quality-threshold", "1"], capsys, "ow", keep=True)
        assert without[0] == 2 and with_flag[0] == 0
        return
    result = _run(files, context + used, capsys, "flag")
    assert result != baseline, f"{flag} changed nothing (exit {result[0]})"
    if context:  # without what it needs, the flag is refused with one line
        alone = _run(files, used, capsys, "alone")
        assert alone[0] == 2 or alone != _run(files, [], capsys, "plain"), f"{flag} is accepted without {context}"


@pytest.mark.parametrize("flag", NOT_AVAILABLE)
def test_unavailable_flags_are_refused(flag, files, capsys):
    code, _, text = _run(files, [flag] + ([] if flag == "--actcal" else ["1"]), capsys, "na")
    assert code == 2 and "not available in this version" in text


def test_format_shorthands_and_conflicts(files, capsys):
    assert _run(files, ["--fp8"], capsys, "a")[1] != _run(files, ["--int8"], capsys, "b")[1]
    int4 = _run(files, ["--int4", "--convrot-group-size", "64"], capsys, "d")
    assert int4[0] == 0 and int4[1] != _run(files, ["--int8"], capsys, "b")[1]
    assert _run(files, ["--format", "convrot_w4a4", "--convrot-group-size", "64"], capsys, "d")[1] == int4[1]
    code, _, text = _run(files, ["--fp8", "--nvfp4"], capsys, "c")
    assert code == 2 and "give one format" in text


def test_readme_flags_table_is_the_generated_one():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("<!-- flags-table -->")[1].split("<!-- /flags-table -->")[0].strip()
    assert block == flags_table(), "README's flags table is stale: paste quant_core.cli.parser.flags_table()"
