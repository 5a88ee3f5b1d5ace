"""`python -m quant_core` / `convert_to_quant`: the headless converter, with the seed tool's flag names.

Subcommands: `verify OUT [--reference SRC]`, `calibrate -i MODEL -o CALIB`, `bench`, `demo`. Anything else is a conversion (`-i model.safetensors …`).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from . import __version__
from .errors import QuantError
from .methods.learned import ADAPTIVE_MODES, SCHEDULES, THRESHOLD_MODES, VERDICT, LearnedConfig
from .options import BF16_MODES, LEARNED_ROUNDING, STREAMING_MODES, QuantOptions
from .select.presets import PRESETS

FORMAT_SHORTHANDS = {"int8": "int8", "fp8": "fp8", "nvfp4": "nvfp4", "mxfp8": "mxfp8", "fp16": "fp16"}

# Flags of the seed that belong to capabilities not in this version yet: accepted by the parser so the message is
# clear, refused when used. (flag names, takes a value, what it is for)
NOT_YET = [
    (("--actcal",), False, "activation scale calibration"),
    (("--stream-hessian-threshold",), True, "GPTQ/QuIP streaming thresholds"),
    (("--stream-ldlq-threshold",), True, "GPTQ/QuIP streaming thresholds"),
    (("--stream-ortho-threshold",), True, "GPTQ/QuIP streaming thresholds"),
    (("--bf16-hadamard-threshold",), True, "BF16 QuIP Hadamard transforms"),
    (("--bf16-hessian-threshold",), True, "BF16 GPTQ/QuIP Hessians"),
]

# Learned rounding flags, the seed's names: (flag names, LearnedConfig field, argparse type/choices, help).
# Given without --optimizer they are refused: the default method is round-to-nearest.
LEARNED_FLAGS = [
    (("--num_iter", "--num-iter"), "num_iter", int, "maximum iterations per layer"),
    (("--lr",), "lr", float, "initial learning rate"),
    (("--lr_schedule", "--lr-schedule"), "lr_schedule", SCHEDULES, "adaptive, exponential or plateau"),
    (("--lr_gamma", "--lr-gamma"), "lr_gamma", float, "[exponential] decay per step"),
    (("--lr_patience", "--lr-patience"), "lr_patience", int, "[plateau] steps without improvement before a decay"),
    (("--lr_factor", "--lr-factor"), "lr_factor", float, "[plateau, adaptive] decay factor"),
    (("--lr_min", "--lr-min"), "lr_min", float, "[plateau, exponential] lower LR bound"),
    (("--lr_cooldown", "--lr-cooldown"), "lr_cooldown", int,
     "[plateau] steps after a decay before watching again; [adaptive] decay every N stalled steps"),
    (("--lr_threshold", "--lr-threshold"), "lr_threshold", float, "minimum improvement that counts"),
    (("--lr_adaptive_mode", "--lr-adaptive-mode"), "lr_adaptive_mode", ADAPTIVE_MODES,
     "[adaptive] simple-reset (stall counter restarts at each improvement) or no-reset (keeps counting)"),
    (("--lr-shape-influence", "--lr_shape_influence"), "lr_shape_influence", float,
     "[plateau] elongated weights decay faster: factor^sqrt(aspect) blended by this (0 = off)"),
    (("--lr-threshold-mode", "--lr_threshold_mode"), "lr_threshold_mode", THRESHOLD_MODES,
     "--lr_threshold relative to the best loss (rel) or absolute (abs)"),
    (("--early-stop-loss", "--early_stop_loss"), "early_stop_loss", float, "stop when the loss is below this"),
    (("--early-stop-lr", "--early_stop_lr"), "early_stop_lr", float, "stop when the LR is below this"),
    (("--early-stop-stall", "--early_stop_stall"), "early_stop_stall", int,
     "stop after this many steps without improvement"),
    (("--top_p", "--top-p"), "top_p", float, "share of the rank used as k singular directions"),
    (("--min_k", "--min-k"), "min_k", int, "minimum k"),
    (("--max_k", "--max-k"), "max_k", int, "maximum k"),
    (("--full_matrix", "--full-matrix"), "full_matrix", bool, "exact SVD instead of the randomized low-rank one"),
]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`error: …`, exit 2) instead of the usage block."""

    def error(self, message):
        raise QuantError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="convert_to_quant",
        usage="convert_to_quant -i INPUT [-o OUTPUT] [options]   |   convert_to_quant verify FILE [--reference SRC]"
              "   |   convert_to_quant demo",
        description="Quantize a safetensors checkpoint into a file stock ComfyUI (v0.27+) loads. Default: INT8 with "
                    "per-row scales (int8_tensorwise, [N,1] scales), round-to-nearest, verified after writing.",
        epilog="Subcommands: `verify OUT.safetensors [--reference SRC]`, `calibrate -i MODEL -o CALIB.safetensors` "
               "(= calibrate_activation_scales), `bench` (speed next to ctq), `demo`. Flags of later capabilities (GPTQ/QuIP streaming and bf16 "
               "thresholds, --actcal) are listed but refused for now.")
    parser.add_argument("--version", action="version", version=f"quant_core {__version__}")
    req = parser.add_argument_group("Required Arguments")
    req.add_argument("-i", "--input", required=True, help="input .safetensors file")
    _add_output_group(parser)
    _add_format_group(parser)
    _add_quantization_group(parser)
    _add_learned_group(parser)
    _add_calibration_group(parser)
    _add_preset_group(parser)
    _add_method_group(parser)
    _add_lora_group(parser)
    _add_memory_group(parser)
    _add_not_yet_group(parser)
    return parser


def _add_output_group(parser):
    out = parser.add_argument_group("Output Format Options")
    out.add_argument("-o", "--output", help="output path (default: <input stem>_<method>_<format>.safetensors)")
    out.add_argument("--comfy_quant", "--comfy-quant", action="store_true",
                     help="write .comfy_quant markers (always on: a file with scales but no markers loads as garbage)")
    out.add_argument("--save-quant-metadata", "--save_quant_metadata", action="store_true",
                     help="write the _quantization_metadata header (always on: ComfyUI <= 0.3.7x reads only the header)")
    out.add_argument("--full_precision_matrix_mult", "--full-precision-matrix-mult", "-fpmm", action="store_true",
                     help="mark layers full_precision_matrix_mult: quantized storage, matmul in the compute dtype")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _add_format_group(parser):
    fmt = parser.add_argument_group("Format Selection")
    fmt.add_argument("--format", choices=["int8", "fp8", "fp8_e5m2", "nvfp4", "mxfp8", "fp16"],
                     help="target format (default int8)")
    for flag, family in FORMAT_SHORTHANDS.items():
        fmt.add_argument(f"--{flag}", dest="format", action="store_const", const=family, help=f"same as --format {family}")
    fmt.add_argument("--scaling_mode", "--scaling-mode", choices=["tensor", "axis", "row", "block"],
                     help="int8: row (default; = axis) or tensor; fp8: tensor (default). 'block' (2-D tiles) and fp8 "
                          "'row' write formats upstream ComfyUI cannot load: only on explicit request, with a warning")
    fmt.add_argument("--block_size", "--block-size", type=int, default=128, help="tile size for --scaling_mode block")
    fmt.add_argument("--convrot", action="store_true",
                     help="INT8 per-row with a ConvRot block-Hadamard rotation (ComfyUI rotates activations online)")
    fmt.add_argument("--convrot-group-size", "--convrot_group_size", type=int, default=256,
                     help="ConvRot group size, a power of 4 (default 256); layers whose K it does not divide fall back "
                          "to plain per-row INT8")


def _add_quantization_group(parser):
    q = parser.add_argument_group("Quantization Options")
    q.add_argument("--simple", action="store_true",
                   help="round-to-nearest (= --optimizer rtn; the default method)")
    q.add_argument("--heur", action="store_true", help="keep layers with poor shapes for quantization in high precision")
    q.add_argument("--exclude-layers", "--exclude_layers", metavar="REGEX", help="keep layers matching REGEX unquantized")
    q.add_argument("--layer-config", "--layer_config", metavar="FILE.json", help="per-layer rules (see README)")
    q.add_argument("--quantize-embeddings", action="store_true", help="also quantize embedding/vocabulary tables")
    q.add_argument("--quantize-io-layers", action="store_true", help="also quantize model input/output layers")
    q.add_argument("--allow-nonfinite", action="store_true",
                   help="keep layers with NaN/Inf weights in high precision instead of failing")
    q.add_argument("--report-quality", action="store_true", help="print per-layer MSE and SQNR, worst layers first")
    q.add_argument("--quality-threshold", type=float, default=30.0, help="SQNR warning threshold in dB (default 30)")
    q.add_argument("--report", metavar="FILE.json", help="write the quality report as JSON")
    q.add_argument("--verify", choices=["off", "cheap", "full"], default="cheap",
                   help="check the written file: cheap (header, markers, scales; default) or full (also every layer "
                        "against the input through comfy-kitchen)")


def _add_method_group(parser):
    from .methods import HELP
    from .options import METHODS
    m = parser.add_argument_group("Methods & Calibration (GPTQ, QuIP, bias correction)")
    m.add_argument("--optimizer", choices=[*(name for name in METHODS if name != "learned"), *LEARNED_ROUNDING], default=None,
                   help="; ".join(f"{name}: {text}" for name, text in HELP.items()) + ". Default rtn; "
                        f"{'/'.join(LEARNED_ROUNDING)} select learned rounding with that optimizer")
    m.add_argument("--calibration-data", "--calibration_data", metavar="CALIB.safetensors",
                   help="per-layer input statistics (make with calibrate_activation_scales); without it GPTQ/QuIP use "
                        "synthetic N(0, I) inputs and cannot beat RTN on real outputs")
    m.add_argument("--calibration-lora", "--calibration_lora", metavar="LORA.safetensors",
                   help="LoRA-informed calibration: half the input energy in the span of the LoRA's down-projections")
    m.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=True,
                   help="b' = b + (W - Ŵ)·E[x] for layers with a bias, from --calibration-data means (default on; "
                        "synthetic and LoRA inputs have mean 0: nothing to correct)")
    m.add_argument("--gptq-damp", type=float, default=0.1,
                   help="GPTQ/QuIP Hessian dampening, fraction of mean(diag H) (0.1; measured best on MiniLM with ~1k "
                        "calibration tokens, try 0.01 with many more)")
    m.add_argument("--gptq-block-size", type=int, default=128, help="columns per lazy batch update (128)")
    m.add_argument("--gptq-actorder", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize the columns with the largest E[x²] first (default on)")
    m.add_argument("--scale-search", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ/QuIP, INT8/FP8: per-row (per-tensor) clip factor minimizing the E[x²]-weighted error "
                        "(default on)")
    m.add_argument("--quip-seed", type=int, default=0, help="seed of QuIP's random signs / orthogonal matrices (0)")
    m.add_argument("--quip-hadamard", action=argparse.BooleanOptionalAction, default=True,
                   help="QuIP incoherence by a randomized block Hadamard (default) or a random orthogonal matrix")
    m.add_argument("--quip-actorder", action=argparse.BooleanOptionalAction, default=True,
                   help="QuIP: activation order in the LDLQ sweep (default on)")
    m.add_argument("--quip-store-transformed", action="store_true",
                   help="store QuIP weights in ComfyUI's ConvRot form (INT8 per-row + block Hadamard of "
                        "--convrot-group-size, applied by ComfyUI online): no re-quantization, stock loader")
    m.add_argument("--quip-checkpointed", action="store_true",
                   help="keep the inverse-Hessian factor on the CPU during the sweep for large layers (less GPU memory)")
    m.add_argument("--quip-checkpoint-threshold", type=int, default=8192,
                   help="input features at or above which --quip-checkpointed applies (8192)")
    m.add_argument("--quip-checkpoint-segments", type=int, default=4,
                   help="row segments of the factor moved to the GPU one at a time (4)")


def _add_learned_group(parser):
    opt = parser.add_argument_group(
        "Learned Rounding (SVD) Options",
        "Optimize the rounding on the fixed scale grid to shrink the weight error in its top-k singular subspace. "
        f"Measured: {VERDICT}; kept for the seed's flags.")
    defaults = LearnedConfig()
    for names, dest, kind, text in LEARNED_FLAGS:
        if kind is not bool:
            text = f"{text} (default {getattr(defaults, dest)})"
        if kind is bool:
            opt.add_argument(*names, dest=dest, action="store_true", default=None, help=text)
        elif isinstance(kind, tuple):
            opt.add_argument(*names, dest=dest, choices=kind, help=text)
        else:
            opt.add_argument(*names, dest=dest, type=kind, help=text)


def _add_calibration_group(parser):
    cal = parser.add_argument_group("Calibration-based Options")
    cal.add_argument("--smoothquant", action="store_true",
                     help="SmoothQuant, only where it keeps the model's function exact: 1/s folded into a declared "
                          "preceding layer (pre-norm affine weight, value projection before an output projection); "
                          "other layers are left unsmoothed and listed. Needs --calibration-data")
    cal.add_argument("--smoothquant-alpha", type=float, default=0.5,
                     help="migration strength α: s = absmax(x)^α / absmax(w)^(1−α) (default 0.5)")
    cal.add_argument("--static-activations", action="store_true",
                     help="write input_scale for fp8 and nvfp4 layers from --calibration-data (the only formats "
                          "ComfyUI reads it for); without calibration data: a warning, dynamic scales")


def _add_preset_group(parser):
    group = parser.add_argument_group("Model-Specific Filters (keep sensitive layers in high precision)")
    for preset in PRESETS.values():
        group.add_argument(f"--{preset.name}", dest="presets", action="append_const", const=preset.name,
                           help=preset.help)


def _add_lora_group(parser):
    lora = parser.add_argument_group("LoRA Merging Options")
    lora.add_argument("--merge-lora", metavar="FILE", help="merge this LoRA into the weights before quantization")
    lora.add_argument("--merge-loras", nargs="+", metavar="FILE", default=(),
                      help="merge several LoRAs; the first at full scale, each later one dampened by 0.9^index")
    lora.add_argument("--merge-lora-scale", type=float, default=1.0, help="scale of the merged LoRA(s) (default 1)")
    lora.add_argument("--merge-lora-dampen", action=argparse.BooleanOptionalAction, default=True,
                      help="dampen later LoRAs of --merge-loras (default on)")
    lora.add_argument("--lora-mapping", metavar="FILE.json",
                      help='LoRA module → weight key overrides: {"module": "key.weight" | {"weight": key, "rows": [a, b]}}')
    lora.add_argument("--lora-max-unmatched", type=int, default=0, metavar="N",
                      help="allow up to N LoRA modules that match no weight (default 0: any is an error)")


def _add_memory_group(parser):
    mem = parser.add_argument_group("Streaming & Memory Options")
    mem.add_argument("--low-memory", "--low_memory", "-lm", action="store_true",
                     help="no read-ahead, CPU only: RAM stays ~ the largest tensor plus a constant")
    mem.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    mem.add_argument("--streaming-mode", choices=STREAMING_MODES, default="auto",
                     help="with a CUDA device, quantize layers above a size threshold on the CPU: off (never), "
                          "minimal (100M elements), balanced (50M), aggressive (25M), auto (default: from free GPU "
                          "memory)")
    mem.add_argument("--stream-hadamard-threshold", type=int, metavar="ELEMENTS",
                     help="override the --streaming-mode threshold (weight elements)")
    mem.add_argument("--no-memory-limits", action="store_true",
                     help="every layer on the GPU: no size threshold, and an out-of-memory error stops the run "
                          "instead of retrying that layer on the CPU")
    mem.add_argument("--bf16-compute", choices=BF16_MODES, default="auto",
                     help="bf16 for learned rounding's projections: auto (CUDA with bf16, layers of at least "
                          "--bf16-threshold elements; default), on (every layer, any device), off")
    mem.add_argument("--bf16-threshold", type=int, default=1_000_000, metavar="ELEMENTS",
                     help="--bf16-compute auto: smallest layer computed in bf16 (default 1000000)")
    mem.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_not_yet_group(parser):
    later = parser.add_argument_group("Not yet available (accepted names of the seed; refused when used)")
    for names, takes_value, what in NOT_YET:
        kwargs = {"nargs": "*", "metavar": "V"} if takes_value else {"action": "store_true"}
        later.add_argument(*names, dest=f"notyet_{names[0].lstrip('-').replace('-', '_')}", default=None,
                           help=f"[{what}: not in this version]", **kwargs)


def options_from_args(args) -> QuantOptions:
    for names, _, what in NOT_YET:
        value = getattr(args, f"notyet_{names[0].lstrip('-').replace('-', '_')}")
        if value not in (None, False):
            raise QuantError(f"{names[0]}: {what} is not available in this version yet; use --simple (round-to-nearest)")
    if args.simple and args.optimizer not in (None, "rtn"):
        raise QuantError(f"--simple is round-to-nearest; it contradicts --optimizer {args.optimizer}")
    layer_config = args.layer_config
    method, learned = _method_from_args(args)
    return QuantOptions(
        method=method, learned=learned, smoothquant=args.smoothquant,
        smoothquant_alpha=args.smoothquant_alpha, static_activations=args.static_activations,
        bf16_compute=args.bf16_compute, bf16_threshold=args.bf16_threshold, streaming_mode=args.streaming_mode,
        stream_hadamard_threshold=args.stream_hadamard_threshold, no_memory_limits=args.no_memory_limits,
        format=args.format or "int8", scaling_mode=args.scaling_mode, block_size=args.block_size,
        convrot=args.convrot, convrot_group_size=args.convrot_group_size,
        full_precision_matrix_mult=args.full_precision_matrix_mult, presets=tuple(args.presets or ()),
        exclude_layers=args.exclude_layers, layer_config=layer_config, heur=args.heur,
        quantize_embeddings=args.quantize_embeddings, quantize_io_layers=args.quantize_io_layers,
        allow_nonfinite=args.allow_nonfinite, low_memory=args.low_memory, device=args.device, verify=args.verify,
        report_quality=args.report_quality, quality_threshold=args.quality_threshold, report_path=args.report,
        overwrite=args.overwrite, progress=not args.no_progress, merge_lora=args.merge_lora,
        merge_loras=tuple(args.merge_loras), merge_lora_scale=args.merge_lora_scale,
        merge_lora_dampen=args.merge_lora_dampen, lora_mapping=args.lora_mapping,
        lora_max_unmatched=args.lora_max_unmatched, calibration_data=args.calibration_data, calibration_lora=args.calibration_lora,
        bias_correction=args.bias_correction, gptq_damp=args.gptq_damp, gptq_block_size=args.gptq_block_size,
        gptq_actorder=args.gptq_actorder, scale_search=args.scale_search, quip_seed=args.quip_seed,
        quip_hadamard=args.quip_hadamard, quip_actorder=args.quip_actorder,
        quip_store_transformed=args.quip_store_transformed, quip_checkpointed=args.quip_checkpointed,
        quip_checkpoint_threshold=args.quip_checkpoint_threshold,
        quip_checkpoint_segments=args.quip_checkpoint_segments,
    ).validate()


def _method_from_args(args) -> tuple[str, LearnedConfig]:
    """--optimizer rtn|gptq|quip names a method; original|adamw|radam select learned rounding with that optimizer."""
    given = {dest: getattr(args, dest) for _, dest, _, _ in LEARNED_FLAGS if getattr(args, dest) is not None}
    if args.optimizer not in LEARNED_ROUNDING:
        if given:
            flag = next(names[0] for names, dest, _, _ in LEARNED_FLAGS if dest in given)
            raise QuantError(f"{flag} configures learned rounding; add --optimizer original|adamw|radam "
                             f"(the method now is {args.optimizer or 'rtn'})")
        return args.optimizer or "rtn", LearnedConfig()
    return "learned", LearnedConfig(optimizer=args.optimizer, **given)


def run_convert(argv: list[str]) -> int:
    from .convert import convert
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    if options.is_legacy():
        fmt = options.main_format()
        print(f"WARNING: {fmt.name} is NOT loadable by upstream ComfyUI (KeyError on load); only some forks and custom "
              f"nodes read it. For stock ComfyUI use int8 --scaling_mode row or fp8 --scaling_mode tensor.",
              file=sys.stderr)
    result = convert(args.input, args.output, options)
    print_result(result, options)
    return 0


def print_result(result, options: QuantOptions) -> None:
    plan = result.plan
    quantized = plan.of("quantize")
    mix: dict[str, int] = {}
    for d in quantized:
        mix[d.format.describe()] = mix.get(d.format.describe(), 0) + 1
    print(f"wrote {result.output}")
    if options.format == "fp16":
        print(f"  {len(plan.of('keep'))} tensors written (floating-point ones as FP16), {len(plan.of('remove'))} removed")
    else:
        print(f"  {len(quantized)} layers quantized ({', '.join(f'{n}× {f}' for f, n in mix.items())}), "
              f"{len(plan.of('keep'))} tensors kept, {len(plan.of('remove'))} removed")
    rate = result.input_bytes / result.seconds / 1e9 if result.seconds else 0.0
    print(f"  {result.input_bytes / 1e6:.1f} MB -> {result.output_bytes / 1e6:.1f} MB in {result.seconds:.1f} s "
          f"({rate:.2f} GB/s of input)")
    if result.peak_gpu_bytes is not None:
        print(f"  peak GPU memory {result.peak_gpu_bytes / 2 ** 30:.2f} GiB (allocated by torch)")
    for d in plan.fallbacks():
        print(f"  fallback: {d.layer}: {d.reason}")
    for note in result.notes:
        print(f"  {note}")
    if result.lora is not None:
        print(f"  {result.lora.summary()}")
        for name in result.lora.unmatched[:10]:
            print(f"    unmatched LoRA module: {name}")
    for rule in plan.rules_unmatched:
        print(f"  note: {rule} matched no layer")
    if result.verify is not None:
        print(f"  {result.verify.summary()}")
        for warning in result.verify.warnings[:10]:
            print(f"    warning: {warning}")
    print(f"  {result.report.summary()}")
    if options.report_quality:
        print(result.report.table(limit=None))


def run_verify(argv: list[str]) -> int:
    from .verify import verify_file
    parser = OneLineParser(prog="convert_to_quant verify",
                                     description="Check a quantized file against ComfyUI's loading contract.")
    parser.add_argument("file")
    parser.add_argument("--reference", help="the source file: rebuild each layer through comfy-kitchen and compare")
    parser.add_argument("--allow-legacy", action="store_true",
                        help="report fork-only formats (int8_blockwise, fp8 row/block) as warnings, not defects")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = verify_file(args.file, args.reference, args.allow_legacy)
    if args.json:
        print(json.dumps({"ok": result.ok, "defects": result.defects, "warnings": result.warnings,
                          "layers": [vars(l) for l in result.layers]}, indent=2))
    else:
        for layer in result.layers:
            error = "" if layer.rel_error is None else f"  rel.error {layer.rel_error:.4g}"
            print(f"{layer.layer:<60} {layer.format}{'' if layer.upstream else ' [NOT UPSTREAM]'}{error}")
        for warning in result.warnings:
            print(f"warning: {warning}")
        for defect in result.defects:
            print(f"DEFECT: {defect}")
        print(result.summary())
    return 0 if result.ok else 1


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if argv[:1] == ["verify"]:
            return run_verify(argv[1:])
        if argv[:1] == ["calibrate"]:
            from .calib.cli import run_calibrate
            return run_calibrate(argv[1:])
        if argv[:1] == ["bench"]:
            from .bench import main as run_bench
            return run_bench(argv[1:])
        if argv[:1] == ["demo"]:
            from .demo import run_demo
            return run_demo(argv[1:])
        return run_convert(argv)
    except QuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        from .io.writer import remove_live_temps
        remove_live_temps()
        print("interrupted; no output written", file=sys.stderr)
        return 130
