"""`python -m quant_core demo`: build a small Flux-shaped checkpoint, convert it to every upstream format, verify
each against the source through comfy-kitchen and print a table."""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from ..pipeline import convert
from ..job import Job
from ..verify import verify_file

DEMO_RUNS = [  # (label, options)
    ("int8 per-row (default)", dict(format="int8")),
    ("int8 per-tensor", dict(format="int8", scaling_mode="tensor")),
    ("int8 per-row + ConvRot 64", dict(format="int8", convrot=True, convrot_group_size=64)),
    ("int4 (ConvRot W4A4) 64", dict(format="int4", convrot_group_size=64)),
    ("fp8 e4m3fn", dict(format="fp8")),
    ("fp8 e5m2", dict(format="fp8_e5m2")),
    ("nvfp4", dict(format="nvfp4")),
    ("mxfp8", dict(format="mxfp8")),
    ("fp16 (no markers)", dict(format="fp16")),
]


def flux_shaped_checkpoint(hidden: int = 512, double: int = 2, single: int = 4, seed: int = 0) -> dict:
    """Flux key names and shape relations at a small hidden size (bf16), with a few outlier columns."""
    g = torch.Generator().manual_seed(seed)

    def linear(prefix: str, n: int, k: int) -> dict:
        weight = torch.randn(n, k, generator=g) * (1.0 / k ** 0.5)
        weight[:, torch.randint(0, k, (2,), generator=g)] *= 8  # real weights have outlier input channels
        return {f"{prefix}.weight": weight.bfloat16(), f"{prefix}.bias": (torch.randn(n, generator=g) * 0.01).bfloat16()}

    h, mlp = hidden, 4 * hidden
    sd = linear("img_in", h, 64) | linear("txt_in", h, 256) | linear("time_in.in_layer", h, 256)
    sd |= linear("time_in.out_layer", h, h) | linear("vector_in.in_layer", h, 256) | linear("vector_in.out_layer", h, h)
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            sd |= linear(p + "mod.lin", 6 * h, h) | linear(p + "attn.qkv", 3 * h, h) | linear(p + "attn.proj", h, h)
            sd |= linear(p + "mlp.0", mlp, h) | linear(p + "mlp.2", h, mlp)
            sd[p + "attn.norm.query_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
            sd[p + "attn.norm.key_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
    for i in range(single):
        p = f"single_blocks.{i}."
        sd |= linear(p + "linear1", 3 * h + mlp, h) | linear(p + "linear2", h, h + mlp) | linear(p + "modulation.lin", 3 * h, h)
        sd[p + "norm.query_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
        sd[p + "norm.key_norm.scale"] = torch.ones(h // 8, dtype=torch.bfloat16)
    sd |= linear("final_layer.linear", 64, h) | linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return sd


def run_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="convert_to_quant demo", description=__doc__)
    parser.add_argument("--keep", metavar="DIR", help="write the files into DIR and keep them")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        source = os.path.join(folder, "flux_demo.safetensors")
        save_file(flux_shaped_checkpoint(), source, metadata={"modelspec.title": "quant_core demo"})
        print(f"source: {source} ({os.path.getsize(source) / 1e6:.1f} MB, Flux-shaped, bf16)")
        print(f"{'format':<28} {'size MB':>8} {'ratio':>6} {'layers':>6} {'mean SQNR dB':>13} {'worst dB':>9}  verify")
        failures = 0
        for label, opts in DEMO_RUNS:
            out = os.path.join(folder, f"flux_demo_{label.split()[0]}_{len(opts)}_{opts.get('scaling_mode', '')}.safetensors")
            result = convert(source, out, Job.build(dict(progress=False, overwrite=True, **opts)))
            check = verify_file(out, reference=source)
            failures += not check.ok
            layers = result.report.layers
            worst = f"{layers[0].sqnr_db:9.1f}" if layers else f"{'-':>9}"
            mean = f"{result.report.mean_sqnr():13.1f}" if layers else f"{'-':>13}"
            print(f"{label:<28} {result.output_bytes / 1e6:8.2f} {result.input_bytes / result.output_bytes:6.2f} "
                  f"{len(layers):6d} {mean} {worst}  {'ok' if check.ok else 'FAILED: ' + check.defects[0]}")
        return 1 if failures else 0
