"""Benchmark: learned rounding time per layer, quant_core vs convert-to-quant (`ctq`) on the same weight.

One Flux-sized Linear weight (default 3072×12288, bf16, seeded) is written to a temporary file; quant_core's learned
rounding (original / adamw / radam, the seed manual's settings) and RTN run on it in this process, and ctq's own
learned rounding (`LearnedRoundingConverter.convert`, with the defaults of ctq's CLI: prodigy, 4000 iterations,
lr 1.0, plateau; plus ctq's `original` optimizer with the manual's settings) runs on the same file in a child
process with ctq's Python. Printed: seconds for the layer (grid + codes, CUDA synchronized), iterations actually
run, seconds per iteration, and the weight SQNR (dB) of the result.

    python benchmarks/bench_learned_gpu.py --device cuda [--ctq-python /path/to/ctq/venv/bin/python]
    python benchmarks/bench_learned_gpu.py --device cpu --shape 384 1536 --ctq-num-iter 300   # small, on CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quant_core.quantization.formats import make_format  # noqa: E402
from quant_core.quantization.methods.learned import LearnedConfig, LearnedRounding  # noqa: E402
from quant_core.quantization.methods.rtn import RoundToNearest  # noqa: E402

FORMATS = {"fp8": ("fp8", "tensor"), "int8": ("int8", "row")}  # ours -> ctq (target_format, scaling_mode)
# ctq 1.3.4's CLI defaults (cli/main.py), what `ctq -i model.safetensors` runs
CTQ_DEFAULTS = dict(optimizer="prodigy", num_iter=4000, lr=1.0, lr_schedule="plateau", lr_patience=1, lr_factor=0.95,
                    lr_min=1e-8, lr_cooldown=0, early_stop_loss=5e-9, early_stop_lr=1.01e-8, early_stop_stall=2000,
                    top_p=0.2, min_k=256, max_k=1280)
# the seed manual's `original` settings (= quant_core's LearnedConfig defaults)
CTQ_ORIGINAL = dict(CTQ_DEFAULTS, optimizer="original", num_iter=1000, lr=0.008077, lr_schedule="adaptive",
                    lr_patience=9, lr_factor=0.92, lr_min=1e-10, lr_cooldown=6, early_stop_loss=1e-8,
                    early_stop_lr=1e-10, early_stop_stall=1000, min_k=64, max_k=1024)

CTQ_CHILD = r"""
import json, math, sys, time, torch
from safetensors.torch import load_file
from convert_to_quant.converters.learned_rounding import LearnedRoundingConverter
args = json.loads(sys.argv[1])
w = load_file(args["path"])["w"].to(args["device"])
conv = LearnedRoundingConverter(scaling_mode=args["scaling"], target_format=args["format"], device=args["device"],
                                **args["settings"])
calls = [0]
orig = torch.linalg.norm
def counting_norm(*a, **k):
    calls[0] += 1
    return orig(*a, **k)
torch.linalg.norm = counting_norm  # one loss norm per iteration in every ctq optimizer loop
if args["device"] == "cuda": torch.cuda.synchronize()
t = time.perf_counter()
q, scale, deq, _ = conv.convert(w, key="bench.weight", has_bias=False)
if args["device"] == "cuda": torch.cuda.synchronize()
seconds = time.perf_counter() - t
wf = w.float()
noise = float((deq.float() - wf).pow(2).sum())
print(json.dumps({"seconds": seconds, "iterations": calls[0],
                  "sqnr": 10 * math.log10(float(wf.pow(2).sum()) / noise) if noise else float("inf")}))
"""


def weight_sqnr(weight: torch.Tensor, rebuilt: torch.Tensor) -> float:
    noise = float((rebuilt - weight).pow(2).sum())
    return 10 * math.log10(float(weight.pow(2).sum()) / noise) if noise else math.inf


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(weight: torch.Tensor, family: str, optimizer: str | None, num_iter: int, device: str):
    fmt = make_format(family)
    method = RoundToNearest() if optimizer is None else LearnedRounding(LearnedConfig(optimizer=optimizer,
                                                                                       num_iter=num_iter))
    if device.startswith("cuda") and optimizer is not None:
        method.compute_dtype = torch.bfloat16 if weight.numel() >= 1_000_000 else torch.float32  # --bf16-compute auto
    w = weight.to(device).float()
    sync(device)
    start = time.perf_counter()
    grid = fmt.grid(w)
    codes = method.codes(fmt, grid, "bench")
    sync(device)
    seconds = time.perf_counter() - start
    iterations = getattr(method, "last_iterations", 0)
    return seconds, iterations, weight_sqnr(w, fmt.reconstruct(codes, grid))


def run_ctq(path: str, family: str, settings: dict, device: str, python: str):
    target, scaling = FORMATS[family]
    payload = json.dumps({"path": path, "format": target, "scaling": scaling, "settings": settings, "device": device})
    proc = subprocess.run([python, "-c", CTQ_CHILD, payload], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return (result["seconds"], result["iterations"], result["sqnr"]), ""


def row(tool, family, optimizer, seconds, iterations, sqnr):
    per_iter = f"{seconds / iterations * 1e3:.2f}" if iterations else "-"
    print(f"| {tool} | {family} | {optimizer} | {iterations} | {seconds:.2f} | {per_iter} | {sqnr:.2f} |", flush=True)


def main(argv=None) -> int:
    default_ctq = "/work/ctq-venv/bin/python" if os.path.exists("/work/ctq-venv/bin/python") else sys.executable
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=2, type=int, default=[3072, 12288], metavar=("N", "K"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--num-iter", type=int, default=1000, help="quant_core learned rounding iterations")
    parser.add_argument("--ctq-python", default=default_ctq, help="a Python with convert_to_quant installed")
    parser.add_argument("--ctq-num-iter", type=int, default=None, help="override ctq's iteration counts (CPU runs)")
    parser.add_argument("--skip-ctq", action="store_true")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(*args.shape, generator=g) * 0.02).to(torch.bfloat16)
    print(f"one {args.shape[0]}x{args.shape[1]} bf16 weight, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    print("| tool | format | optimizer | iterations | seconds | ms/iter | weight SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.safetensors")
        save_file({"w": weight}, path)
        for family in args.formats:
            for optimizer in (None, "original", "adamw", "radam"):
                seconds, iterations, sqnr = run_ours(weight, family, optimizer, args.num_iter, args.device)
                row("quant_core", family, optimizer or "rtn", seconds, iterations, sqnr)
            if args.skip_ctq:
                continue
            for label, settings in (("ctq default (prodigy)", CTQ_DEFAULTS), ("ctq original", CTQ_ORIGINAL)):
                if args.ctq_num_iter is not None:
                    settings = dict(settings, num_iter=args.ctq_num_iter)
                result, error = run_ctq(path, family, settings, args.device, args.ctq_python)
                if result is None:
                    print(f"| ctq | {family} | {label} | failed: {error[:120]} | | | |", flush=True)
                else:
                    row("ctq 1.3.4", family, label, *result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
