"""Per-layer time of every quant_core method on one large layer (default 3072×12288, a Flux-sized MLP weight),
next to convert-to-quant (ctq) 1.3.4's learned rounding on the same weight. Prints a table.

Inputs are synthetic but correlated (low-rank plus noise, non-zero mean) so that the methods have something to
exploit; output SQNR is measured on held-out inputs of the same distribution. Times are wall-clock on the device
with torch.cuda.synchronize(), after one warm-up run of each method on a small layer; the Hessian is computed
beforehand (calibration is a separate step) and is not part of a method's time.

    PYTHONPATH=$PWD python benchmarks/bench_methods_gpu.py [--n 3072 --k 12288] [--ctq-iters 4000] [--skip-ctq]

ctq must be importable (pip install convert_to_quant prodigy-plus-schedule-free) for its rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quant_core.calib import StatsAccumulator  # noqa: E402
from quant_core.quantization.formats import make_format  # noqa: E402
from quant_core.quantization.methods import METHODS, get_method  # noqa: E402


def inputs(tokens: int, k: int, rank: int, device, seed: int) -> torch.Tensor:
    """x = z·A + 0.1·noise + offset: most energy in a rank-`rank` subspace, like real activations."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    basis = (torch.randn(rank, k, generator=g) / rank ** 0.5).to(device)
    offset = (torch.randn(k, generator=g) * 0.3).to(device)
    g2 = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g2).to(device)
    return z @ basis + 0.1 * torch.randn(tokens, k, generator=g2).to(device) + offset


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def output_sqnr(weight, approx, x) -> float:
    return float(10 * torch.log10((x @ weight.T).pow(2).sum() / (x @ (weight - approx).T).pow(2).sum()))


def time_method(name, fmt, weight, stats, device):
    method = get_method(name)
    sync(device)
    start = time.perf_counter()
    grid = fmt.grid(weight.clone())
    codes = method.codes(fmt, grid, "bench", stats)
    approx = fmt.reconstruct(codes, grid)
    sync(device)
    return time.perf_counter() - start, approx


def warm_up(device):
    w = torch.randn(256, 1024, device=device)
    acc = StatsAccumulator(1024, device=device)
    acc.add(inputs(512, 1024, 64, device, 0))
    for name in METHODS:
        for fmt in (make_format("int8"), make_format("int8", "row", 128, 256)):
            time_method(name, fmt, w, acc.result(), device)


def quant_core_rows(weight, stats, heldout, device) -> list[tuple[str, str, float, float]]:
    rows = []
    formats = [("int8 per-row", make_format("int8")), ("int8 ConvRot256", make_format("int8", "row", 128, 256)),
               ("fp8 e4m3", make_format("fp8"))]
    for label, fmt in formats:
        for name in METHODS:
            stats_for = stats if getattr(get_method(name), "needs_stats", False) else None
            seconds, approx = time_method(name, fmt, weight, stats_for, device)
            rows.append((f"quant_core {name}", label, seconds, output_sqnr(weight, approx, heldout)))
            print_row(rows[-1])
    return rows


def ctq_rows(weight, heldout, iters: int, device) -> list[tuple[str, str, float, float]]:
    os.environ.setdefault("TQDM_DISABLE", "1")  # ctq's per-iteration progress bars
    try:
        from convert_to_quant.converters.learned_rounding import LearnedRoundingConverter
    except ImportError as e:
        print(f"ctq not importable ({e}): its rows are skipped")
        return []
    rows = []
    for optimizer in ("prodigy", "original"):  # prodigy: ctq 1.3.4's CLI default; original: the seed manual's
        converter = LearnedRoundingConverter(optimizer=optimizer, num_iter=iters, scaling_mode="row",
                                             target_format="int8", device=str(device))
        sync(device)
        start = time.perf_counter()
        out = converter.convert(weight.clone(), key="bench.weight")
        sync(device)
        seconds = time.perf_counter() - start
        dequantized = out[2] if isinstance(out, tuple) and len(out) > 2 and out[2].shape == weight.shape else None
        sqnr = output_sqnr(weight, dequantized.float().to(device), heldout) if dequantized is not None else float("nan")
        rows.append((f"ctq learned ({optimizer}, {iters} it)", "int8 per-row", seconds, sqnr))
        print_row(rows[-1])
    return rows


def print_row(row):
    print(f"{row[0]:<34} {row[1]:<16} {row[2]:9.3f} {row[3]:9.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--k", type=int, default=12288)
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens (held-out: half as many)")
    parser.add_argument("--ctq-iters", type=int, default=4000, help="ctq --num_iter (its CLI default: 4000)")
    parser.add_argument("--skip-ctq", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 Hessian algebra, as on the CPU
    weight = torch.randn(args.n, args.k, generator=torch.Generator().manual_seed(0)).to(device) * 0.02
    acc = StatsAccumulator(args.k, device=device)
    for chunk in range(0, args.tokens, 2048):
        acc.add(inputs(min(2048, args.tokens - chunk), args.k, 256, device, seed=chunk + 1))
    stats = acc.result()
    heldout = inputs(args.tokens // 2, args.k, 256, device, seed=999_999)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"layer {args.n}×{args.k} on {name}, torch {torch.__version__}, {args.tokens} calibration tokens")
    print(f"{'method':<34} {'format':<16} {'s/layer':>9} {'out dB':>9}")
    warm_up(device)
    rows = quant_core_rows(weight, stats, heldout, device)
    if not args.skip_ctq:
        rows += ctq_rows(weight, heldout, args.ctq_iters, device)
    gptq = next((r[2] for r in rows if r[0] == "quant_core gptq" and r[1] == "int8 per-row"), None)
    ctq = next((r[2] for r in rows if r[0].startswith("ctq learned (prodigy")), None)
    if gptq and ctq:
        print(f"GPTQ (int8 per-row) is {ctq / gptq:.1f}× faster than ctq's default learned rounding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
