"""Streaming memory behaviour (small scale; the ≥ 2 GB figure is the benchmark's job): in --low-memory mode peak
RSS must not grow with the number of layers, only with the largest tensor."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = r"""
import json, resource, sys
sys.argv = ["quant_core"] + sys.argv[1:]
from quant_core.cli import main
code = main()
print(json.dumps({"code": code, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss_mb(args, cwd):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, out.stderr
    return result["rss_kb"] / 1024


def checkpoint(path, layers, n=1024, k=1024):
    save_file({f"blocks.{i}.lin.weight": torch.randn(n, k).bfloat16() for i in range(layers)}, path)


def test_low_memory_peak_rss_does_not_grow_with_model_size(tmp_path):
    small, large = str(tmp_path / "small.safetensors"), str(tmp_path / "large.safetensors")
    checkpoint(small, 4)     # 8 MB
    checkpoint(large, 128)   # 256 MB, same largest tensor
    args = ["--low-memory", "--no-progress", "--verify", "off"]
    with ThreadPoolExecutor(2) as pool:  # two children side by side: each one's peak RSS is its own
        small_run = pool.submit(peak_rss_mb, ["-i", small, *args], ROOT)
        large_run = pool.submit(peak_rss_mb, ["-i", large, *args], ROOT)
        rss_small, rss_large = small_run.result(), large_run.result()
    # 32× the data; the same largest tensor: peak must stay within a few tensors' worth (2 MB bf16, 4 MB fp32 each)
    assert rss_large - rss_small < 64, (rss_small, rss_large)
