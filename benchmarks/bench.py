"""`python benchmarks/bench.py`: this tool next to convert-to-quant (`ctq`) on one synthetic Flux-shaped checkpoint.

Builds a bf16 checkpoint with Flux-dev's layer shapes (19 double + 38 single blocks by default: 11.9 B parameters,
23.8 GB; outlier input channels as in real weights), measures the machine's serial I/O floor with `dd` (read the input
from a cold page cache, write and fsync an equal-sized file), then runs each converter as a child process of this
one on the same file, cold (the input dropped from the page cache first) and warm, and prints one table: format,
method, cache, whole-process seconds, GB/s of input, peak RSS (the child's ru_maxrss), peak GPU memory (the device's
used memory above its idle level while the child ran, sampled through NVML or nvidia-smi) and mean weight SQNR
(the same sample of layers of every output rebuilt through comfy-kitchen and compared with the input), then the
ratios. Every output is fsynced before its atomic rename (ours) and removed after it is measured.

    python benchmarks/bench.py [--blocks 19,38 | --size-gb 2.5] [--ctq PATH] [--workdir DIR] [--methods rtn,gptq]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

HIDDEN, MLP = 3072, 12288
DOUBLE_BLOCK = {"img_attn.qkv": (3 * HIDDEN, HIDDEN), "img_attn.proj": (HIDDEN, HIDDEN), "img_mlp.0": (MLP, HIDDEN),
                "img_mlp.2": (HIDDEN, MLP), "img_mod.lin": (6 * HIDDEN, HIDDEN), "txt_attn.qkv": (3 * HIDDEN, HIDDEN),
                "txt_attn.proj": (HIDDEN, HIDDEN), "txt_mlp.0": (MLP, HIDDEN), "txt_mlp.2": (HIDDEN, MLP),
                "txt_mod.lin": (6 * HIDDEN, HIDDEN)}
DOUBLE_NORMS = ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm",
                "txt_attn.norm.key_norm")
SINGLE_BLOCK = {"linear1": (3 * HIDDEN + MLP, HIDDEN), "linear2": (HIDDEN, HIDDEN + MLP),
                "modulation.lin": (3 * HIDDEN, HIDDEN)}
SINGLE_NORMS = ("norm.query_norm", "norm.key_norm")
IO_LAYERS = {"img_in": (HIDDEN, 64), "txt_in": (HIDDEN, 4096), "time_in.in_layer": (HIDDEN, 256),
             "time_in.out_layer": (HIDDEN, HIDDEN), "vector_in.in_layer": (HIDDEN, 768),
             "vector_in.out_layer": (HIDDEN, HIDDEN), "guidance_in.in_layer": (HIDDEN, 256),
             "guidance_in.out_layer": (HIDDEN, HIDDEN), "final_layer.linear": (64, HIDDEN),
             "final_layer.adaLN_modulation.1": (2 * HIDDEN, HIDDEN)}
FLUX_DEV_BLOCKS = (19, 38)
FORMATS = ("int8", "fp8", "int4")  # int8/fp8: both tools write them (ctq: --int8 --scaling_mode row; fp8 per
# tensor); int4 (convrot_w4a4): only this tool
METHOD_FLAGS = ("rtn", "gptq", "quip", "original", "adamw", "radam")


def flux_layers(double: int, single: int) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(Linear layer shapes, RMSNorm scale names) of a Flux model with that many double and single blocks."""
    shapes, norms = dict(IO_LAYERS), []
    for i in range(double):
        shapes |= {f"double_blocks.{i}.{name}": s for name, s in DOUBLE_BLOCK.items()}
        norms += [f"double_blocks.{i}.{name}.scale" for name in DOUBLE_NORMS]
    for i in range(single):
        shapes |= {f"single_blocks.{i}.{name}": s for name, s in SINGLE_BLOCK.items()}
        norms += [f"single_blocks.{i}.{name}.scale" for name in SINGLE_NORMS]
    return shapes, norms


def blocks_for_size(size_gb: float) -> tuple[int, int]:
    """Double and single blocks (1:2, as Flux's 19:38) whose checkpoint reaches size_gb."""
    double = single = 0
    while sum(n * k * 2 for n, k in flux_layers(double, single)[0].values()) < size_gb * 1e9:
        if single >= 2 * double:
            double += 1
        else:
            single += 1
    return double, single


def build_checkpoint(path: str, double: int, single: int) -> None:
    """Write the checkpoint tensor by tensor (never the whole model in memory); weights drawn on the GPU if any."""
    import torch

    from quant_core.io import StreamingWriter, header_reserve
    shapes, norms = flux_layers(double, single)
    entries = [(f"{l}.{p}", "BF16", s if p == "weight" else (s[0],)) for l, s in shapes.items() for p in ("weight", "bias")]
    entries += [(name, "BF16", (128,)) for name in norms]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)
    with StreamingWriter(path, header_reserve(entries, {}), overwrite=True, background_bytes=1 << 30) as writer:
        for layer, (n, k) in shapes.items():
            weight = torch.randn(n, k, generator=g, device=device) * (1 / math.sqrt(k))
            weight[:, torch.randint(0, k, (4,), generator=g, device=device)] *= 10  # outlier input channels
            writer.add(f"{layer}.weight", weight.bfloat16().cpu())
            writer.add(f"{layer}.bias", (torch.randn(n, generator=g, device=device) * 0.01).bfloat16().cpu())
        for name in norms:
            writer.add(name, torch.ones(128, dtype=torch.bfloat16))
        writer.finish({"modelspec.title": f"synthetic Flux-shaped benchmark ({double} double, {single} single blocks)"})
        writer.publish()


# --- page cache and the I/O floor ------------------------------------------------------------------------------

def drop_from_page_cache(path: str) -> str:
    """Evict the file's pages: the kernel's drop_caches where writable (root), else posix_fadvise(DONTNEED) on the
    file, which needs no privilege. Returns how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    if not hasattr(os, "posix_fadvise"):
        return "nothing (no drop_caches or posix_fadvise here: the cold runs are not cold)"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return "fadvise"


def dd_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


WEIGHT_BYTES_PER_ELEMENT = {"int8": 1.0, "fp8": 1.0, "int4": 0.5, "mxfp8": 1 + 1 / 32, "nvfp4": 0.5 + 1 / 16}


def expected_output_bytes(shapes: dict[str, tuple[int, int]], fmt: str) -> int:
    """About what a converter writes: quantized weights, fp32 row scales, bf16 biases (all layers quantized)."""
    per = WEIGHT_BYTES_PER_ELEMENT.get(fmt, 1.0)
    return int(sum(n * k * per + n * 6 for n, k in shapes.values()))


def io_floor(source: str, workdir: str, output_bytes: int) -> dict:
    """dd, bs=16M: the input read cold and warm; an output-sized file written with fsync; and both at once (cold
    read while the write runs: the floor when reading and writing overlap)."""
    scratch = os.path.join(workdir, "dd_write.tmp")
    read = ["dd", f"if={source}", "of=/dev/null", "bs=16M"]
    write = ["dd", "if=/dev/zero", f"of={scratch}", "bs=16M", f"count={max(output_bytes >> 24, 1)}", "conv=fsync"]
    drop_from_page_cache(source)
    cold = dd_seconds(read)
    warm = dd_seconds(read)
    written = dd_seconds(write)
    os.unlink(scratch)
    drop_from_page_cache(source)
    start = time.perf_counter()
    both = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for argv in (read, write)]
    for proc in both:
        proc.wait()
    overlapped = time.perf_counter() - start
    os.unlink(scratch)
    return {"read_cold": cold, "read_warm": warm, "write_fsync": written, "overlapped": overlapped,
            "output_bytes": max(output_bytes >> 24, 1) << 24}


# --- child processes ---------------------------------------------------------------------------------------------

class GpuSampler:
    """Peak used memory of GPU 0 above its level at start, sampled every 20 ms on a thread (NVML, else nvidia-smi)."""

    def __init__(self):
        self._read = _gpu_reader()
        self.base = self._read() if self._read else None
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) if self._read else None

    def _loop(self):
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self._read())
            except Exception:
                return

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def peak_bytes(self) -> float:
        return float("nan") if self.base is None else self.peak - self.base


def _gpu_reader():
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None

    def read():
        out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0]) << 20
    try:
        read()
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None
    return read


@dataclass
class Run:
    tool: str
    fmt: str
    method: str
    cache: str
    argv: list
    output: str
    seconds: float = float("nan")
    rss_gb: float = float("nan")
    gpu_gb: float = float("nan")
    sqnr: float = float("nan")
    error: str = ""


# Linux carries a process's peak RSS across exec from the memory it was forked with, so a converter forked straight
# from this (large) process would report at least our own size. A small launcher forks it instead and reports the
# peak RSS (KiB) of that grandchild and its descendants, measured by wait4, on its last line.
LAUNCHER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:])\n"
            "if not hasattr(os, 'wait4'):\n"  # no rusage here (Windows): no RSS column
            "    sys.exit(p.wait())\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "sys.stdout.flush()\n"
            "kib = usage.ru_maxrss // (1024 if sys.platform == 'darwin' else 1)\n"  # macOS: bytes
            "print(f'\\nMAXRSS_KIB {kib}')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_child(run: Run, cwd: str, log) -> None:
    if os.path.exists(run.output):
        os.unlink(run.output)
    with GpuSampler() as gpu:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, *run.argv], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        run.seconds = time.perf_counter() - start
    output, code = proc.stdout, proc.returncode
    head, _, rss = output.rpartition("MAXRSS_KIB ")
    if rss.strip().isdigit():
        output, run.rss_gb = head, int(rss) / 1024 ** 2
    run.gpu_gb = gpu.peak_bytes() / 2 ** 30
    log.write(f"$ {' '.join(run.argv)}\n{output}\n")
    if code != 0 or not os.path.exists(run.output):
        run.error = f"exit {code}: {output.strip().splitlines()[-1][:100] if output.strip() else ''}"


def sampled_sqnr(output: str, source: str, layers: list[str]) -> float:
    """Mean weight SQNR (dB) over `layers`, each rebuilt from `output` through its format's contract (comfy-kitchen,
    or the legacy rules) as `verify --reference` does."""
    from quant_core.dequantize import quantized_layers, rebuild_layer
    from quant_core.io.reader import SafetensorsReader
    from quant_core.report import relative_error, sqnr_from_rel_error
    values = []
    with SafetensorsReader(output) as out, SafetensorsReader(source) as src:
        keys, confs = set(out.keys()), quantized_layers(out)
        for layer in layers:
            if layer not in confs:
                continue
            reference = src.get_tensor(f"{layer}.weight").float()
            rebuilt = rebuild_layer(out, keys, layer, confs[layer], tuple(reference.shape))
            values.append(sqnr_from_rel_error(relative_error(reference, rebuilt)))
    return sum(values) / len(values) if values else float("nan")


# --- the benchmark ------------------------------------------------------------------------------------------------

def plan_runs(source: str, workdir: str, ctq: str | None, formats: list[str], methods: list[str],
              low_memory: bool, ctq_low_memory: bool) -> list[Run]:
    ours = [sys.executable, "-m", "quant_core", "-i", source, "--no-progress", "--overwrite",
            "--quantize-io-layers", "--quantize-embeddings"]  # ctq quantizes every 2-D weight: the same layer set
    runs = []

    def out(name):
        return os.path.join(workdir, f"{name}.safetensors")
    for fmt in formats:
        ctq_fmt = ["--int8", "--scaling_mode", "row"] if fmt == "int8" else ["--scaling_mode", "tensor"]
        ctq_base = [ctq, "-i", source, "--comfy_quant", "--simple", *ctq_fmt] if ctq and fmt != "int4" else None
        for cache in ("cold", "warm"):
            runs.append(Run("quant_core", fmt, "rtn", cache, [*ours, "--simple", "--format", fmt, "-o", out(f"ours_{fmt}")],
                            out(f"ours_{fmt}")))
            if ctq_base:
                runs.append(Run("ctq 1.3.4", fmt, "rtn", cache, [*ctq_base, "-o", out(f"ctq_{fmt}")], out(f"ctq_{fmt}")))
        if low_memory:
            runs.append(Run("quant_core", fmt, "rtn --low-memory", "warm",
                            [*ours, "--simple", "--format", fmt, "--low-memory", "-o", out(f"ours_{fmt}_lm")],
                            out(f"ours_{fmt}_lm")))
            if ctq_base and ctq_low_memory:
                runs.append(Run("ctq 1.3.4", fmt, "rtn --low-memory", "warm", [*ctq_base, "--low_memory", "-o",
                                                                              out(f"ctq_{fmt}_lm")], out(f"ctq_{fmt}_lm")))
        for method in methods:
            if method != "rtn":
                label = f"{method} (no statistics: RTN)" if method in ("gptq", "quip") else f"learned {method}"
                runs.append(Run("quant_core", fmt, label, "warm",
                                [*ours, "--optimizer", method, "--format", fmt, "-o", out(f"ours_{fmt}_{method}")],
                                out(f"ours_{fmt}_{method}")))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--blocks", default=None, help="double,single blocks (default 19,38: Flux-dev, 23.8 GB)")
    size.add_argument("--size-gb", type=float, help="blocks added 1:2 until the checkpoint reaches this size")
    parser.add_argument("--ctq", default=shutil.which("ctq"), help="the ctq command (default: from PATH; 'none' skips)")
    parser.add_argument("--workdir", help="where the files go (default: a temporary directory, removed after)")
    parser.add_argument("--formats", default="int8", help="comma list of int8, fp8, int4 (ctq has no int4)")
    parser.add_argument("--methods", default="rtn", help="comma list of rtn, gptq, quip (without a calibration file these write round-to-nearest) and the "
                        "learned-rounding optimizers original, adamw, radam (slow on a full model)")
    parser.add_argument("--no-low-memory", action="store_true", help="skip the --low-memory run")
    parser.add_argument("--ctq-low-memory", action="store_true", help="also run ctq --low_memory")
    parser.add_argument("--no-cold", action="store_true", help="warm page cache only (no eviction, no dd floor)")
    parser.add_argument("--quality-layers", type=int, default=24,
                        help="layers (evenly spread) whose SQNR is measured in every output; 0 skips the column")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    parser.add_argument("--log", help="write every child's output to this file")
    args = parser.parse_args(argv)
    for name, given, known in (("--formats", args.formats, FORMATS), ("--methods", args.methods, METHOD_FLAGS)):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    ctq = None if args.ctq in (None, "none") else args.ctq
    if args.size_gb is not None:
        double, single = blocks_for_size(args.size_gb)
    else:
        double, single = (int(x) for x in args.blocks.split(",")) if args.blocks else FLUX_DEV_BLOCKS
    workdir = args.workdir or tempfile.mkdtemp(prefix="quant_bench_")
    os.makedirs(workdir, exist_ok=True)
    source = os.path.join(workdir, f"flux_synthetic_{double}_{single}.safetensors")
    log = open(args.log, "w") if args.log else open(os.devnull, "w")
    try:
        return _bench(args, ctq, double, single, workdir, source, log)
    finally:
        log.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(args, ctq, double, single, workdir, source, log) -> int:
    shapes, _ = flux_layers(double, single)
    if not os.path.exists(source):
        start = time.perf_counter()
        build_checkpoint(source, double, single)
        print(f"built {source} in {time.perf_counter() - start:.1f} s")
    size = os.path.getsize(source)
    params = sum(n * k + n for n, k in shapes.values())
    largest = max(n * k for n, k in shapes.values())
    print(f"input: {size / 1e9:.2f} GB bf16, {double} double + {single} single blocks, {params / 1e9:.2f} B parameters, "
          f"{len(shapes)} Linear layers; largest weight {largest * 2 / 1e6:.0f} MB")
    print(f"machine: {_machine()}")
    formats = args.formats.split(",")
    floor = None if args.no_cold else io_floor(source, workdir, expected_output_bytes(shapes, formats[0]))
    if floor:
        how = drop_from_page_cache(source)
        out_gb = floor["output_bytes"] / 1e9
        print(f"I/O floor (dd, bs=16M): read cold {floor['read_cold']:.1f} s ({size / floor['read_cold'] / 1e9:.2f} GB/s), "
              f"warm {floor['read_warm']:.1f} s ({size / floor['read_warm'] / 1e9:.2f} GB/s); write {out_gb:.1f} GB "
              f"(a {formats[0]} output's size) + fsync {floor['write_fsync']:.1f} s "
              f"({out_gb / floor['write_fsync']:.2f} GB/s); serial floor {floor['read_cold'] + floor['write_fsync']:.1f} s; "
              f"cold read and write at once {floor['overlapped']:.1f} s (page cache dropped with {how})")
    methods = args.methods.split(",")
    runs = plan_runs(source, workdir, ctq, formats, methods, not args.no_low_memory, args.ctq_low_memory)
    if args.no_cold:
        runs = [r for r in runs if r.cache != "cold"]
    names = list(shapes)
    sample = [names[round(i * (len(names) - 1) / max(args.quality_layers - 1, 1))]
              for i in range(args.quality_layers)] if args.quality_layers > 0 else []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: still print what finished
    try:
        for run in runs:
            _measure(run, source, root, sample, args.keep, log)
    except KeyboardInterrupt:
        for run in runs:
            if math.isnan(run.seconds):
                run.error = run.error or "not run (benchmark interrupted)"
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(table(runs, size))
    print()
    for line in ratios(runs, floor, size, largest):
        print(line)
    return 0 if not any(r.error for r in runs if r.tool == "quant_core") else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _measure(run: Run, source: str, root: str, sample: list[str], keep: bool, log) -> None:
    if run.cache == "cold":
        drop_from_page_cache(source)
    elif run.cache == "warm":
        _warm(source)
    print(f"running {run.tool} {run.fmt} {run.method} {run.cache} ...", flush=True)
    run_child(run, root, log)
    if not run.error and sample:
        run.sqnr = sampled_sqnr(run.output, source, sample)
    if os.path.exists(run.output) and not keep:
        os.unlink(run.output)
    print(f"  {run.seconds:.1f} s, peak RSS {run.rss_gb:.2f} GB, peak GPU {run.gpu_gb:.2f} GiB, "
          f"mean SQNR {run.sqnr:.2f} dB {run.error}", flush=True)


def _warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def _machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}, python {sys.version.split()[0]}"


def table(runs: list[Run], size: int) -> str:
    lines = [f"{'tool':<11} {'format':<6} {'method':<18} {'cache':<5} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>11} "
             f"{'peak GPU GiB':>12} {'mean SQNR dB':>12}  note"]
    for r in runs:
        rate = size / r.seconds / 1e9 if not r.error else float("nan")
        lines.append(f"{r.tool:<11} {r.fmt:<6} {r.method:<18} {r.cache:<5} {r.seconds:8.1f} {rate:6.2f} {r.rss_gb:11.2f} "
                     f"{r.gpu_gb:12.2f} {r.sqnr:12.2f}  {r.error}")
    return "\n".join(lines)


def ratios(runs: list[Run], floor: dict | None, size: int, largest: int) -> list[str]:
    lines = []
    by = {(r.tool, r.fmt, r.method, r.cache): r for r in runs if not r.error}
    for (tool, fmt, method, cache), r in by.items():
        other = by.get(("ctq 1.3.4", fmt, method, cache))
        if tool == "quant_core" and other:
            lines.append(f"{fmt} {method} {cache}: ctq takes {other.seconds / r.seconds:.1f}x as long "
                         f"({other.seconds:.1f} s vs {r.seconds:.1f} s); peak RSS {other.rss_gb:.1f} GB vs {r.rss_gb:.1f} GB")
        if tool == "quant_core" and cache == "cold" and floor:
            serial = floor["read_cold"] + floor["write_fsync"]
            lines.append(f"{fmt} {method} cold: {r.seconds / serial:.2f}x the serial I/O floor ({serial:.1f} s), "
                         f"{r.seconds / floor['overlapped']:.2f}x the overlapped one ({floor['overlapped']:.1f} s)")
        if tool == "quant_core" and "--low-memory" in method:
            budget = 1.5 + largest * 2 / 1e9
            lines.append(f"{fmt} --low-memory: peak RSS {r.rss_gb:.2f} GB vs 1.5 GB + largest tensor "
                         f"({largest * 2 / 1e9:.2f} GB bf16) = {budget:.2f} GB")
    return lines


if __name__ == "__main__":
    sys.exit(main())
