"""Layout rules: quant_core never imports comfy; the pack's __init__ loads without ComfyUI; the demo runs."""
import ast
import importlib.util
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quant_core_never_imports_comfy():
    for path in (ROOT / "quant_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("comfy", "folder_paths", "comfy_api", "nodes"), (path, name)


def test_pack_init_loads_without_comfyui():
    spec = importlib.util.spec_from_file_location("quant_pack", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./web" and os.path.isdir(ROOT / "web")


def test_demo_converts_and_verifies_every_format(capsys, monkeypatch):
    from quant_core.cli import demo
    from quant_core.cli.demo import DEMO_RUNS, run_demo
    # the demo's checkpoint at a quarter of its hidden size (every K still a multiple of 64, for ConvRot 64 and the
    # block formats): what is tested is that every format converts and verifies, not how long 35 M weights take
    shaped = demo.flux_shaped_checkpoint
    monkeypatch.setattr(demo, "flux_shaped_checkpoint", lambda: shaped(hidden=128))
    assert run_demo([]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == len(DEMO_RUNS) and "FAILED" not in out
    for name in ("int8 per-row", "ConvRot", "int4", "fp8 e4m3fn", "fp8 e5m2", "nvfp4", "mxfp8"):
        assert name in out


def test_verify_stays_a_function_whatever_was_imported_first():
    import subprocess
    import sys
    code = ("import quant_core.pipeline, quant_core.verify, quant_core; "
            "assert callable(quant_core.verify), quant_core.verify")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_registry_rules_no_eval_exec_or_runtime_pip():
    """What `comfy node validate` scans for: no eval/exec, no installing packages at run time."""
    for folder in ("quant_core", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    assert node.func.id not in ("eval", "exec"), (path, node.lineno)
            source = path.read_text()  # messages may tell people to `pip install x`; code must not run pip
            assert not re.search(r"""["']-m["'],\s*["']pip["']|["']pip["'],\s*["']install["']|import pip\b|pip\.main""",
                                 source), path


def test_registry_metadata_and_requirements_match_the_project():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "web" not in comfy
    assert project["project"]["urls"]["Repository"].startswith("https://")
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    runtime = [d for d in project["project"]["dependencies"] if not d.startswith("torch")]
    assert [r for r in requirements if r] == runtime


def test_console_scripts_and_packages_are_declared():
    import importlib
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    assert scripts["calibrate_activation_scales"] == "quant_core.cli.calibrate:main"
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))
    declared = set(project["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quant_core").rglob("__init__.py")}
    assert on_disk <= declared, on_disk - declared
