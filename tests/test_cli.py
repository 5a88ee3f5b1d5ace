"""The CLI end to end: every format verified against the source, names, flags, the API, and bad input
(one-line message naming the file or layer, exit code != 0, no output file)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quant_core
from quant_core.errors import QuantError
from quant_core.verify import verify_file

UPSTREAM_RUNS = [
    (["--int8"], "int8_tensorwise", "_simple_int8_row"),
    (["--int8", "--scaling_mode", "tensor"], "int8_tensorwise", "_simple_int8_tensor"),
    (["--int8", "--scaling_mode", "axis"], "int8_tensorwise", "_simple_int8_row"),
    (["--convrot", "--convrot-group-size", "64"], "int8_tensorwise", "_simple_int8_convrot64"),
    (["--fp8"], "float8_e4m3fn", "_simple_fp8"),
    (["--format", "fp8_e5m2"], "float8_e5m2", "_simple_fp8_e5m2"),
    (["--nvfp4"], "nvfp4", "_simple_nvfp4"),
    (["--mxfp8"], "mxfp8", "_simple_mxfp8"),
    (["--int4"], "convrot_w4a4", "_simple_int4"),
]


@pytest.mark.parametrize("flags,format_name,suffix", UPSTREAM_RUNS)
def test_every_upstream_format_converts_and_verifies(cli, flux_file, flags, format_name, suffix):
    code, out, err = cli("-i", flux_file, *flags, "--verify", "full", "--report-quality")
    assert code == 0, err
    output = flux_file.replace(".safetensors", f"{suffix}.safetensors")
    assert os.path.exists(output) and f"wrote {output}" in out
    assert "verify OK" in out and "WARNING" not in err
    result = verify_file(output, reference=flux_file)
    assert result.ok, result.defects
    assert {l.format for l in result.layers} == {format_name}
    with safe_open(output, "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
        assert meta["format_version"] == "1.0"
        for layer, conf in meta["layers"].items():
            marker = json.loads(f.get_tensor(f"{layer}.comfy_quant").numpy().tobytes())
            assert marker == conf and conf["format"] == format_name and conf["orig_dtype"] == "bfloat16"
        assert f.metadata()["modelspec.title"] == "tiny flux"  # input metadata preserved
        # biases and norms untouched; io layers kept by default
        assert f.get_tensor("img_in.weight").dtype == torch.bfloat16
        assert "img_in.comfy_quant" not in f.keys()


def test_default_is_int8_per_row(cli, flux_file, tmp_path):
    out = tmp_path / "o.safetensors"
    assert cli("-i", flux_file, "-o", out)[0] == 0
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("double_blocks.0.img_attn.qkv.weight_scale").shape == (768, 1)
        assert f.get_tensor("double_blocks.0.img_attn.qkv.weight").dtype == torch.int8


def test_legacy_modes_warn_once_and_verify_marks_them(cli, flux_file):
    code, out, err = cli("-i", flux_file, "--int8", "--scaling_mode", "block", "--block_size", "64")
    assert code == 0
    assert err.count("NOT loadable by upstream ComfyUI") == 1
    output = flux_file.replace(".safetensors", "_simple_int8_block64.safetensors")
    code, out, _ = cli("verify", output)
    assert code == 1 and "DEFECT" in out and "int8_blockwise" in out
    code, out, _ = cli("verify", output, "--allow-legacy", "--reference", flux_file)
    assert code == 0 and "NOT UPSTREAM" in out


def test_fp16_conversion_has_no_markers(cli, flux_file, tmp_path):
    out = tmp_path / "half.safetensors"
    assert cli("-i", flux_file, "--fp16", "-o", out, "--verify", "full")[0] == 0
    with safe_open(str(out), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("comfy_quant")]
        assert "_quantization_metadata" not in f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_fpmm_and_report_json(cli, flux_file, tmp_path):
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    code, stdout, _ = cli("-i", flux_file, "-o", out, "-fpmm", "--report", report, "--quality-threshold", "60")
    assert code == 0
    data = json.loads(report.read_text())
    assert data["layers"] and all(l["sqnr_db"] < 60 for l in data["layers"])
    assert data["layers"][0]["sqnr_db"] <= data["layers"][-1]["sqnr_db"]  # worst first
    assert "below 60 dB" in data["summary"] and data["kept"]["img_in.weight"].startswith("model input/output")
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
        assert all(conf["full_precision_matrix_mult"] is True for conf in meta["layers"].values())


def test_layer_config_and_exclude_from_the_cli(cli, flux_file, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rules": [{"match": "single_blocks", "format": "fp8"}]}))
    out = tmp_path / "o.safetensors"
    code, stdout, _ = cli("-i", flux_file, "-o", out, "--layer-config", config, "--exclude-layers", "txt_mlp")
    assert code == 0
    result = verify_file(str(out), reference=flux_file)
    formats = {l.layer: l.format for l in result.layers}
    assert formats["single_blocks.0.linear1"] == "float8_e4m3fn"
    assert formats["double_blocks.0.img_attn.qkv"] == "int8_tensorwise"
    assert "double_blocks.0.txt_mlp.0" not in formats


def test_python_api(flux_file, tmp_path):
    result = quant_core.quantize(input=flux_file, output=str(tmp_path / "api.safetensors"), format="nvfp4",
                                 verify="full")
    assert result.verify.ok and result.verify.checked_reference
    assert result.report.layers and all(l.sqnr_db > 15 for l in result.report.layers)
    assert result.output_bytes < result.input_bytes / 2
    with pytest.raises(QuantError, match="unknown format"):
        quant_core.quantize(input=flux_file, format="int3")
    with pytest.raises(QuantError, match="unknown setting"):
        quant_core.quantize(input=flux_file, formatt="int8")


def test_not_yet_flags_are_refused_clearly(cli, flux_file):
    for flags in (["--actcal"], ["--bf16-hessian-threshold", "10"], ["--stream-ldlq-threshold", "5"]):
        code, out, err = cli("-i", flux_file, *flags)
        assert code == 2 and "not available in this version" in err and err.count("\n") == 1
    code, out, err = cli("-i", flux_file, "--num_iter", "5")  # a learned-rounding knob without --optimizer
    assert code == 2 and "applies to --optimizer original|adamw|radam" in err and err.count("\n") == 1
    assert not [p for p in os.listdir(os.path.dirname(flux_file)) if p != os.path.basename(flux_file)]


def test_method_flags_are_checked_in_one_line(cli, flux_file):
    cases = [(["--optimizer", "prodigy"], "invalid choice"),
             (["--num_iter", "5"], "--num_iter applies to --optimizer original|adamw|radam"),
             (["--optimizer", "gptq", "--lr", "0.1"], "--lr applies to --optimizer original|adamw|radam"),
             (["--optimizer", "adamw", "--simple"], "contradicts --optimizer adamw"),
             (["--smoothquant", "--calibration-data", flux_file, "--optimizer", "gptq"], "use one of the two"),
             (["--optimizer", "original", "--min_k", "9", "--max_k", "3"], "--min_k 9 is above --max_k 3"),
             (["--smoothquant"], "--smoothquant needs --calibration-data"),
             (["--calibration-data", "nope.safetensors"], "no such file"),
             (["--smoothquant-alpha", "1.5", "--calibration-data", flux_file], "between 0 and 1")]
    for flags, message in cases:
        code, out, err = cli("-i", flux_file, *flags)
        assert code == 2 and message in err and err.count("\n") == 1, (flags, err)
    assert not [p for p in os.listdir(os.path.dirname(flux_file)) if p != os.path.basename(flux_file)]


def bad_input_cases(tmp_path, flux_file):
    """(name, argv, expected message) for each kind of bad input the issue lists."""
    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    with open(flux_file, "rb") as f:
        good = f.read()
    nan = {"blocks.0.attn.qkv.weight": torch.full((32, 32), float("nan"))}
    nan_path = str(tmp_path / "nan.safetensors")
    save_file(nan, nan_path)
    only_norms = str(tmp_path / "norms.safetensors")
    save_file({"a.norm.weight": torch.ones(8), "b.bias": torch.ones(8)}, only_norms)
    empty = str(tmp_path / "empty_model.safetensors")
    save_file({}, empty)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o500)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{oops")
    return [
        ("not safetensors", ["-i", write("text.safetensors", b"just some text, not a model " * 20)], "not a safetensors file"),
        ("truncated", ["-i", write("trunc.safetensors", good[: len(good) // 2])], "truncated"),
        ("offsets lie", ["-i", write("lie.safetensors", good[:8] + good[8:].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1))], "needs"),
        ("pickle", ["-i", write("model.ckpt", b"\x80\x04\x95 fake pickle")], "refused"),
        ("pickle renamed", ["-i", write("model.pt", b"PK\x03\x04 zip")], "refused"),
        ("nan", ["-i", nan_path], "layer blocks.0.attn.qkv has 1024 NaN/Inf values"),
        ("no quantizable layer", ["-i", only_norms], "no quantizable layer"),
        ("empty model", ["-i", empty], "holds no tensors"),
        ("output equals input", ["-i", flux_file, "-o", flux_file], "output path equals the input"),
        ("missing output dir", ["-i", flux_file, "-o", str(tmp_path / "nope" / "o.safetensors")], "does not exist"),
        ("unwritable output dir", ["-i", flux_file, "-o", str(readonly / "o.safetensors")], "not writable"),
        ("unknown preset", ["-i", flux_file, "--layer-config", str(tmp_path / "missing.json")], "cannot read layer config"),
        ("bad regex", ["-i", flux_file, "--exclude-layers", "a(b"], "bad regular expression"),
        ("malformed layer config", ["-i", flux_file, "--layer-config", str(bad_json)], "malformed layer config JSON"),
        ("bad convrot group", ["-i", flux_file, "--convrot", "--convrot-group-size", "32"], "power of 4"),
        ("nvfp4 row", ["-i", flux_file, "--nvfp4", "--scaling_mode", "row"], "fixed per-block"),
        ("missing input", ["-i", str(tmp_path / "missing.safetensors")], "cannot read"),
    ]


def test_bad_input_one_line_error_no_output(cli, flux_file, tmp_path):
    if os.geteuid() == 0:
        pass  # root ignores directory permissions: the unwritable case is checked with os.access below anyway
    for name, argv, message in bad_input_cases(tmp_path, flux_file):
        before = set(os.listdir(tmp_path))
        if name == "unwritable output dir" and os.access(str(tmp_path / "ro"), os.W_OK):
            continue  # running as root: the directory is writable after all
        code, out, err = cli(*argv)
        assert code == 2, (name, code, out, err)
        assert message in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert set(os.listdir(tmp_path)) == before, (name, set(os.listdir(tmp_path)) - before)


def test_allow_nonfinite_keeps_the_layer(cli, tmp_path):
    path = str(tmp_path / "m.safetensors")
    weights = {"a.weight": torch.randn(32, 32), "b.weight": torch.randn(32, 32)}
    weights["b.weight"][3, 3] = float("inf")
    save_file(weights, path)
    code, out, err = cli("-i", path, "--allow-nonfinite", "-o", tmp_path / "o.safetensors", "--verify", "full")
    assert code == 0 and "kept b: 1 NaN/Inf values" in out
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert "b.comfy_quant" not in f.keys() and "a.comfy_quant" in f.keys()
        assert torch.equal(f.get_tensor("b.weight"), weights["b.weight"])
        assert "b" not in json.loads(f.metadata()["_quantization_metadata"])["layers"]


def test_existing_output_needs_overwrite(cli, flux_file, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    code, _, err = cli("-i", flux_file, "-o", out)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"precious"
    assert cli("-i", flux_file, "-o", out, "--overwrite")[0] == 0


def test_already_quantized_input_is_refused(cli, flux_file, tmp_path):
    out = tmp_path / "o.safetensors"
    assert cli("-i", flux_file, "-o", out)[0] == 0
    code, _, err = cli("-i", out, "-o", tmp_path / "twice.safetensors")
    assert code == 2 and "already quantized" in err


def test_help_is_grouped_by_stage(capsys):
    from quant_core.cli.convert import build_parser
    text = build_parser().format_help()
    for group in ("Format and method", "Which layers are quantized", "Where layers are computed", "GPTQ (--optimizer gptq)"):
        assert group in text
    for flag in ("--t5xxl", "--zimage_refiner", "--comfy_quant", "--save-quant-metadata", "--scaling_mode", "--low-memory"):
        assert flag in text


def test_device_and_verify_flags(cli, flux_file, tmp_path):
    import torch as _torch
    if not _torch.cuda.is_available():
        code, _, err = cli("-i", flux_file, "-o", tmp_path / "a.safetensors", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err
    code, _, err = cli("-i", flux_file, "-o", tmp_path / "b.safetensors", "--device", "tpu9")
    assert code == 2 and "unknown device" in err
    code, out, _ = cli("-i", flux_file, "-o", tmp_path / "c.safetensors", "--verify", "off", "--report-quality")
    assert code == 0 and "verify OK" not in out and "SQNR dB" in out and "double_blocks.0.img_attn.qkv" in out
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("a.", "b."))]


def test_lora_flags_on_the_cli(cli, flux_file, tmp_path):
    from safetensors import safe_open as _open
    g = torch.Generator().manual_seed(3)
    loras = []
    for i in range(2):
        path = str(tmp_path / f"l{i}.safetensors")
        save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 256, generator=g),
                   "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(256, 4, generator=g)}, path)
        loras.append(path)
    with open(tmp_path / "map.json", "w") as f:
        json.dump({"nothing_like_it": "double_blocks.0.img_attn.proj.weight"}, f)
    extra = str(tmp_path / "extra.safetensors")
    save_file({"nothing_like_it.lora_down.weight": torch.randn(4, 256, generator=g),
               "nothing_like_it.lora_up.weight": torch.randn(256, 4, generator=g)}, extra)
    outs = {}
    for name, flags in {"dampened": [], "plain": ["--no-merge-lora-dampen"]}.items():
        outs[name] = str(tmp_path / f"{name}.safetensors")
        code, out, err = cli("-i", flux_file, "-o", outs[name], "--fp8", "--merge-loras", *loras, *flags)
        assert code == 0 and "LoRA: 2 modules merged into 1 weights" in out, err
    with _open(outs["dampened"], "pt") as a, _open(outs["plain"], "pt") as b:
        key = "double_blocks.0.img_attn.proj.weight"
        assert not torch.equal(a.get_tensor(key).view(torch.uint8), b.get_tensor(key).view(torch.uint8))
    code, _, err = cli("-i", flux_file, "-o", tmp_path / "u.safetensors", "--merge-lora", extra)
    assert code == 2 and "nothing_like_it" in err
    code, out, _ = cli("-i", flux_file, "-o", tmp_path / "v.safetensors", "--merge-lora", extra, "--lora-max-unmatched", "1")
    assert code == 0 and "unmatched LoRA module: nothing_like_it" in out
    code, out, _ = cli("-i", flux_file, "-o", tmp_path / "w.safetensors", "--merge-lora", extra,
                       "--lora-mapping", tmp_path / "map.json")
    assert code == 0 and "LoRA: 1 modules merged into 1 weights" in out
