"""verify catches each way a file can break ComfyUI's loading contract (FORMATS.md)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from quant_core.quantization.formats.markers import marker_tensor
from quant_core.quantization.formats import make_format
from quant_core.quantization.formats.base import divide_by_scale
from quant_core.verify import verify_file

N, K = 128, 256


def layer_tensors(family, scaling=None, layer="blk.lin"):
    fmt = make_format(family, scaling)
    # rows of very different magnitude, as in real layers: a scale applied to the wrong row shows
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, N).unsqueeze(1)
    grid = fmt.grid(weight)
    packed = fmt.pack(fmt.round(divide_by_scale(grid.work, grid.scale)), grid)
    conf = dict(fmt.marker(), orig_dtype="float32")
    tensors = {f"{layer}.{k}": v for k, v in packed.items()}
    tensors[f"{layer}.comfy_quant"] = marker_tensor(conf)
    tensors[f"{layer}.bias"] = torch.zeros(N)
    return weight, tensors, {layer: conf}


def save(tmp_path, tensors, layers, name="q.safetensors", header=True):
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if header else None
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=meta)
    return path


@pytest.fixture
def reference(tmp_path):
    weight, _, _ = layer_tensors("int8")  # the same seeded weight every format starts from
    path = str(tmp_path / "src.safetensors")
    save_file({"blk.lin.weight": weight, "blk.lin.bias": torch.zeros(N)}, path)
    return path


@pytest.mark.parametrize("family,scaling", [("int8", "row"), ("int8", "tensor"), ("fp8", None), ("fp8_e5m2", None),
                                            ("nvfp4", None), ("mxfp8", None)])
def test_well_formed_files_pass(tmp_path, reference, family, scaling):
    _, tensors, layers = layer_tensors(family, scaling)
    result = verify_file(save(tmp_path, tensors, layers), reference=reference)
    assert result.ok, result.defects
    assert result.layers[0].rel_error < 0.15


def mutate(case, tensors, layers):
    L = "blk.lin"
    if case == "no_marker":
        del tensors[f"{L}.comfy_quant"]
    elif case == "unknown_format":
        tensors[f"{L}.comfy_quant"] = marker_tensor({"format": "int8_rowwise"})
        layers[L] = {"format": "int8_rowwise"}
    elif case == "nul_marker":
        tensors[f"{L}.comfy_quant"] = torch.zeros(16, dtype=torch.uint8)
    elif case == "flat_int8_scale":
        tensors[f"{L}.weight_scale"] = tensors[f"{L}.weight_scale"].reshape(-1)
    elif case == "fp8_as_u8":
        tensors[f"{L}.weight"] = tensors[f"{L}.weight"].view(torch.uint8)
    elif case == "fp8_row_scale":
        tensors[f"{L}.weight_scale"] = torch.ones(N, 1)
    elif case == "int8_input_scale":
        tensors[f"{L}.input_scale"] = torch.tensor(1.0)
    elif case == "header_mismatch":
        layers[L] = dict(layers[L], full_precision_matrix_mult=True)
    elif case == "header_extra_layer":
        layers["ghost.layer"] = {"format": "int8_tensorwise"}
    elif case == "missing_scale":
        del tensors[f"{L}.weight_scale"]
    elif case == "negative_scale":
        tensors[f"{L}.weight_scale"] = -tensors[f"{L}.weight_scale"]
    elif case == "unswizzled_nvfp4":
        from quant_core.quantization.formats.blocked import from_blocked
        swz = tensors[f"{L}.weight_scale"]
        plain = from_blocked(swz.view(torch.uint8), N, K // 16)
        tensors[f"{L}.weight_scale"] = torch.zeros_like(swz.view(torch.uint8))
        tensors[f"{L}.weight_scale"].view(-1)[: plain.numel()] = plain.reshape(-1)
        tensors[f"{L}.weight_scale"] = tensors[f"{L}.weight_scale"].view(torch.float8_e4m3fn)
    elif case == "low_nibble_first":
        w = tensors[f"{L}.weight"]
        tensors[f"{L}.weight"] = ((w << 4) | (w >> 4)).to(torch.uint8)
    elif case == "marker_on_conv":
        tensors[f"{L}.weight"] = tensors[f"{L}.weight"].reshape(N, K, 1, 1)
    elif case == "orphan_scale":
        tensors["other.weight_scale"] = torch.tensor(1.0)
        tensors["other.weight"] = torch.zeros(4, 4, dtype=torch.int8)
    elif case == "quantized_bias":
        tensors[f"{L}.bias"] = torch.zeros(N, dtype=torch.int8)


DEFECT_CASES = {  # case: (format family, expected words in the defect, needs the reference to be caught)
    "no_marker": ("int8", "without a .comfy_quant marker", False),
    "unknown_format": ("int8", "unknown format 'int8_rowwise'", False),
    "nul_marker": ("int8", "NUL-filled", False),
    "flat_int8_scale": ("int8", "weight_scale has shape [128]", False),
    "fp8_as_u8": ("fp8", "weight is U8, expected F8_E4M3", False),
    "fp8_row_scale": ("fp8", "weight_scale has shape [128, 1]", False),
    "int8_input_scale": ("int8", "unexpected tensor blk.lin.input_scale", False),
    "header_mismatch": ("int8", "differs from the marker", False),
    "header_extra_layer": ("int8", "listed in the header", False),
    "missing_scale": ("int8", "missing weight_scale", False),
    "negative_scale": ("int8", "scales must be positive", False),
    "unswizzled_nvfp4": ("nvfp4", "broken", True),
    "low_nibble_first": ("nvfp4", "broken", True),
    "marker_on_conv": ("int8", "must be 2-D", False),
    "orphan_scale": ("int8", "scale without a .comfy_quant marker", False),
    "quantized_bias": ("int8", "biases are never quantized", False),
}


@pytest.mark.parametrize("case", sorted(DEFECT_CASES))
def test_each_defect_is_caught(tmp_path, reference, case):
    family, words, needs_reference = DEFECT_CASES[case]
    _, tensors, layers = layer_tensors(family)
    mutate(case, tensors, layers)
    path = save(tmp_path, tensors, layers)
    result = verify_file(path, reference=reference)
    assert not result.ok
    assert any(words in d for d in result.defects), result.defects
    if not needs_reference:
        assert not verify_file(path).ok


def test_missing_header_metadata_is_a_defect(tmp_path):
    _, tensors, layers = layer_tensors("int8")
    result = verify_file(save(tmp_path, tensors, layers, header=False))
    assert any("no _quantization_metadata" in d for d in result.defects)


def test_kept_tensor_changed_is_caught(tmp_path, reference):
    _, tensors, layers = layer_tensors("int8")
    tensors["extra.weight"] = torch.ones(3)
    result = verify_file(save(tmp_path, tensors, layers), reference=reference)
    assert any("extra.weight: not in the reference" in d for d in result.defects)
