"""Time of the automatic mixed-precision search (`--auto-bits`) on a Flux-dev-sized model, next to the conversion.

Builds the synthetic bf16 Flux-shaped checkpoint of benchmarks/bench.py (19 double + 38 single blocks by default:
11.9 B parameters, 23.8 GB) and, with `--calibration samples` (the default), a calibration file marked as recorded
with what the chooser reads per layer: input moments, 128 input rows (bf16) and output gains — no Hessians (0.5 GB
for Flux-dev; with Hessians, `--calibration hessian` for `--method gptq`, it would be 68 GB: use `--size-gb 6`, 17 GB).
Then, each through the library on `--device` (CUDA when present):

1. a uniform conversion (`--uniform nvfp4`): the reference time;
2. the automatic one (`--auto-bits B --target-gpu T`), timing the search (the measuring pass over every layer's
   candidates, and the knapsack) separately from the conversion that follows.

Prints one table and, with --json, the figures. The search streams the model once more than a conversion and
computes every candidate's codes and emulated output for each layer (5-6 candidates on Blackwell), so expect a few
conversion times.

    python benchmarks/auto_search_gpu.py [--blocks 19,38 | --size-gb 2.5] [--workdir DIR] [--target blackwell]
                                         [--bits 6] [--method rtn] [--calibration samples] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import torch  # noqa: E402

import quant_core  # noqa: E402
from bench import FLUX_DEV_BLOCKS, blocks_for_size, build_checkpoint, flux_layers  # noqa: E402
from quant_core.calib.file import write_calibration_stream  # noqa: E402
from quant_core.calib.stats import InputStats  # noqa: E402
from quant_core.select import auto as auto_module  # noqa: E402

SAMPLE_ROWS = 128


def build_calibration(path: str, shapes: dict[str, tuple[int, int]], hessian: bool) -> None:
    """Per layer: moments, SAMPLE_ROWS rows with a few outlier channels (bf16), output gains; Hessians if asked.
    Written one layer at a time (calib.file.write_calibration_stream)."""
    layout = {}
    for layer, (n, k) in shapes.items():
        layout[layer] = {"input_absmax": (k,), "input_mean_sq": (k,), "input_mean": (k,), "n_tokens": (),
                         "input_sample": (SAMPLE_ROWS, k), "output_gain": (n,),
                         **({"hessian": (k, k)} if hessian else {})}
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def produce(layer: str) -> InputStats:
        n, k = shapes[layer]
        g = torch.Generator(device).manual_seed(zlib.crc32(layer.encode()))
        x = torch.randn(4 * SAMPLE_ROWS, k, generator=g, device=device)
        x[:, :8] *= 20  # outlier channels, as real activations have
        gain = torch.rand(n, generator=g, device=device) * (2.0 if "single" in layer else 1.0)
        return InputStats(x.abs().amax(0), (x * x).mean(0), x.shape[0], (x.T @ x / x.shape[0]) if hessian else None,
                          x.mean(0), input_sample=x[:SAMPLE_ROWS].bfloat16(), output_gain=gain)
    write_calibration_stream(path, layout, produce, "synthetic benchmark rows (auto_search_gpu.py)", overwrite=True,
                             metadata={"inputs": "recorded", "output_energy": "1.0"})


class Timed:
    """Wraps a module function, adding up its wall time (CUDA synchronized)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.seconds = module, name, 0.0
        self.original = getattr(module, name)

    def __enter__(self):
        def timed(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                _sync()
                self.seconds += time.perf_counter() - start
        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default=",".join(map(str, FLUX_DEV_BLOCKS)), help="double,single blocks")
    parser.add_argument("--size-gb", type=float, help="instead of --blocks: blocks for about this many GB")
    parser.add_argument("--workdir", help="where the checkpoint and outputs go (default: a temporary folder)")
    parser.add_argument("--target", default="blackwell", choices=list(auto_module.TARGETS))
    parser.add_argument("--bits", type=float, default=6.0, help="--auto-bits")
    parser.add_argument("--uniform", default="nvfp4", help="the uniform conversion timed beside it")
    parser.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    parser.add_argument("--calibration", default="samples", choices=("none", "samples", "hessian"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args(argv)
    double, single = blocks_for_size(args.size_gb) if args.size_gb else map(int, args.blocks.split(","))
    shapes, _ = flux_layers(double, single)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        model = os.path.join(workdir, "flux.safetensors")
        start = time.perf_counter()
        build_checkpoint(model, double, single)
        print(f"checkpoint: {double} double + {single} single blocks, {os.path.getsize(model) / 1e9:.2f} GB, "
              f"{len(shapes)} Linear layers ({time.perf_counter() - start:.0f} s to build)", flush=True)
        settings = dict(device=args.device, method=args.method, verify="cheap")
        if args.calibration != "none":
            calib = os.path.join(workdir, "calib.safetensors")
            build_calibration(calib, shapes, args.calibration == "hessian")
            settings["calibration_data"] = calib
        figures = {"model_gb": os.path.getsize(model) / 1e9, "layers": len(shapes), "device": args.device,
                   "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                   "target": args.target, "bits": args.bits, "method": args.method, "calibration": args.calibration}
        uniform = quant_core.quantize(model, os.path.join(workdir, "uniform.safetensors"), format=args.uniform,
                                      overwrite=True, **settings)
        figures["uniform_format"], figures["uniform_seconds"] = args.uniform, uniform.seconds
        print(f"uniform {args.uniform}: {uniform.seconds:.1f} s", flush=True)
        os.remove(uniform.output)
        with Timed(auto_module, "choose_formats") as search, Timed(auto_module, "solve") as solve:
            result = quant_core.quantize(model, os.path.join(workdir, "auto.safetensors"), auto_bits=args.bits,
                                         target_gpu=args.target, overwrite=True, **settings)
        auto = result.report.auto
        figures.update(auto_seconds=result.seconds, search_seconds=search.seconds, knapsack_seconds=solve.seconds,
                       conversion_after_search_seconds=result.seconds - search.seconds,
                       peak_gpu_bytes=result.peak_gpu_bytes, chosen_bits=auto.bits(auto.chosen_bytes()),
                       mix=auto.mix(), exact=auto.exact, cell_bytes=auto.cell, summary=auto.summary())
    print(f"\n{'':<34} {'seconds':>9}")
    print(f"{'uniform ' + args.uniform + ' conversion':<34} {figures['uniform_seconds']:9.1f}")
    print(f"{'auto: search (measure + knapsack)':<34} {figures['search_seconds']:9.1f}")
    print(f"{'  of which the knapsack':<34} {figures['knapsack_seconds']:9.2f}")
    print(f"{'auto: conversion after the search':<34} {figures['conversion_after_search_seconds']:9.1f}")
    print(f"{'auto: total':<34} {figures['auto_seconds']:9.1f}")
    peak = figures["peak_gpu_bytes"]
    print(f"peak GPU memory {peak / 2 ** 30:.2f} GiB" if peak else "ran on the CPU")
    print(figures["summary"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
