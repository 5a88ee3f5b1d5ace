"""`calibrate_activation_scales` / `python -m quant_core calibrate`: write a docs/CALIBRATION.md calibration file.

Two ways to get inputs:
- `--hf-model DIR --text FILE`: load a transformers model from DIR with the weights of `-i`, run it on each line
  of FILE (one forward per line, so no padding tokens enter the statistics) and record every Linear layer's inputs.
- otherwise synthetic: every 2-D weight [N, K] of `-i` gets `--samples` inputs x ~ N(0, I_K) (seeded by
  `--seed`). They carry no information about the model (GPTQ on them is RTN); the file is a placeholder
  for tools that only need activation ranges.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

from ..errors import QuantError
from ..io.reader import SafetensorsReader, open_regular, require_regular
from ..io.writer import check_target
from ..calib.file import save_calibration
from ..calib.record import record_activation_stats
from ..calib.stats import InputStats

E4M3_MAX = 448.0
SYNTHETIC_BATCH = 16  # samples per call (a call is the unit --heldout-every counts)


def build_parser():
    from .parser import OneLineParser
    p = OneLineParser(prog="calibrate_activation_scales",
                      description="Record per-layer input statistics (docs/CALIBRATION.md) for GPTQ/QuIP/bias correction.")
    p.add_argument("-i", "--input", required=True, help="model .safetensors")
    p.add_argument("-o", "--output", required=True, help="calibration .safetensors to write")
    p.add_argument("--hf-model", metavar="DIR", help="transformers model directory (config + tokenizer) to run")
    p.add_argument("--text", metavar="FILE", help="calibration text, one sample per line (with --hf-model)")
    p.add_argument("--samples", "--calib-samples", "--calib_samples", type=int, default=512,
                   help="synthetic mode: inputs per layer (default 512)")
    p.add_argument("--seed", "--manual-seed", "--manual_seed", type=int, default=0, help="synthetic mode: seed (0)")
    p.add_argument("--hessian", action=argparse.BooleanOptionalAction, default=True,
                   help="store the [K,K] Hessian per layer (default on; layers with K > 16384 keep the diagonal only)")
    p.add_argument("--heldout-every", type=int, default=0, metavar="N",
                   help="send every N-th sample to held-out statistics (for the report's held-out output SQNR)")
    p.add_argument("--output-gains", action=argparse.BooleanOptionalAction, default=None,
                   help="with --hf-model: also record how much of each layer's output noise reaches the model's "
                        "output (one backward pass per line; read by --auto-bits/--auto-size-gb; default on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_calibrate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_files(args)
    if args.samples < 1 or args.heldout_every < 0 or args.heldout_every == 1:
        raise QuantError("--samples must be positive and --heldout-every 0 (off) or at least 2 (with 1 every "
                         "input would be held out and nothing left to fit)")
    if args.output_gains is not None and not args.hf_model:
        raise QuantError("--output-gains needs --hf-model (a model to run backwards)")
    progress = not args.no_progress
    metadata = {"inputs": "recorded" if args.hf_model else "synthetic"}
    if args.hf_model:
        stats = calibrate_transformers(args.input, args.hf_model, args.text, args.hessian, args.heldout_every, progress,
                                       gains_into=metadata if args.output_gains is not False else None)
        source = f"transformers {os.path.basename(os.path.normpath(args.hf_model))} on {os.path.basename(args.text)}"
    else:
        stats = calibrate_synthetic(args.input, args.samples, args.seed, args.hessian, args.heldout_every, progress)
        source = f"synthetic N(0, I), {args.samples} samples, seed {args.seed}"
    for layer_stats in stats.values():
        layer_stats.input_scale = layer_stats.absmax.max().reshape(()) / E4M3_MAX
    save_calibration(args.output, stats, source, overwrite=args.overwrite, metadata=metadata)
    tokens = max((s.n_tokens for s in stats.values()), default=0)
    print(f"wrote {args.output}: {len(stats)} layers, up to {tokens} tokens per layer ({source})")
    return 0


def _check_files(args) -> None:
    """Everything about the files, before any work: the inputs are regular files (a FIFO would block the read),
    and the output goes where the converter's output may (never over an input, an existing file only with
    --overwrite, into a folder that exists)."""
    if (args.hf_model is None) != (args.text is None):
        raise QuantError("--hf-model and --text go together (a model to run and the text to run it on)")
    for flag, path in (("-i", args.input), ("--text", args.text)):
        if path is None:
            continue
        try:
            require_regular(path, flag)
        except FileNotFoundError:
            raise QuantError(f"{path}: no such file") from None
        except OSError as e:
            raise QuantError(f"{path}: cannot read: {e.strerror or e}") from None
    check_target(args.output, [("input", args.input), ("text file", args.text)], args.overwrite,
                 what="calibration file")


def calibrate_synthetic(path: str, samples: int, seed: int, hessian: bool, heldout_every: int,
                        progress: bool = False) -> dict[str, InputStats]:
    """Statistics of x ~ N(0, I_K) fed to every 2-D floating-point weight of the file (same recorder as real runs)."""
    layers = torch.nn.ModuleDict()
    names = {}
    with SafetensorsReader(path) as reader:
        for info in reader.infos():
            if info.name.endswith(".weight") and len(info.shape) == 2 and info.shape[1] > 0:
                safe = f"l{len(names)}"
                names[safe] = info.name[: -len(".weight")]
                layers[safe] = torch.nn.Linear(info.shape[1], 1, bias=False)  # one output: only inputs matter
    if not names:
        raise QuantError(f"{path}: no 2-D weights to calibrate")
    gen = torch.Generator().manual_seed(seed)

    def run():
        for layer in tqdm(layers.values(), desc="calibrate", unit="layer", disable=not progress, dynamic_ncols=True):
            for start in range(0, samples, SYNTHETIC_BATCH):
                layer(torch.randn(min(SYNTHETIC_BATCH, samples - start), layer.in_features, generator=gen))
    recorded = record_activation_stats(layers, run, hessian=hessian, heldout_every=heldout_every,
                                       sample_rows=0)  # N(0, I) rows: nothing a sample would add
    return {names[k]: v for k, v in recorded.items()}


def calibrate_transformers(path: str, model_dir: str, text_path: str, hessian: bool,
                           heldout_every: int, progress: bool = False, gains_into: dict | None = None
                           ) -> dict[str, InputStats]:
    """Run a transformers model (weights from `path`) on each line of `text_path`, recording Linear inputs; with
    `gains_into` (the file's header metadata) also each layer's output gain (a second pass, backwards from the
    model's first output: `record_output_gains`), and the output's mean energy per token as `output_energy`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise QuantError("--hf-model needs the transformers package (pip install transformers)") from None
    try:
        with open_regular(text_path, "--text", "r", encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise QuantError(f"{text_path}: cannot read the text: {getattr(e, 'strerror', None) or e}") from None
    if not lines:
        raise QuantError(f"{text_path}: no text lines")
    tokenizer, model, forward = _load_transformers(model_dir, AutoModel, AutoTokenizer)
    _load_weights(model, path, model_dir)

    def run():
        for line in tqdm(lines, desc="calibrate", unit="line", disable=not progress, dynamic_ncols=True):
            batch = tokenizer(line, return_tensors="pt", truncation=True)
            try:
                forward(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            except Exception as e:  # noqa: BLE001 (any failure of a third-party model is one line for the user)
                raise QuantError(f"--hf-model {model_dir}: the model failed on a text line "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    stats = record_activation_stats(model, run, hessian=hessian, heldout_every=heldout_every)
    if gains_into is not None:
        _record_gains(model, forward, tokenizer, lines, stats, gains_into, progress)
    return stats


def _record_gains(model, forward, tokenizer, lines: list[str], stats: dict, metadata: dict, progress: bool) -> None:
    from ..calib.record import record_output_gains

    def run(probe):
        for line in tqdm(lines, desc="output gains", unit="line", disable=not progress, dynamic_ncols=True):
            batch = tokenizer(line, return_tensors="pt", truncation=True)
            out = forward(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            probe(out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state)
    try:
        gains, energy = record_output_gains(model, run)
    except Exception as e:  # noqa: BLE001 (a model that cannot run backwards keeps its statistics, without gains)
        print(f"note: output gains not recorded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "--auto-bits will weigh the layers equally", file=sys.stderr)
        return
    for layer, gain in gains.items():
        if layer in stats:
            stats[layer].output_gain = gain
    metadata["output_energy"] = repr(energy)


def _load_transformers(model_dir: str, auto_model, auto_tokenizer):
    """(tokenizer, model, the callable run on each line). Encoder-decoder models (T5) run their encoder only: the
    text encoders ComfyUI uses are encoders, and the decoder would need decoder inputs."""
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # its loading bars and warnings are not ours to print
    transformers_logging.set_verbosity_error()
    try:
        tokenizer = auto_tokenizer.from_pretrained(model_dir)
        model = auto_model.from_pretrained(model_dir).eval()
    except Exception as e:  # noqa: BLE001 (transformers raises many types for a directory it cannot use)
        raise QuantError(f"--hf-model {model_dir}: cannot load a tokenizer and model from it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return tokenizer, model, model.get_encoder()
    return tokenizer, model, model


def _load_weights(model, path: str, model_dir: str) -> None:
    """The weights of `-i` into the model; refused when none of its keys names a parameter of the model (the
    statistics would then describe the model directory's own weights, under names the converter never sees)."""
    with SafetensorsReader(path) as reader:  # file reads, not a memory map: a truncated file is an error, not SIGBUS
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    own = model.state_dict()
    matched = [key for key in tensors if key in own and tuple(own[key].shape) == tuple(tensors[key].shape)]
    if not matched:
        raise QuantError(f"{path}: none of its tensors matches a parameter of the model in {model_dir} (names or "
                         "shapes differ); give the checkpoint that belongs to that model")
    model.load_state_dict({key: tensors[key] for key in matched}, strict=False)


def main() -> int:
    try:
        return run_calibrate(sys.argv[1:])
    except QuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
