"""Hostile inputs: forged safetensors headers, broken LoRA files and --lora-mapping files, layer configs and user
regexes built to stall the tool, calibration statistics of the wrong shape or type.

Every input gives a valid result or one line of QuantError, raised before anything is written — never a traceback,
a hang, or an allocation beyond the file's size. The hypothesis tests fuzz the header parser and the layer-config /
LoRA-mapping JSON readers (500 inputs each by default; the `slow` variants 10,000)."""
import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import flux_like_state_dict
from quant_core.calib.ranges import CalibrationStats
from quant_core.calib.stats import InputStats
from quant_core.cli import main
from quant_core.errors import QuantError
from quant_core.io.dtypes import SAFETENSORS_DTYPES, element_size
from quant_core.io.reader import SafetensorsReader, read_header
from quant_core.job import Job
from quant_core.quantization.input_scales import static_input_scale
from quant_core.select.layer_config import RULE_KEYS, SEED_KEY_ALIASES, load_layer_config
from quant_core.select.rules import compile_regex
from quant_core.transform.lora.merge import LoraMerger, _load_mapping

H = 64  # hidden size of the small Flux-shaped checkpoint
LAYER = "double_blocks.0.img_attn.proj"  # [H, H]
KOHYA = "lora_unet_double_blocks_0_img_attn_proj"


# --- helpers -------------------------------------------------------------------------------------------------------

def write_raw(path, header, data: bytes = b"", header_len: int | None = None) -> str:
    """A safetensors-shaped file: 8-byte length, header (dict → JSON, or raw bytes), data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(blob) if header_len is None else header_len).to_bytes(8, "little") + blob + data)
    return str(path)


def entry(dtype, shape, begin, end) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def refused(fn, *args) -> str:
    """The one-line QuantError message `fn(*args)` raises."""
    with pytest.raises(QuantError) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message and message.strip()
    return message


def cli(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stderr); a failure must be exactly one `error:` line."""
    code = main([str(a) for a in argv] + ["--no-progress"])
    _, err = capsys.readouterr()
    if code:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
    return code, err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base") / "flux.safetensors"
    save_file(flux_like_state_dict(hidden=H), str(path))
    return str(path)


# --- A. forged safetensors headers ------------------------------------------------------------------------------

def test_zero_size_tensor_with_huge_dims_is_refused(tmp_path, capsys):
    path = write_raw(tmp_path / "m.safetensors", {"blocks.0.empty.weight": entry("F32", [0, 2 ** 63], 0, 0),
                                                  "blocks.0.w.weight": entry("F32", [4, 4], 0, 64)}, bytes(64))
    assert "absurd shape" in refused(read_header, path)
    for shape in ([0, 2 ** 62, 2 ** 62], [2 ** 61, 0, 2 ** 3], [0] + [2 ** 40] * 4):
        write_raw(path, {"e": entry("F32", shape, 0, 0)})
        assert "absurd shape" in refused(read_header, path)
    write_raw(path, {"e": entry("F32", [0, 2 ** 40], 0, 0)})  # large but representable: a valid empty tensor
    with SafetensorsReader(path) as reader:
        assert reader.get_tensor("e").shape == (0, 2 ** 40)
    write_raw(path, {"blocks.0.empty.weight": entry("F32", [0, 2 ** 63], 0, 0)})
    code, err = cli(capsys, "-i", path, "-o", tmp_path / "o.safetensors")
    assert code == 2 and "absurd shape" in err and not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 4, None, "f32"])
def test_dtype_of_the_wrong_json_type_is_refused(tmp_path, dtype):
    path = write_raw(tmp_path / "m.safetensors", {"w": entry(dtype, [1], 0, 4)}, bytes(4))
    assert "unknown dtype" in refused(read_header, path)


@pytest.mark.parametrize("entries,data,message", [
    # the review's case: a zero-size tensor between two tensors that overlap
    ({"a": entry("F32", [2], 0, 8), "z": entry("F32", [0], 4, 4), "b": entry("F32", [2], 4, 12)}, 12, "overlap"),
    ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12, "overlap"),
    ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, 12, "belong to no tensor"),  # gap
    ({"a": entry("F32", [1], 4, 8)}, 8, "belong to no tensor"),  # data does not start at 0
    ({"a": entry("F32", [1], 0, 4)}, 8, "after the last tensor"),  # trailing bytes
    ({"z": entry("F32", [0], 8, 8), "a": entry("F32", [1], 0, 4)}, 8, "belong to no tensor"),  # empty tensor past data
])
def test_data_offsets_must_tile_the_data_area(tmp_path, entries, data, message):
    path = write_raw(tmp_path / "m.safetensors", entries, bytes(data))
    assert message in refused(read_header, path)


def test_tiling_offsets_in_any_order_and_empty_tensors_are_accepted(tmp_path):
    entries = {"b": entry("F32", [2], 4, 12), "z0": entry("F16", [0, 7], 0, 0), "a": entry("F32", [1], 0, 4),
               "z1": entry("F32", [3, 0], 4, 4), "z2": entry("BF16", [0], 12, 12)}
    path = write_raw(tmp_path / "m.safetensors", entries, bytes(12))
    infos, _, data_start = read_header(path)
    assert list(infos) == list(entries) and infos["b"].start == data_start + 4


@pytest.mark.parametrize("shape", [[-1, -4], [True], [1.0], [1.5], [[1]], "1", {"0": 1}, None, [1] * 65])
def test_shapes_must_be_short_lists_of_non_negative_integers(tmp_path, shape):
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("F32", shape, 0, 4)}, bytes(4))
    assert "invalid shape" in refused(read_header, path)


@pytest.mark.parametrize("offsets", [[0, 4, 8], [0], "ab", {"0": 4}, [0.0, 4.0], [False, 4], [4, 0], None])
def test_data_offsets_must_be_two_ordered_integers(tmp_path, offsets):
    path = write_raw(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}},
                     bytes(4))
    assert "offsets" in refused(read_header, path)


@pytest.mark.parametrize("header", [
    b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"__metadata__":{"k":' + b'{"k":' * 100_000 + b'"v"' + b"}" * 100_000 + b"}}",
    b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
])
def test_json_nested_very_deep_in_the_header_is_refused(tmp_path, header):
    path = write_raw(tmp_path / "m.safetensors", header)
    assert "malformed" in refused(read_header, path)


@pytest.mark.parametrize("metadata", [{"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"a": "b"}}, [], 0, "", False,
                                      ["k", "v"]])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": metadata, "w": entry("F32", [1], 0, 4)}, bytes(4))
    assert "__metadata__" in refused(read_header, path)


def test_null_metadata_is_no_metadata(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": None, "w": entry("F32", [1], 0, 4)}, bytes(4))
    assert read_header(path)[1] == {}


def test_messages_stay_short_for_huge_or_odd_values(tmp_path):
    name = "x\n" * 50_000
    path = write_raw(tmp_path / "m.safetensors", {name: entry("F32", list(range(10_000)), 0, 4)}, bytes(4))
    message = refused(read_header, path)
    assert len(message) < 400 + len(str(path))


# --- B. LoRA files and --lora-mapping ---------------------------------------------------------------------------

def f8(*shape):
    return torch.randn(*shape).to(torch.float8_e4m3fn)


BAD_LORAS = {
    "rank_mismatch": ({f"{KOHYA}.lora_up.weight": torch.randn(H, 4), f"{KOHYA}.lora_down.weight": torch.randn(8, H)},
                      "same rank"),
    "rank_zero": ({f"{KOHYA}.lora_up.weight": torch.randn(H, 0), f"{KOHYA}.lora_down.weight": torch.randn(0, H)},
                  "rank 0"),
    "alpha_vector": ({f"{KOHYA}.lora_up.weight": torch.randn(H, 4), f"{KOHYA}.lora_down.weight": torch.randn(4, H),
                      f"{KOHYA}.alpha": torch.ones(3)}, "alpha must be one number"),
    "fp8_factors": ({f"{KOHYA}.lora_up.weight": f8(H, 4), f"{KOHYA}.lora_down.weight": f8(4, H)}, "stored as F8_E4M3"),
    "int_factors": ({f"{KOHYA}.lora_up.weight": torch.ones(H, 4, dtype=torch.int32),
                     f"{KOHYA}.lora_down.weight": torch.ones(4, H, dtype=torch.int32)}, "stored as I32"),
    "fp8_alpha": ({f"{KOHYA}.lora_up.weight": torch.randn(H, 4), f"{KOHYA}.lora_down.weight": torch.randn(4, H),
                   f"{KOHYA}.alpha": f8(1)}, "alpha is stored as F8_E4M3"),
    "scalar_factors": ({f"{KOHYA}.lora_up.weight": torch.tensor(1.0), f"{KOHYA}.lora_down.weight": torch.tensor(1.0)},
                       "same rank"),
    "loha_rank_mismatch": ({f"{KOHYA}.hada_w1_a": torch.randn(H, 4), f"{KOHYA}.hada_w1_b": torch.randn(4, H),
                            f"{KOHYA}.hada_w2_a": torch.randn(H, 4), f"{KOHYA}.hada_w2_b": torch.randn(2, H)},
                           "same rank"),
    "loha_shapes_differ": ({f"{KOHYA}.hada_w1_a": torch.randn(H, 4), f"{KOHYA}.hada_w1_b": torch.randn(4, H),
                            f"{KOHYA}.hada_w2_a": torch.randn(H // 2, 4), f"{KOHYA}.hada_w2_b": torch.randn(4, H)},
                           "hada_w2_a @ hada_w2_b"),
    "lokr_rank_mismatch": ({f"{KOHYA}.lokr_w1": torch.randn(8, 8), f"{KOHYA}.lokr_w2_a": torch.randn(8, 2),
                            f"{KOHYA}.lokr_w2_b": torch.randn(3, 8)}, "same rank"),
    "lokr_w1_not_a_matrix": ({f"{KOHYA}.lokr_w1": torch.randn(8, 8, 1), f"{KOHYA}.lokr_w2": torch.randn(8, 8)},
                             "lokr_w1 has shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_LORAS))
def test_bad_lora_factors_are_refused_while_planning(base, tmp_path, capsys, case):
    tensors, message = BAD_LORAS[case]
    lora = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "o.safetensors"
    code, err = cli(capsys, "-i", base, "-o", out, "--fp8", "--merge-lora", lora)
    assert code == 2 and message in err and str(lora) in err and KOHYA in err, err
    assert os.listdir(tmp_path) == [lora.name]  # nothing written, not even a temporary file


def test_diffusers_lora_onto_a_fused_layer_of_another_shape_is_unmatched_not_a_crash(tmp_path):
    lora = tmp_path / "l.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, H),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 4)}, str(lora))
    for shape in ((3 * H,), (2 * H, H)):  # not BFL's [3K, K] fused q/k/v
        message = refused(LoraMerger, [(str(lora), 1.0)], {"double_blocks.0.img_attn.qkv.weight": shape})
        assert "match no weight" in message


WEIGHTS = {f"{LAYER}.weight": (H, H), "img_in.weight": (H, 64), "scalar.weight": ()}


@pytest.mark.parametrize("mapping,message", [
    ([1], "JSON object"),
    (3, "JSON object"),
    ({"m": [f"{LAYER}.weight"]}, "an entry is a weight key string"),
    ({"m": 5}, "an entry is a weight key string"),
    ({"m": None}, "an entry is a weight key string"),
    ({"m": {"weight": [f"{LAYER}.weight"]}}, "is not a weight of the model"),
    ({"m": {"weight": {"a": 1}}}, "is not a weight of the model"),
    ({"m": {"weight": f"{LAYER}.weight", "row": [0, 1]}}, "unknown key 'row'"),
    ({"m": {"weight": f"{LAYER}.weight", "rows": ["a", 1]}}, "'rows' must be"),
    ({"m": {"weight": f"{LAYER}.weight", "rows": [0.5, 3]}}, "'rows' must be"),
    ({"m": {"weight": f"{LAYER}.weight", "rows": [False, True]}}, "'rows' must be"),
    ({"m": {"weight": f"{LAYER}.weight", "rows": [0, H + 1]}}, "'rows' must be"),
    ({"m": {"weight": f"{LAYER}.weight", "rows": {"0": 1}}}, "'rows' must be"),
    ({"m": {"weight": "scalar.weight", "rows": [0, 1]}}, "'rows' must be"),
])
def test_lora_mapping_rows_of_the_wrong_type_are_refused(tmp_path, mapping, message):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    assert message in refused(_load_mapping, str(path), WEIGHTS)
    assert message in refused(_load_mapping, mapping, WEIGHTS)  # the library form (an object, not a file)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"m":' * 100_000 + '"x"' + "}" * 100_000])
def test_lora_mapping_nested_100000_deep_is_refused(base, tmp_path, capsys, text):
    path = tmp_path / "map.json"
    path.write_text(text)
    assert "cannot read the LoRA mapping" in refused(_load_mapping, str(path), WEIGHTS)
    lora = tmp_path / "l.safetensors"
    save_file({f"{KOHYA}.lora_up.weight": torch.randn(H, 4), f"{KOHYA}.lora_down.weight": torch.randn(4, H)}, str(lora))
    code, err = cli(capsys, "-i", base, "-o", tmp_path / "o.safetensors", "--fp8", "--merge-lora", lora,
                    "--lora-mapping", path)
    assert code == 2 and "LoRA mapping" in err


# --- C. layer config and user regexes ---------------------------------------------------------------------------

DEFAULTS = Job.build({}).quantize


def layer_config_file(tmp_path, config) -> str:
    path = tmp_path / "layers.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.mark.parametrize("config,message", [
    ("[" * 100_000 + "]" * 100_000, "malformed layer config JSON"),
    ('{"rules":' + "[" * 100_000 + "]" * 100_000 + "}", "malformed layer config JSON"),
    ({"rules": [{"match": "(" * 2000 + ")" * 2000}]}, "nested too deeply"),
    ({"rules": [{"match": "(a)" * 101}]}, "101 groups"),
    ({"rules": [{"match": "a" * 5000}]}, "5000 characters"),
    ({"rules": [{"match": "a{4294967296}"}]}, "bad regex"),
    ({"rules": [{"match": "a", "format": ["fp8"]}]}, "'format' must be a string, got a list"),
    ({"rules": [{"match": "a", "format": None}]}, "'format' must be a string, got null"),
    ({"rules": [{"match": "a", "format": "fp8", "scaling": {"mode": "row"}}]}, "'scaling' must be a string"),
    ({"rules": [{"match": "a", "scaling": ["row"]}]}, "'scaling' must be a string, got a list"),
    ({"rules": [{"match": "a", "block_size": 64.0}]}, "'block_size' must be a positive integer, got a number"),
    ({"rules": [{"match": "a", "block_size": True}]}, "'block_size' must be a positive integer, got a boolean"),
    ({"rules": [{"match": "a", "skip": True, "block_size": "64"}]}, "'block_size' must be a positive integer"),
    ({"rules": [{"match": "a", "convrot": 1.5}]}, "'convrot' must be true, false or a group size"),
    ({"rules": [{"match": "a", "convrot": [4]}]}, "'convrot' must be true, false or a group size"),
    ({"a": {"format": {"x": 1}}}, "'format' must be a string"),  # the seed's {regex: settings} form
])
def test_layer_config_hostile_values_give_one_line_errors(tmp_path, config, message):
    assert message in refused(load_layer_config, layer_config_file(tmp_path, config), DEFAULTS)


@pytest.mark.parametrize("pattern,why", [
    ("(a+)+$", "quantifier repeats a part"),
    ("(a|a)*$", "quantifier repeats a part"),
    ("(a|aa)+$", "quantifier repeats a part"),
    ("(a?){30}a{30}", "quantifier repeats a part"),
    (r"(\w+\s?)*$", "quantifier repeats a part"),
    (r"(a)\1", "backreference"),
    (r"(?P<x>a)?(?(x)b|c)", "backreference or conditional"),
    (".*" * 5 + "!", "too many variable quantifiers"),
    ("a?" * 30 + "a" * 30, "too many variable quantifiers"),
    ("(?:a|a|a|a)" * 8 + "!", "too many variable quantifiers and alternatives"),
])
def test_user_regexes_that_could_backtrack_without_bound_are_refused(pattern, why):
    start = time.perf_counter()
    message = refused(compile_regex, pattern, "--exclude-layers")
    assert why in message and "bounded time" in message and time.perf_counter() - start < 1.0


@pytest.mark.parametrize("pattern", [
    r"double_blocks\.0\.", r"attn\.qkv", r"(img|txt)_mlp", r"^(double|single)_blocks\.\d+\..*(attn|mlp)",
    r"blocks\.[0-9]+\.(?!.*norm).*", r"^(?!double_blocks\.0\.img_attn\.qkv$)", r"(?i)ATTN", r"[a-z]{1,3}\d{2}",
    r"(?:ab){3}", r".*attn.*qkv.*", r"txt_mlp|linear1", "",
])
def test_ordinary_user_regexes_are_accepted(pattern):
    assert compile_regex(pattern, "--exclude-layers").pattern == pattern


NAMES_34 = ["a" * 34, "a" * 33 + "!", "double_blocks.10.img_attn.qkv.proj!"[:34]]


def test_catastrophic_pattern_does_not_stall_the_tool(tmp_path, capsys):
    """`(a+)+$` against a 34-character layer name would take ~2^33 steps in Python's re; it is refused at once."""
    model = tmp_path / "m.safetensors"
    save_file({f"{'a' * 33}!.weight": torch.randn(64, 64), "blocks.0.weight": torch.randn(64, 64)}, str(model))
    config = layer_config_file(tmp_path, {"rules": [{"match": "(a+)+$", "format": "fp8"}]})
    start = time.perf_counter()
    for extra in (["--layer-config", config], ["--exclude-layers", "(a+)+$"]):
        code, err = cli(capsys, "-i", model, "-o", tmp_path / "o.safetensors", "--fp8", *extra)
        assert code == 2 and "bounded time" in err
    assert time.perf_counter() - start < 10.0


# --- D. calibration statistics as the consumers read them --------------------------------------------------------

def stats(absmax, input_scale=None) -> CalibrationStats:
    return CalibrationStats("calib.safetensors", {LAYER: InputStats(absmax=absmax, mean_sq=absmax, n_tokens=10,
                                                                   input_scale=input_scale)})


@pytest.mark.parametrize("absmax,input_scale,message", [
    (torch.tensor(3.0), None, "has shape []"),
    (torch.ones(0), None, "has shape [0]"),
    (torch.ones(4, 4), None, "has shape [4, 4]"),
    (torch.ones(8).to(torch.float8_e4m3fn), None, "stored as torch.float8_e4m3fn"),
    (torch.ones(8, dtype=torch.int32), None, "stored as torch.int32"),
    (torch.tensor([1.0, float("nan")]), None, "finite, non-negative"),
    (torch.tensor([1.0, -1.0]), None, "finite, non-negative"),
    (torch.ones(8), torch.tensor(0.1).to(torch.float8_e5m2), "input_scale is stored as"),
    (torch.ones(8), torch.ones(3), "expected one number"),
    (torch.ones(8), torch.tensor(float("inf")), "finite, non-negative"),
])
def test_range_view_refuses_statistics_its_consumers_cannot_use(absmax, input_scale, message):
    assert message in refused(stats, absmax, input_scale)


def test_static_scale_refuses_a_divisor_that_does_not_fit_the_absmax():
    assert "SmoothQuant divisor" in refused(static_input_scale, LAYER, "float8_e4m3fn", stats(torch.ones(8)),
                                            torch.ones(4))
    scale, why = static_input_scale(LAYER, "float8_e4m3fn", stats(torch.full((8,), 4.48)), torch.full((8,), 2.0))
    assert why == "" and float(scale) == pytest.approx(2.24 / 448)


@pytest.mark.parametrize("absmax,input_scale", [
    (torch.tensor(3.0), None),  # scalar absmax
    (torch.ones(0), None),  # empty absmax
    (torch.ones(H).to(torch.float8_e4m3fn), None),  # FP8 statistics
    (torch.ones(H), torch.tensor(0.1).to(torch.float8_e4m3fn)),
])
def test_static_activations_with_bad_statistics_is_one_line(base, tmp_path, capsys, absmax, input_scale):
    tensors = {f"{LAYER}.input_absmax": absmax, f"{LAYER}.n_tokens": torch.tensor(10)}
    if input_scale is not None:
        tensors[f"{LAYER}.input_scale"] = input_scale
    calib = tmp_path / "calib.safetensors"
    save_file(tensors, str(calib), metadata={"format": "quant_calibration", "version": "1", "source": "t"})
    code, err = cli(capsys, "-i", base, "-o", tmp_path / "o.safetensors", "--fp8", "--calibration-data", calib,
                    "--static-activations")
    assert code == 2 and str(calib) in err and LAYER in err


# --- fuzz: header parser -----------------------------------------------------------------------------------------

FUZZ = settings(max_examples=500, deadline=5000, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
LONG = settings(FUZZ, max_examples=10_000)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10)
dims = st.one_of(st.integers(0, 6), st.integers(0, 6), st.sampled_from([0, -1, 2 ** 31, 2 ** 62, 2 ** 63, 2 ** 64]),
                 st.booleans(), st.floats(0, 6), json_values)


@st.composite
def header_files(draw) -> bytes:
    """Mostly plausible layouts (offsets laid end to end from each shape's byte size), then perturbed: wrong types,
    shifted offsets, extra or missing data, hostile metadata, cut or flipped bytes, or raw junk."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=300))
    header, offset = {}, 0
    for name in draw(st.lists(st.text(max_size=8), max_size=5, unique=True)):
        dtype = draw(st.one_of(st.sampled_from(sorted(SAFETENSORS_DTYPES)), json_values))
        shape = draw(st.one_of(st.lists(dims, max_size=4), json_values))
        plausible = isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES and isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape)
        nbytes = math.prod(shape) * element_size(dtype) if plausible else -1
        nbytes = nbytes if 0 <= nbytes <= 4096 else draw(st.integers(0, 64))
        begin, end = offset + draw(st.sampled_from([0, 0, 0, -4, 4])), offset + nbytes + draw(st.sampled_from([0, 0, -1, 2]))
        header[name] = draw(st.one_of(st.just(entry(dtype, shape, begin, end)), json_values,
                                      st.fixed_dictionaries({"dtype": st.just(dtype), "shape": st.just(shape),
                                                             "data_offsets": json_values})))
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), json_values))
    blob = json.dumps(dict(draw(st.permutations(list(header.items()))))).encode()
    data = bytes(max(0, offset + draw(st.sampled_from([0, 0, 0, -2, 3]))))
    length = len(blob) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 2 ** 40]))
    raw = length.to_bytes(8, "little") + blob + data
    if draw(st.integers(0, 4)) == 0:
        cut = draw(st.integers(0, len(raw)))
        raw = raw[:cut] + draw(st.binary(max_size=4)) + raw[cut + draw(st.integers(0, 4)):]
    return raw


def check_header_file(path: str, raw: bytes) -> None:
    """A valid read whose tensors tile the file exactly (so reading them all allocates at most the file's size), or
    a one-line QuantError."""
    with open(path, "wb") as f:
        f.write(raw)
    try:
        infos, _, data_start = read_header(path)
    except QuantError as e:
        assert "\n" not in str(e)
        return
    assert data_start + sum(info.nbytes for info in infos.values()) == len(raw)
    with SafetensorsReader(path) as reader:
        for name, info in infos.items():
            tensor = reader.get_tensor(name)
            assert tuple(tensor.shape) == info.shape and tensor.numel() * tensor.element_size() == info.nbytes


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(raw=header_files())
def test_fuzz_header_parser(fuzz_dir, raw):
    check_header_file(str(fuzz_dir / "h.safetensors"), raw)


@pytest.mark.slow
@LONG
@given(raw=header_files())
def test_fuzz_header_parser_long(fuzz_dir, raw):
    check_header_file(str(fuzz_dir / "h.safetensors"), raw)


# --- fuzz: layer-config and LoRA-mapping JSON readers ------------------------------------------------------------

regexish = st.text(alphabet="a!.()+*?|{}[]^$\\1,039:-", max_size=16)
rule_keys = st.sampled_from(sorted(RULE_KEYS | set(SEED_KEY_ALIASES) | {"simple", "bogus", "_default"}))
rule_values = st.one_of(json_values, regexish, st.integers(-2, 300),
                        st.sampled_from(["fp8", "int8", "nvfp4", "mxfp8", "fp16", "float8_e4m3fn", "int8_blockwise",
                                         "row", "block", "tensor", "fp8_e5m2", "int4", "convrot_w4a4"]))
rules = st.dictionaries(rule_keys, rule_values, max_size=5).map(lambda r: r | {"match": r.get("match", "a")}
                                                                 if len(r) % 2 else r)
layer_configs = st.one_of(st.fixed_dictionaries({"rules": st.lists(st.one_of(rules, json_values), max_size=4)}),
                          st.dictionaries(st.one_of(regexish, st.just("_default")), st.one_of(rules, json_values),
                                          max_size=4),
                          json_values)


def json_text(strategy):
    """JSON text of the strategy's values, sometimes cut short, sometimes nested thousands deep, sometimes junk."""
    return st.one_of(strategy.map(json.dumps), strategy.map(json.dumps), strategy.map(json.dumps),
                     st.tuples(strategy.map(json.dumps), st.integers(0, 40)).map(lambda t: t[0][: t[1]]),
                     st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n), st.text(max_size=40))


def check_layer_config(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        loaded = load_layer_config(path, DEFAULTS)
    except QuantError as e:
        assert "\n" not in str(e)
        return
    for rule in loaded:  # an accepted pattern matches in bounded time, even on a name built to make it backtrack
        for name in NAMES_34:
            start = time.perf_counter()
            rule.pattern.search(name)
            assert time.perf_counter() - start < 0.5, rule.pattern.pattern


@FUZZ
@given(text=json_text(layer_configs))
def test_fuzz_layer_config_reader(fuzz_dir, text):
    check_layer_config(str(fuzz_dir / "layers.json"), text)


@pytest.mark.slow
@LONG
@given(text=json_text(layer_configs))
def test_fuzz_layer_config_reader_long(fuzz_dir, text):
    check_layer_config(str(fuzz_dir / "layers.json"), text)


mapping_values = st.one_of(st.sampled_from(sorted(WEIGHTS)), json_values,
                           st.dictionaries(st.sampled_from(["weight", "rows", "row"]),
                                           st.one_of(st.sampled_from(sorted(WEIGHTS)), json_values,
                                                     st.lists(st.integers(-2, H + 2), max_size=3)), max_size=3))
mappings = st.one_of(st.dictionaries(st.text(max_size=8), mapping_values, max_size=4), json_values)


def check_mapping(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        targets = _load_mapping(path, WEIGHTS)
    except QuantError as e:
        assert "\n" not in str(e)
        return
    for target in targets.values():
        assert target.weight_key in WEIGHTS
        assert target.rows is None or 0 <= target.rows[0] < target.rows[1] <= WEIGHTS[target.weight_key][0]


@FUZZ
@given(text=json_text(mappings))
def test_fuzz_lora_mapping_reader(fuzz_dir, text):
    check_mapping(str(fuzz_dir / "map.json"), text)


@pytest.mark.slow
@LONG
@given(text=json_text(mappings))
def test_fuzz_lora_mapping_reader_long(fuzz_dir, text):
    check_mapping(str(fuzz_dir / "map.json"), text)
