"""Optional end-to-end test: quant_core output loads and runs through a real ComfyUI checkout.

Skipped unless QUANT_CORE_COMFYUI points to a ComfyUI checkout. Run with e.g.

    QUANT_CORE_COMFYUI=/path/to/ComfyUI QUANT_CORE_COMFYUI_PYTHON=/path/to/comfy/venv/bin/python \\
        python -m pytest -m comfyui tests/test_comfyui_loader.py -v

QUANT_CORE_COMFYUI_PYTHON is the Python that has ComfyUI's requirements (default: this Python). For each
format a small Flux-shaped checkpoint is converted with our CLI, then tests/comfyui_check.py runs under
that Python with PYTHONPATH=<checkout>[:stubs]: it loads the file with ComfyUI's own readers, header/marker
handling, mixed-precision ops and diffusion-model loader, and checks keys, layouts and errors (see its
docstring). Stubs from tests/comfy_stubs/ are added only for torchvision/torchaudio if that Python
can't import them (ComfyUI imports them at module level; the loader never uses them).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import flux_like_state_dict

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CHECK = os.path.join(TESTS, "comfyui_check.py")
STUBS = os.path.join(TESTS, "comfy_stubs")
COMFY = os.environ.get("QUANT_CORE_COMFYUI")
COMFY_PY = os.environ.get("QUANT_CORE_COMFYUI_PYTHON") or sys.executable

if not COMFY:
    _SKIP = "QUANT_CORE_COMFYUI (path to a ComfyUI checkout) not set"
elif not os.path.isfile(os.path.join(COMFY, "comfy", "sd.py")):
    _SKIP = f"QUANT_CORE_COMFYUI={COMFY!r} is not a ComfyUI checkout (no comfy/sd.py)"
else:
    _SKIP = None
# skipif (not a module-level skip) so that the default run, whose addopts deselect `comfyui`, reports nothing
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

# id -> (CLI args, comfyui_check.py expectations)
CASES = {
    "int8-row": (["--format", "int8", "--scaling_mode", "row"],
                 ["--expect-format", "int8_tensorwise", "--expect-int8-scale", "row"]),
    "int8-tensor": (["--format", "int8", "--scaling_mode", "tensor"],
                    ["--expect-format", "int8_tensorwise", "--expect-int8-scale", "tensor"]),
    "int8-convrot64": (["--format", "int8", "--convrot", "--convrot-group-size", "64"],
                       ["--expect-format", "int8_tensorwise", "--expect-convrot-group", "64"]),
    "fp8": (["--format", "fp8"], ["--expect-format", "float8_e4m3fn"]),
    "fp8_e5m2": (["--format", "fp8_e5m2"], ["--expect-format", "float8_e5m2"]),
    "nvfp4": (["--format", "nvfp4"], ["--expect-format", "nvfp4"]),
    "mxfp8": (["--format", "mxfp8"], ["--expect-format", "mxfp8"]),
    "int4": (["--format", "int4"], ["--expect-format", "convrot_w4a4", "--expect-convrot-group", "256"]),
    "int4-g64-w4a8": (["--format", "convrot_w4a4", "--convrot-group-size", "64", "--int4-linear-dtype", "int8"],
                      ["--expect-format", "convrot_w4a4", "--expect-convrot-group", "64",
                       "--expect-linear-dtype", "int8"]),
    # methods with a calibration file ({calib}: made by `calibrate` from the same checkpoint); biases corrected
    "gptq-int8-row": (["--optimizer", "gptq", "--calibration-data", "{calib}"],
                      ["--expect-format", "int8_tensorwise", "--expect-int8-scale", "row"]),
    "gptq-fp8": (["--format", "fp8", "--optimizer", "gptq", "--calibration-data", "{calib}"],
                 ["--expect-format", "float8_e4m3fn"]),
    "gptq-int4": (["--int4", "--optimizer", "gptq", "--calibration-data", "{calib}"],
                  ["--expect-format", "convrot_w4a4", "--expect-convrot-group", "256"]),
    "quip-int4-g64": (["--int4", "--optimizer", "quip", "--convrot-group-size", "64", "--calibration-data", "{calib}"],
                      ["--expect-format", "convrot_w4a4", "--expect-convrot-group", "64"]),
    "quip-convrot64": (["--optimizer", "quip", "--quip-store-transformed", "--convrot-group-size", "64",
                        "--calibration-data", "{calib}"],
                       ["--expect-format", "int8_tensorwise", "--expect-convrot-group", "64"]),
    "learned-int8": (["--optimizer", "adamw", "--num_iter", "50"],
                     ["--expect-format", "int8_tensorwise", "--expect-int8-scale", "row"]),
    "learned-nvfp4": (["--nvfp4", "--optimizer", "original"], ["--expect-format", "nvfp4"]),
    "fp8-static-activations": (["--fp8", "--static-activations", "--calibration-data", "{calib}"],
                               ["--expect-format", "float8_e4m3fn", "--expect-input-scale"]),
    # automatic mixed precision: several formats (and kept layers) in one file
    "auto-blackwell": (["--auto-bits", "6", "--target-gpu", "blackwell", "--calibration-data", "{calib}"], []),
    "auto-ampere-gptq": (["--auto-bits", "7", "--target-gpu", "ampere", "--optimizer", "gptq", "--calibration-data",
                          "{calib}", "--convrot-group-size", "64"], []),
}


def comfy_loadable_flux():
    """conftest's flux_like_state_dict(), completed so ComfyUI's Flux detection builds a matching model.

    ComfyUI derives num_heads = hidden // sum(axes_dim) = 256 // 128 = 2, so the q/k norm scales must have
    head size 128 (conftest uses hidden // 4 = 64, a size mismatch in load_state_dict), and real Flux has
    vector_in/guidance_in.out_layer (otherwise 'unet missing'). Everything else is conftest's checkpoint.
    """
    sd = flux_like_state_dict()
    h = sd["img_in.weight"].shape[0]
    head = 128  # sum(axes_dim) of ComfyUI's Flux config ([16, 56, 56])
    g = torch.Generator().manual_seed(1)
    for k in list(sd):
        if k.endswith(("query_norm.scale", "key_norm.scale")):
            sd[k] = torch.ones(head, dtype=sd[k].dtype)
    for p in ("vector_in", "guidance_in"):
        if p + ".out_layer.weight" not in sd:
            sd[p + ".out_layer.weight"] = (torch.randn(h, h, generator=g) * 0.02).to(torch.bfloat16)
            sd[p + ".out_layer.bias"] = (torch.randn(h, generator=g) * 0.01).to(torch.bfloat16)
    return sd


def _importable(py, mod):
    r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True, cwd=TESTS, timeout=300)
    return r.returncode == 0


@pytest.fixture(scope="module")
def comfy_env(tmp_path_factory):
    """Environment for the ComfyUI Python: PYTHONPATH=<checkout>[:stubs for what it can't import]."""
    missing = [m for m in ("torchvision", "torchaudio") if not _importable(COMFY_PY, m)]
    paths = [os.path.abspath(COMFY)]
    if missing:
        stubs = tmp_path_factory.mktemp("comfy_stubs")
        shutil.copy(os.path.join(STUBS, "_quant_core_stubutil.py"), stubs)
        for m in missing:
            shutil.copytree(os.path.join(STUBS, m), stubs / m)
        paths.append(str(stubs))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore")
    print(f"ComfyUI python {COMFY_PY}; stubbed: {missing or 'none'}")
    return env


@pytest.fixture(scope="module")
def flux_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_src") / "flux_tiny.safetensors"
    save_file(comfy_loadable_flux(), str(path), metadata={"modelspec.title": "tiny flux"})
    return str(path)


@pytest.fixture(scope="module")
def flux_calib(flux_src, tmp_path_factory):
    """Calibration statistics for flux_src (synthetic inputs through the `calibrate` subcommand)."""
    path = str(tmp_path_factory.mktemp("calib") / "calib.safetensors")
    done = subprocess.run([sys.executable, "-m", "quant_core", "calibrate", "-i", flux_src, "-o", path, "--samples",
                           "256"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_loads_and_runs(case, flux_src, flux_calib, comfy_env, tmp_path):
    cli_args, expect = CASES[case]
    cli_args = [a.replace("{calib}", flux_calib) for a in cli_args]
    out = str(tmp_path / f"flux_tiny_{case}.safetensors")
    conv = subprocess.run([sys.executable, "-m", "quant_core", "-i", flux_src, "-o", out, *cli_args,
                           "--no-progress", "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(conv.stdout + conv.stderr)
    assert conv.returncode == 0, f"quant_core failed ({conv.returncode}):\n{conv.stdout}\n{conv.stderr}"
    assert os.path.isfile(out)
    if case.startswith("auto"):  # the point of these cases: one file, several formats
        from quant_core.dequantize import quantized_layers
        from quant_core.io.reader import SafetensorsReader
        with SafetensorsReader(out) as reader:
            formats = {(c["format"], c.get("convrot_groupsize")) for c in quantized_layers(reader).values()}
        assert len(formats) >= 2, formats

    chk = subprocess.run([COMFY_PY, CHECK, out, flux_src, "--unet", "require", *expect],
                         cwd=TESTS, env=comfy_env, capture_output=True, text=True, timeout=600)
    print(chk.stdout)
    if chk.stderr.strip():
        print("--- stderr ---\n" + chk.stderr)
    assert chk.returncode == 0, f"comfyui_check.py exit {chk.returncode}:\n{chk.stdout[-6000:]}\n{chk.stderr[-3000:]}"
    assert "RESULT: OK" in chk.stdout
