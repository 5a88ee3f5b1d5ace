"""The run-time emulation (quant_core/quantization/runtime.py) against comfy-kitchen's CUDA kernels on the GPU at hand:
each layer is quantized by the converter's formats, then computed twice — by comfy-kitchen's layouts (the path
ComfyUI's quantized Linear takes: F.linear on a QuantizedTensor; for FP8 an input quantized the way ComfyUI's FP8
layout does, scale 1.0 or the static input_scale) and by `runtime.emulate` for this GPU's class — and compared.
The activation quantizers of other classes (INT4 for W4A4 on Ampere/Ada, NVFP4 and MXFP8 for Blackwell) are compared
with comfy-kitchen's eager reference, codes and scales, where their CUDA kernels run on this GPU.

Agreement is the SQNR (dB) of the emulation against the kernel's output; for contrast, the kernel's output against
the weights-only product x·Ŵᵀ (what activation quantization costs) and against the emulation of another class.

    python benchmarks/runtime_kernels_gpu.py [--rows 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quant_core.quantization.formats import make_format  # noqa: E402
from quant_core.quantization.runtime import GPU_CLASSES, emulate, runtime  # noqa: E402


def gpu_class() -> str:
    major, minor = torch.cuda.get_device_capability()
    if major >= 10:
        return "blackwell"
    if major == 9:
        return "hopper"
    return "ada" if (major, minor) >= (8, 9) else "ampere"


def db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (other.float() - reference.float()).square().sum()
    return float(10 * torch.log10(reference.float().square().sum() / noise)) if noise > 0 else float("inf")


def layer(family: str, n: int, k: int, g: torch.Generator, **opts):
    """(marker, stored tensors on the GPU, fp32 reconstruction on the GPU, the weight on the GPU) of a random
    weight with outlier columns."""
    weight = torch.randn(n, k, generator=g) / k ** 0.5
    weight[:, :3] *= 6
    fmt = make_format(family, **opts)
    grid = fmt.grid(weight.clone())
    codes = fmt.round(grid.work / grid.scale)
    packed = {s: t.cuda() for s, t in fmt.pack(codes.clone(), grid).items()}
    return fmt.marker(), packed, fmt.reconstruct(codes, grid).cuda(), weight.cuda()


def kitchen_linear(marker: dict, packed: dict, x: torch.Tensor, shape, input_scale=None) -> torch.Tensor:
    """y = x·Ŵᵀ through comfy-kitchen's layout ops, as ComfyUI's mixed-precision Linear calls them."""
    from comfy_kitchen.tensor import (QuantizedTensor, TensorCoreConvRotW4A4Layout, TensorCoreFP8Layout,
                                      TensorWiseINT8Layout)
    name, dtype = marker["format"], x.dtype
    if name == "int8_tensorwise":
        params = TensorWiseINT8Layout.Params(scale=packed["weight_scale"], orig_dtype=dtype, orig_shape=shape,
                                             convrot=bool(marker.get("convrot")),
                                             convrot_groupsize=marker.get("convrot_groupsize", 256))
        return torch.nn.functional.linear(x, QuantizedTensor(packed["weight"], "TensorWiseINT8Layout", params))
    if name == "convrot_w4a4":
        params = TensorCoreConvRotW4A4Layout.Params(scale=packed["weight_scale"], orig_dtype=dtype, orig_shape=shape,
                                                    convrot_groupsize=marker["convrot_groupsize"],
                                                    quant_group_size=64,
                                                    linear_dtype=marker.get("linear_dtype", "int4"))
        return torch.nn.functional.linear(x, QuantizedTensor(packed["weight"], "TensorCoreConvRotW4A4Layout", params))
    params = TensorCoreFP8Layout.Params(scale=packed["weight_scale"], orig_dtype=dtype, orig_shape=shape)
    weight = QuantizedTensor(packed["weight"], "TensorCoreFP8Layout", params)
    scale = torch.ones((), device=x.device) if input_scale is None else input_scale  # ComfyUI's FP8 layout
    qx, qparams = TensorCoreFP8Layout.quantize(x, scale=scale)
    return torch.nn.functional.linear(QuantizedTensor(qx, "TensorCoreFP8Layout", qparams), weight)


def fp32_rotation(x: torch.Tensor, approx: torch.Tensor, marker: dict, rt) -> torch.Tensor | None:
    """The emulation with the rotation done in fp32 (as a fused CUDA rotate-and-quantize kernel may), for contrast."""
    from quant_core.quantization.formats.int8 import rotate
    from quant_core.quantization.runtime import _int4_rows, _int8_rows
    group = marker.get("convrot_groupsize", 256) if marker.get("convrot") or marker["format"] == "convrot_w4a4" else 0
    if not group or rt.quantize is None:
        return None
    inner = _int4_rows if "INT4 per row" in rt.activations else _int8_rows
    return (rotate(inner(rotate(x.float(), group)), group) @ approx.T).bfloat16().float()


def linear_cases(rows: int, g: torch.Generator) -> list[dict]:
    here = gpu_class()
    other = {"hopper": "ampere", "blackwell": "ampere", "ampere": "hopper", "ada": "hopper"}[here]
    cases = [("int8 per-row", "int8", {}, None), ("int8 ConvRot G=256", "int8", {"convrot_group": 256}, None),
             ("int8 ConvRot G=64", "int8", {"convrot_group": 64}, None),
             ("int4 G=256", "int4", {"convrot_group": 256}, None), ("int4 G=64", "int4", {"convrot_group": 64}, None),
             ("int4 G=256 linear_dtype int8", "int4", {"convrot_group": 256, "int4_linear_dtype": "int8"}, None)]
    if GPU_CLASSES[here].fp8:
        cases += [("fp8 e4m3, no input_scale", "fp8", {}, None), ("fp8 e4m3, input_scale", "fp8", {}, "static")]
    out = []
    for label, family, opts, static in cases:
        n, k = 3072, 3072
        marker, packed, approx, weight = layer(family, n, k, g, **opts)
        x = (torch.randn(rows, k, generator=g) * 2).cuda()
        x[:, 5:8] *= 30  # activation outlier channels
        x = x.bfloat16()
        input_scale = (x.float().abs().max() / 448).reshape(()) if static else None
        with torch.no_grad():
            kernel = kitchen_linear(marker, packed, x, (n, k), input_scale).float()
            mine = emulate(x, approx, runtime(marker, input_scale, here))
            theirs = emulate(x, approx, runtime(marker, input_scale, other))
            weights_only = x.float() @ approx.T
            exact = x.float() @ weight.T
        out.append({"case": label, "class": here, "emulation_vs_kernel_db": db(kernel, mine),
                    f"{other}_emulation_vs_kernel_db": db(kernel, theirs),
                    "weights_only_vs_kernel_db": db(kernel, weights_only),
                    "kernel_sqnr_db": db(exact, kernel), "emulated_sqnr_db": db(exact, mine),
                    "weights_only_sqnr_db": db(exact, weights_only),
                    "activations": runtime(marker, input_scale, here).activations})
        fp32 = fp32_rotation(x, approx, marker, runtime(marker, input_scale, here))
        if fp32 is not None:
            out[-1]["fp32_rotation_vs_kernel_db"] = db(kernel, fp32)
            out[-1]["fp32_rotation_sqnr_db"] = db(exact, fp32)
        print(json.dumps(out[-1]), flush=True)
    return out


def quantizer_cases(rows: int, g: torch.Generator) -> list[dict]:
    """CUDA activation quantizers of the other classes against comfy-kitchen's eager reference."""
    import comfy_kitchen as ck
    from comfy_kitchen.backends import cuda
    from comfy_kitchen.backends.eager import quantization as eager
    from comfy_kitchen.backends.eager.convrot_w4a4 import (_build_hadamard, _rotate_activation,
                                                           quantize_signed_int4_rowwise)
    x = (torch.randn(rows, 3072, generator=g) * 2)
    x[:, 5:8] *= 30
    x = x.bfloat16().cuda()
    out = []

    def record(label, fn):
        try:
            out.append({"case": label, **fn()})
        except Exception as e:  # a kernel this GPU cannot run
            out.append({"case": label, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps(out[-1]), flush=True)

    def int4(group):
        def run():
            q_gpu, s_gpu = cuda.quantize_int4_rowwise_convrot64(x, group)
            h = _build_hadamard(group, device=x.device, dtype=x.dtype)
            q_ref, s_ref = quantize_signed_int4_rowwise(_rotate_activation(x, h, group))
            return {"codes_equal": float((q_gpu == q_ref).float().mean()),
                    "scale_rel_diff": float(((s_gpu.reshape(-1) - s_ref.reshape(-1)).abs() / s_ref.reshape(-1)).max())}
        return run

    def nvfp4():
        scale = (x.abs().amax() / 2688).float()
        q_gpu, b_gpu = ck.quantize_nvfp4(x, scale)
        q_ref, b_ref = eager.quantize_nvfp4(x, scale)
        return {"codes_equal": float((q_gpu == q_ref).float().mean()),
                "block_scales_equal": float((b_gpu.view(torch.uint8) == b_ref.view(torch.uint8)).float().mean())}

    def mxfp8():
        q_gpu, b_gpu = ck.quantize_mxfp8(x)
        q_ref, b_ref = eager.quantize_mxfp8(x)
        return {"codes_equal": float((q_gpu.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean()),
                "block_scales_equal": float((b_gpu.view(torch.uint8) == b_ref.view(torch.uint8)).float().mean())}
    record("INT4 per-row activations after rotation G=256 (W4A4: Ampere, Ada)", int4(256))
    record("INT4 per-row activations after rotation G=64", int4(64))
    record("NVFP4 activations, dynamic global scale (Blackwell)", nvfp4)
    record("MXFP8 activations (Blackwell)", mxfp8)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    import comfy_kitchen as ck
    print(f"{torch.cuda.get_device_name()} (sm {torch.cuda.get_device_capability()}), torch {torch.__version__}, "
          f"comfy-kitchen backends {list(ck.list_backends())}: class {gpu_class()}", flush=True)
    g = torch.Generator().manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "linear": linear_cases(args.rows, g),
              "quantizers": quantizer_cases(args.rows, g)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
