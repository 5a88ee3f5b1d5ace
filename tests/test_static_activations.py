"""--static-activations: input_scale from the calibration file, only for fp8 and nvfp4; verify checks it."""
import pytest
import torch
from safetensors.torch import save_file

import quant_core
from calibration_util import write_calibration
from quant_core.io.reader import SafetensorsReader
from quant_core.verify import verify_file

LAYER = "double_blocks.0.img_attn.proj"  # K = 256
OTHER = "double_blocks.0.img_mlp.2"  # K = 1024


@pytest.fixture
def calib(tmp_path):
    absmax = {LAYER: torch.linspace(0.1, 8.96, 256), OTHER: torch.full((1024,), 2.0)}
    return write_calibration(str(tmp_path / "calib.safetensors"), absmax, input_scale={OTHER: 0.125})


@pytest.mark.parametrize("fmt,code_max", [("fp8", 448.0), ("fp8_e5m2", 57344.0), ("nvfp4", 448.0 * 6)])
def test_input_scale_written_for_fp8_and_nvfp4(flux_file, tmp_path, calib, fmt, code_max):
    out = str(tmp_path / "o.safetensors")
    result = quant_core.quantize(input=flux_file, output=out, format=fmt, static_activations=True,
                                 calibration_data=calib, verify="full")
    assert result.verify.ok
    with SafetensorsReader(out) as reader:
        scale = reader.get_tensor(f"{LAYER}.input_scale")
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert float(scale) == pytest.approx(8.96 / code_max, rel=1e-6)  # from input_absmax
        # the stored scale (made for E4M3: absmax / 448) wins, rescaled to this format's largest activation code
        assert float(reader.get_tensor(f"{OTHER}.input_scale")) == pytest.approx(0.125 * 448.0 / code_max, rel=1e-6)
        assert not any(k.endswith(".input_scale") and not k.startswith((LAYER, OTHER)) for k in reader.keys())
    assert any("stay dynamic (no input_scale or input_absmax" in n for n in result.notes)


@pytest.mark.parametrize("fmt", ["int8", "mxfp8"])
def test_no_input_scale_for_formats_comfyui_ignores_it_for(flux_file, tmp_path, calib, fmt):
    out = str(tmp_path / "o.safetensors")
    result = quant_core.quantize(input=flux_file, output=out, format=fmt, static_activations=True,
                                 calibration_data=calib)
    with SafetensorsReader(out) as reader:
        assert not any(k.endswith(".input_scale") for k in reader.keys())
    assert any("ComfyUI reads no input_scale" in n for n in result.notes)


def test_without_calibration_data_static_activations_are_refused(cli, flux_file, tmp_path):
    """A setting without effect is refused (it used to warn and write dynamic scales)."""
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli("-i", flux_file, "-o", out, "--fp8", "--static-activations")
    assert code == 2 and "--static-activations needs --calibration-data" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_verify_rejects_bad_input_scales(flux_file, tmp_path, calib):
    out = str(tmp_path / "o.safetensors")
    quant_core.quantize(input=flux_file, output=out, format="nvfp4", static_activations=True, calibration_data=calib)
    with SafetensorsReader(out) as reader:
        tensors = {k: reader.get_tensor(k) for k in reader.keys()}
        metadata = reader.metadata()
    for bad, message in ((torch.tensor(0.0), "must be positive"), (torch.ones(4), "input_scale has shape [4]")):
        tensors[f"{LAYER}.input_scale"] = bad
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
        result = verify_file(str(tmp_path / "bad.safetensors"))
        assert any(message in d for d in result.defects), result.defects
