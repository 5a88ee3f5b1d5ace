"""Every format against comfy-kitchen's own reference code: bytes where the layout is fixed, values elsewhere."""
import pytest
import torch
from comfy_kitchen import float_utils
from comfy_kitchen.backends.eager import quantization as ck_eager
from comfy_kitchen.backends.eager.convrot_w4a4 import _build_hadamard, _rotate_weight
from comfy_kitchen.tensor import TensorCoreFP8Layout, TensorWiseINT8Layout

from quant_core.quantization.formats import make_format
from quant_core.quantization.formats.base import divide_by_scale
from quant_core.quantization.formats.blocked import from_blocked, to_blocked
from quant_core.quantization.formats.int8 import hadamard, rotate
from quant_core.quantization.formats.nvfp4 import E2M1_VALUES, e2m1_codes

SHAPES = [(128, 256), (100, 200), (33, 48), (3072 // 8, 12288 // 16), (1, 16), (17, 1), (64, 256)]


def rtn(fmt, weight):
    grid = fmt.grid(weight.float())
    codes = fmt.round(divide_by_scale(grid.work, grid.scale))
    return grid, codes, fmt.pack(codes, grid)


def tricky_weight(shape, dtype, seed=0):
    """Gaussian weights with outliers, an all-zero block, exact E2M1 ties and tiny negatives."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[0, : min(16, shape[1])] = 0
    if shape[0] > 2 and shape[1] >= 16:
        w[1, :16] = torch.tensor([6, 0.25, -0.75, 1.25, -1.75, 2.5, -3.5, 5, -0.01, 0.74, 4.9, -6, 1, 2, 3, 4.0])
        w[2, 3] = 40.0  # outlier
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_bytes_equal_comfy_kitchen(shape, dtype):
    w = tricky_weight(shape, dtype)
    grid, _, ours = rtn(make_format("nvfp4"), w)
    ref_q, ref_scales = ck_eager.quantize_nvfp4(w, grid.extra["global"], pad_16x=True)
    assert torch.equal(ours["weight"], ref_q)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), ref_scales.view(torch.uint8))
    assert ours["weight_scale"].dtype == torch.float8_e4m3fn
    assert ours["weight_scale_2"].numel() == 1 and ours["weight_scale_2"].dtype == torch.float32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp8_bytes_equal_comfy_kitchen(shape, dtype):
    w = tricky_weight(shape, dtype)
    _, _, ours = rtn(make_format("mxfp8"), w)
    ref_q, ref_scales = ck_eager.quantize_mxfp8(w, pad_32x=True)
    assert torch.equal(ours["weight"].view(torch.uint8), ref_q.view(torch.uint8))
    assert ours["weight_scale"].dtype == torch.uint8
    assert torch.equal(ours["weight_scale"], ref_scales.view(torch.uint8))


def test_e2m1_rounding_is_nearest_even_on_every_midpoint():
    mids = (E2M1_VALUES[:-1] + E2M1_VALUES[1:]) / 2
    codes = e2m1_codes(mids)
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6]  # ties go to the even code
    assert e2m1_codes(torch.tensor([-0.1, -6.0, 0.0])).tolist() == [8, 15, 0]  # sign bit kept on -0


def test_swizzle_matches_comfy_kitchen_and_the_formula():
    for rows, cols in [(128, 4), (130, 7), (5, 3), (256, 16)]:
        s = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
        ours = to_blocked(s)
        assert torch.equal(ours, float_utils.to_blocked(s, flatten=False))
        assert torch.equal(from_blocked(ours, rows, cols), s)
        flat = ours.reshape(-1)
        c4 = (cols + 3) // 4
        for r, c in [(0, 0), (rows - 1, cols - 1), (rows // 2, cols // 2)]:
            offset = ((r // 128) * c4 + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
            assert flat[offset] == s[r, c]


@pytest.mark.parametrize("per_row", [True, False])
def test_int8_dequantizes_identically_through_comfy_kitchen(per_row):
    w = tricky_weight((96, 160), torch.float32)
    fmt = make_format("int8", "row" if per_row else "tensor")
    _, codes, t = rtn(fmt, w)
    assert t["weight"].dtype == torch.int8 and t["weight"].abs().max() <= 127
    assert t["weight_scale"].shape == ((96, 1) if per_row else ())
    params = TensorWiseINT8Layout.Params(scale=t["weight_scale"], orig_dtype=torch.float32, orig_shape=(96, 160))
    assert torch.allclose(TensorWiseINT8Layout.dequantize(t["weight"], params), fmt.dequantize(t, (96, 160)))
    # per-row codes equal comfy-kitchen's own row-wise quantizer on fp32 input
    if per_row:
        ref_q, ref_s = ck_eager.quantize_int8_rowwise(w)
        assert torch.equal(ref_q, t["weight"]) and torch.allclose(ref_s, t["weight_scale"])


@pytest.mark.parametrize("group", [4, 16, 64, 256])
def test_convrot_matches_comfy_kitchen_rotation_and_quantizer(group):
    w = tricky_weight((64, 512), torch.float32)
    assert torch.allclose(hadamard(group), _build_hadamard(group))
    assert torch.allclose(rotate(w, group), _rotate_weight(w, _build_hadamard(group), group), atol=1e-5)
    fmt = make_format("int8", "row", convrot_group=group)
    _, _, t = rtn(fmt, w)
    ref_q, _ = ck_eager.quantize_int8_convrot_weight(w, group)
    assert (ref_q.int() - t["weight"].int()).abs().max() <= 1  # fp32 matmul order may flip a rounding tie
    params = TensorWiseINT8Layout.Params(scale=t["weight_scale"], orig_dtype=torch.float32, orig_shape=(64, 512),
                                         convrot=True, convrot_groupsize=group)
    ck_dq = TensorWiseINT8Layout.dequantize(t["weight"], params)
    assert torch.allclose(ck_dq, fmt.dequantize(t, (64, 512)), atol=1e-5)
    assert (ck_dq - w).norm() / w.norm() < 0.02
    assert fmt.marker() == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}


def test_convrot_spreads_outliers():
    w = torch.randn(64, 256) * 0.02
    w[:, 7] = 3.0  # one outlier input channel ruins per-row INT8
    plain = make_format("int8", "row")
    rot = make_format("int8", "row", convrot_group=256)
    errors = []
    for fmt in (plain, rot):
        grid, codes, t = rtn(fmt, w)
        errors.append(float((fmt.dequantize(t, w.shape) - w).norm() / w.norm()))
    assert errors[1] < errors[0] / 2


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_codes_equal_comfy_kitchen(name):
    w = tricky_weight((64, 96), torch.float32)
    fmt = make_format("fp8" if name == "float8_e4m3fn" else "fp8_e5m2")
    grid, _, t = rtn(fmt, w)
    ref = ck_eager.quantize_per_tensor_fp8(w, grid.scale, fmt.dtype)
    assert torch.equal(ref.view(torch.uint8), t["weight"].view(torch.uint8))
    assert t["weight_scale"].numel() == 1
    params = TensorCoreFP8Layout.Params(scale=t["weight_scale"], orig_dtype=torch.float32, orig_shape=(64, 96))
    assert torch.allclose(TensorCoreFP8Layout.dequantize(t["weight"], params), fmt.dequantize(t, (64, 96)))


FAMILIES = [("int8", "row"), ("int8", "tensor"), ("int4", None), ("fp8", "tensor"), ("fp8_e5m2", "tensor"),
            ("nvfp4", None), ("mxfp8", None), ("int8", "block"), ("fp8", "row"), ("fp8", "block")]
ROTATION = {"int4": 64}  # int4 is always rotated: a group that divides the test shapes' K
# typical ‖W−Ŵ‖/‖W‖ for Gaussian weights: a wrong scale or layout is far outside these
EXPECTED_REL_ERROR = {"int8_tensorwise": 0.012, "convrot_w4a4": 0.17, "float8_e4m3fn": 0.04, "float8_e5m2": 0.08, "nvfp4": 0.13,
                      "mxfp8": 0.04, "int8_blockwise": 0.012, "float8_e4m3fn_rowwise": 0.04,
                      "float8_e4m3fn_blockwise": 0.04}


@pytest.mark.parametrize("family,scaling", FAMILIES)
def test_pack_dequantize_matches_reconstruct_and_layout(family, scaling):
    fmt = make_format(family, scaling, block_size=64, convrot_group=ROTATION.get(family, 0))
    w = torch.randn(128, 192)
    grid, codes, t = rtn(fmt, w)
    dq = fmt.dequantize(t, (128, 192))
    assert torch.allclose(dq, fmt.reconstruct(codes, grid), atol=1e-6)
    assert float((dq - w).norm() / w.norm()) < EXPECTED_REL_ERROR[fmt.name]
    from quant_core.io.dtypes import tag_of
    assert [(k, tag_of(v.dtype), tuple(v.shape)) for k, v in t.items()] == fmt.layout((128, 192))


def test_all_zero_weight_is_finite_in_every_format():
    for family, scaling in FAMILIES:
        fmt = make_format(family, scaling, block_size=32, convrot_group=ROTATION.get(family, 0))
        _, _, t = rtn(fmt, torch.zeros(64, 64))
        assert torch.all(fmt.dequantize(t, (64, 64)) == 0), fmt.name


def test_bad_format_choices_raise_clear_errors():
    with pytest.raises(ValueError, match="fixed per-block"):
        make_format("nvfp4", "row")
    with pytest.raises(ValueError, match="no 'row' scaling"):
        make_format("fp8_e5m2", "row")
    with pytest.raises(ValueError, match="power of 4"):
        make_format("int8", "row", convrot_group=8)
    with pytest.raises(ValueError, match="ConvRot applies"):
        make_format("fp8", "tensor", convrot_group=16)
