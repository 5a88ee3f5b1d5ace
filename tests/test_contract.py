"""Each format's on-disk contract (formats.CONTRACTS) is the one place its facts live: the format writes what its
contract accepts, verify checks files against it, and every rebuild (verify --reference, load_dequantized, the
benchmark) dequantizes through it. Also: layers whose names are prefixes of each other, deeply nested JSON."""
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from quant_core.cli import main as cli_main
from quant_core.dequantize import load_dequantized
from quant_core.quantization.formats import CONTRACTS, FAMILIES, LEGACY_NAMES, UPSTREAM_NAMES, make_format
from quant_core.quantization.formats.base import divide_by_scale
from quant_core.quantization.formats.markers import MAX_JSON_BYTES, marker_tensor
from quant_core.report import relative_error, sqnr_db, sqnr_from_rel_error
from quant_core.verify import verify_file

CHOICES = [(family, scaling) for family in FAMILIES for scaling in FAMILIES[family]]
SHAPES = [(128, 256), (100, 200), (33, 48), (64, 64)]


def rtn_pack(fmt, weight):
    grid = fmt.grid(weight)
    return fmt.pack(fmt.round(divide_by_scale(grid.work, grid.scale)), grid)


class Info:
    def __init__(self, tensor):
        from quant_core.io.dtypes import tag_of
        self.dtype, self.shape = tag_of(tensor.dtype), tuple(tensor.shape)


def test_every_format_written_has_a_contract_and_one_upstream_flag():
    names = set()
    for family, scaling in CHOICES:
        fmt = make_format(family, scaling, 32)
        assert fmt.contract is CONTRACTS[fmt.name]
        assert FAMILIES[family][scaling].upstream == fmt.upstream == fmt.contract.upstream
        names.add(fmt.name)
    assert names == set(CONTRACTS) == set(UPSTREAM_NAMES) | set(LEGACY_NAMES)
    assert not set(UPSTREAM_NAMES) & set(LEGACY_NAMES)


@pytest.mark.parametrize("family,scaling", CHOICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_what_a_format_writes_is_what_its_contract_accepts(family, scaling, shape):
    fmt = make_format(family, scaling, 32, 16 if (family, scaling) == ("int8", "row") else 0)
    if fmt.fit(shape) is not None:
        pytest.skip(f"{fmt.describe()} does not hold {shape}")
    weight = torch.randn(shape)
    packed = rtn_pack(fmt, weight)
    conf = dict(fmt.marker(), orig_dtype="float32")
    assert [(s, Info(t).dtype, Info(t).shape) for s, t in packed.items()] == fmt.layout(shape)
    assert fmt.contract.check({s: Info(t) for s, t in packed.items()}, conf) == []
    assert set(conf) <= set(fmt.contract.marker_fields)
    assert fmt.contract.stored_shape(*shape) == tuple(packed["weight"].shape)
    # the contract's rebuild (comfy-kitchen for upstream formats) agrees with the format's own inverse
    rebuilt = fmt.contract.dequantize(packed, conf, shape)
    assert rebuilt.shape == shape
    torch.testing.assert_close(rebuilt, fmt.dequantize(packed, shape), atol=1e-5, rtol=1e-5)
    assert relative_error(weight, rebuilt) < fmt.contract.typical


def test_contract_check_names_each_problem():
    contract = CONTRACTS["nvfp4"]
    fmt = make_format("nvfp4")
    packed = rtn_pack(fmt, torch.randn(64, 128))
    infos = {s: Info(t) for s, t in packed.items()}
    del infos["weight_scale_2"]
    infos["weight_scale"] = Info(packed["weight_scale"].view(torch.uint8))
    infos["junk"] = Info(torch.zeros(1))
    assert contract.check(infos, {"format": "nvfp4"}, "L") == [
        "weight_scale is U8, expected F8_E4M3", "missing weight_scale_2",
        "unexpected tensor L.junk (ComfyUI reports it as an unexpected key)"]


def test_sqnr_is_one_formula():
    assert sqnr_from_rel_error(0.1) == pytest.approx(20.0)
    assert sqnr_from_rel_error(0.0) == math.inf
    assert sqnr_from_rel_error(math.inf) == -math.inf
    assert math.isnan(sqnr_from_rel_error(math.nan))
    assert sqnr_db(4.0, 0.04) == pytest.approx(20.0)
    assert quant_core.sqnr_from_rel_error is sqnr_from_rel_error


# --- layers whose names are prefixes of each other -----------------------------------------------------------

def nested_layer_files(tmp_path, family="int8", scaling=None):
    """A quantized file and its source with Linear layers `blk` [64, 128] and `blk.y` [32, 64] (`blk.y.weight`
    sorts after `blk.weight`, so gathering `blk`'s tensors by name prefix picks up `blk.y`'s)."""
    fmt = make_format(family, scaling, 32)
    tensors, layers, source = {}, {}, {}
    g = torch.Generator().manual_seed(0)
    for layer, shape in (("blk", (64, 128)), ("blk.y", (32, 64))):
        weight = torch.randn(shape, generator=g)
        conf = dict(fmt.marker(), orig_dtype="float32")
        tensors |= {f"{layer}.{k}": v for k, v in rtn_pack(fmt, weight).items()}
        tensors[f"{layer}.comfy_quant"] = marker_tensor(conf)
        layers[layer], source[f"{layer}.weight"] = conf, weight
    path, ref = str(tmp_path / "q.safetensors"), str(tmp_path / "src.safetensors")
    save_file(tensors, path, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                                "layers": layers})})
    save_file(source, ref)
    return path, ref, source


@pytest.mark.parametrize("family,scaling", [("int8", None), ("nvfp4", None), ("mxfp8", None), ("fp8", "block")])
def test_verify_reference_with_prefix_named_layers(tmp_path, family, scaling):
    path, ref, source = nested_layer_files(tmp_path, family, scaling)
    result = verify_file(path, reference=ref, allow_legacy=True)
    assert result.ok, result.defects
    assert sorted(c.layer for c in result.layers) == ["blk", "blk.y"]
    assert all(c.rel_error < CONTRACTS[c.format].typical for c in result.layers)
    rebuilt = load_dequantized(path, {k: tuple(v.shape) for k, v in source.items()})
    for key, weight in source.items():
        assert relative_error(weight, rebuilt[key]) < 0.2


def test_convert_with_full_verify_and_prefix_named_layers(tmp_path):
    source = {"blk.weight": torch.randn(64, 128), "blk.bias": torch.zeros(64), "blk.y.weight": torch.randn(32, 64)}
    src = str(tmp_path / "m.safetensors")
    save_file(source, src)
    result = quant_core.quantize(src, str(tmp_path / "out.safetensors"), verify="full", quantize_io_layers=True)
    assert result.verify.ok and result.verify.checked_reference
    assert sorted(c.layer for c in result.verify.layers) == ["blk", "blk.y"]


def test_bench_measures_through_the_same_rebuild(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench
    path, ref, _ = nested_layer_files(tmp_path)
    result = verify_file(path, reference=ref)
    expected = sum(sqnr_from_rel_error(c.rel_error) for c in result.layers) / len(result.layers)
    assert bench.sampled_sqnr(path, ref, ["blk", "blk.y", "absent"]) == pytest.approx(expected)


# --- hostile JSON: a defect line, never a traceback ----------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def hostile_file(tmp_path, case):
    fmt = make_format("int8")
    conf = dict(fmt.marker(), orig_dtype="float32")
    tensors = {f"blk.{k}": v for k, v in rtn_pack(fmt, torch.randn(16, 32)).items()}
    tensors["blk.comfy_quant"] = marker_tensor(conf)
    header = json.dumps({"format_version": "1.0", "layers": {"blk": conf}})
    if case == "deep_marker":
        tensors["blk.comfy_quant"] = torch.frombuffer(bytearray(('{"format": "int8_tensorwise", "x": ' + DEEP + "}")
                                                                .encode()), dtype=torch.uint8)
    elif case == "deep_header":
        header = DEEP
    elif case == "deep_header_layers":
        header = '{"format_version": "1.0", "layers": {"blk": ' + DEEP + "}}"
    elif case == "huge_marker":
        tensors["blk.comfy_quant"] = torch.full((MAX_JSON_BYTES + 1,), ord(" "), dtype=torch.uint8)
    path = str(tmp_path / f"{case}.safetensors")
    save_file(tensors, path, metadata={"_quantization_metadata": header})
    return path


HOSTILE = {"deep_marker": "blk.comfy_quant: marker is not UTF-8 JSON",
           "deep_header": "header _quantization_metadata is not JSON with a 'layers' object",
           "deep_header_layers": "header _quantization_metadata is not JSON with a 'layers' object",
           "huge_marker": f"blk.comfy_quant: marker is {MAX_JSON_BYTES + 1} bytes, more than {MAX_JSON_BYTES}"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_deeply_nested_or_huge_json_is_a_defect_line(tmp_path, capsys, case):
    path = hostile_file(tmp_path, case)
    result = verify_file(path)
    assert HOSTILE[case] in result.defects, result.defects
    assert all(len(d) < 1000 for d in result.defects + result.warnings)
    capsys.readouterr()
    assert cli_main(["verify", path]) == 1
    out, err = capsys.readouterr()
    assert f"DEFECT: {HOSTILE[case]}" in out and "Traceback" not in out + err


def test_long_values_from_the_file_are_cut_in_messages(tmp_path):
    fmt = make_format("int8")
    conf = {"format": "x" * 100_000}
    tensors = {f"blk.{k}": v for k, v in rtn_pack(fmt, torch.randn(16, 32)).items()}
    tensors["blk.comfy_quant"] = marker_tensor(conf)
    path = str(tmp_path / "long.safetensors")
    save_file(tensors, path, metadata={"_quantization_metadata": json.dumps({"format_version": "v" * 100_000,
                                                                                "layers": {"blk": conf}})})
    result = verify_file(path)
    assert any("unknown format 'xxx" in d for d in result.defects)
    assert all(len(d) < 1000 for d in result.defects + result.warnings)
