"""Benchmark: quant_core vs convert-to-quant (`ctq`) on a synthetic Flux-shaped checkpoint.

Builds a bf16 checkpoint with Flux-dev's layer shapes (hidden 3072, MLP 12288; the number of blocks sets the size),
runs each converter as a child process on the same file and machine, and prints a table: tool, format, seconds,
GB/s of input, peak RSS (the child's ru_maxrss), mean weight SQNR (every layer rebuilt through comfy-kitchen's
layouts by `verify`), and whether upstream ComfyUI's contract holds. Page cache is warm for every run (the file was
just written and each run reads it in full).

    python benchmarks/bench_convert.py --size-gb 2.5 [--ctq /path/to/ctq] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HIDDEN, MLP = 3072, 12288
DOUBLE_BLOCK = {"img_attn.qkv": (3 * HIDDEN, HIDDEN), "img_attn.proj": (HIDDEN, HIDDEN), "img_mlp.0": (MLP, HIDDEN),
                "img_mlp.2": (HIDDEN, MLP), "img_mod.lin": (6 * HIDDEN, HIDDEN), "txt_attn.qkv": (3 * HIDDEN, HIDDEN),
                "txt_attn.proj": (HIDDEN, HIDDEN), "txt_mlp.0": (MLP, HIDDEN), "txt_mlp.2": (HIDDEN, MLP),
                "txt_mod.lin": (6 * HIDDEN, HIDDEN)}
SINGLE_BLOCK = {"linear1": (3 * HIDDEN + MLP, HIDDEN), "linear2": (HIDDEN, HIDDEN + MLP), "modulation.lin": (3 * HIDDEN, HIDDEN)}
IO_LAYERS = {"img_in": (HIDDEN, 64), "txt_in": (HIDDEN, 4096), "time_in.in_layer": (HIDDEN, 256),
             "time_in.out_layer": (HIDDEN, HIDDEN), "vector_in.in_layer": (HIDDEN, 768),
             "vector_in.out_layer": (HIDDEN, HIDDEN), "final_layer.linear": (64, HIDDEN),
             "final_layer.adaLN_modulation.1": (2 * HIDDEN, HIDDEN)}


def layer_shapes(size_gb: float) -> dict[str, tuple[int, int]]:
    """Flux layer shapes, blocks added (double, then single, alternating 1:2 like Flux's 19:38) until size_gb."""
    shapes = dict(IO_LAYERS)
    double = single = 0
    while sum(n * k * 2 for n, k in shapes.values()) < size_gb * 1e9:
        if single >= 2 * double:
            shapes |= {f"double_blocks.{double}.{name}": s for name, s in DOUBLE_BLOCK.items()}
            double += 1
        else:
            shapes |= {f"single_blocks.{single}.{name}": s for name, s in SINGLE_BLOCK.items()}
            single += 1
    return shapes


def build_checkpoint(path: str, size_gb: float) -> None:
    """Write the checkpoint tensor by tensor (never the whole model in memory)."""
    import torch

    from quant_core.io import StreamingWriter, header_reserve
    shapes = layer_shapes(size_gb)
    entries = [(f"{l}.{p}", "BF16", s if p == "weight" else (s[0],)) for l, s in shapes.items() for p in ("weight", "bias")]
    g = torch.Generator().manual_seed(0)
    with StreamingWriter(path, header_reserve(entries, {}), overwrite=True) as writer:
        for layer, (n, k) in shapes.items():
            weight = torch.randn(n, k, generator=g) * (1 / math.sqrt(k))
            weight[:, torch.randint(0, k, (4,), generator=g)] *= 10  # outlier input channels, as in real weights
            writer.add(f"{layer}.weight", weight.bfloat16())
            writer.add(f"{layer}.bias", (torch.randn(n, generator=g) * 0.01).bfloat16())
        writer.finish({"modelspec.title": "synthetic flux-shaped benchmark"})
        writer.publish()


def run_child(argv: list[str], cwd: str) -> tuple[float, float, int, str]:
    """Run a command; return (seconds, peak RSS in GB, exit code, tail of its output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024 ** 2, proc.returncode, output[-2000:]


def quality(output: str, source: str) -> tuple[float, str]:
    from quant_core.verify import verify_file
    result = verify_file(output, reference=source, allow_legacy=False)
    sqnr = [-20 * math.log10(l.rel_error) for l in result.layers if l.rel_error]
    mean = sum(sqnr) / len(sqnr) if sqnr else float("nan")
    return mean, "ok" if result.ok else f"{len(result.defects)} defects: {result.defects[0][:70]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.5)
    parser.add_argument("--ctq", default=shutil.which("ctq"), help="path of the ctq command (default: from PATH)")
    parser.add_argument("--workdir", help="where to put the files (default: a temp dir)")
    parser.add_argument("--formats", default="int8", help="comma list of: int8, fp8")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the per-layer SQNR / verify column (it re-reads every output against the input)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="quant_bench_")
    os.makedirs(workdir, exist_ok=True)
    source = os.path.join(workdir, "flux_synthetic.safetensors")
    shapes = layer_shapes(args.size_gb)
    if not os.path.exists(source):
        build_checkpoint(source, args.size_gb)
    size = os.path.getsize(source)
    largest = max(n * k for n, k in shapes.values())
    print(f"input: {source}: {size / 1e9:.2f} GB, {len(shapes)} Linear layers, largest tensor {largest * 2 / 1e9:.3f} GB bf16 "
          f"({largest * 4 / 1e9:.3f} GB as fp32)")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    runs = []
    for fmt in args.formats.split(","):
        # the same layer set as ctq, which quantizes every 2-D weight (io layers included)
        ours = [sys.executable, "-m", "quant_core", "-i", source, "--simple", "--format", fmt, "--no-progress",
                "--overwrite", "--quantize-io-layers", "--quantize-embeddings"]
        runs.append(("quant_core", fmt, "standard", ours + ["-o", os.path.join(workdir, f"ours_{fmt}.safetensors")]))
        runs.append(("quant_core", fmt, "--low-memory",
                     ours + ["--low-memory", "-o", os.path.join(workdir, f"ours_{fmt}_lm.safetensors")]))
        if args.ctq:
            ctq = [args.ctq, "-i", source, "--comfy_quant", "--simple", "--manual_seed", "1"]
            ctq += ["--int8", "--scaling_mode", "row"] if fmt == "int8" else ["--scaling_mode", "tensor"]
            runs.append(("ctq 1.3.4", fmt, "standard", ctq + ["-o", os.path.join(workdir, f"ctq_{fmt}.safetensors")]))
            runs.append(("ctq 1.3.4", fmt, "--low-memory",
                         ctq + ["--low-memory", "-o", os.path.join(workdir, f"ctq_{fmt}_lm.safetensors")]))
    rows = []
    for tool, fmt, mode, argv in runs:
        output = argv[argv.index("-o") + 1]
        seconds, rss, code, tail = run_child(argv, ROOT)
        if code != 0:
            rows.append((tool, fmt, mode, seconds, float("nan"), rss, float("nan"), f"exit {code}: {tail.strip()[-80:]}"))
            continue
        sqnr, verdict = (float("nan"), "not checked") if args.no_quality else quality(output, source)
        rows.append((tool, fmt, mode, seconds, size / seconds / 1e9, rss, sqnr, verdict))
        if not args.keep:
            os.unlink(output)
    print()
    print(f"{'tool':<11} {'format':<6} {'mode':<13} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>11} {'mean SQNR dB':>12}  verify")
    for tool, fmt, mode, seconds, rate, rss, sqnr, verdict in rows:
        print(f"{tool:<11} {fmt:<6} {mode:<13} {seconds:8.1f} {rate:6.2f} {rss:11.2f} {sqnr:12.2f}  {verdict}")
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    print()
    for tool, fmt, mode, seconds, *_ in rows:
        other = by_key.get(("ctq 1.3.4", fmt, mode))
        if tool == "quant_core" and other and not math.isnan(other[4]):
            print(f"{fmt} {mode}: ctq takes {other[3] / seconds:.1f}x as long, peak RSS ratio {other[5] / by_key[(tool, fmt, mode)][5]:.1f}x")
    lm = by_key.get(("quant_core", "int8", "--low-memory"))
    if lm:
        budget = 1.5 + largest * 4 / 1e9
        print(f"low-memory peak RSS {lm[5]:.2f} GB vs budget 1.5 GB + largest tensor ({largest * 4 / 1e9:.2f} GB fp32) = "
              f"{budget:.2f} GB: {'within' if lm[5] <= budget else 'OVER'}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
