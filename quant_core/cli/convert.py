"""The conversion command: `python -m quant_core -i model.safetensors [settings]` (console script `convert_to_quant`).

Flags are derived from the setting declarations (`quant_core.job`); this module turns the parsed flags into a `Job`
and prints the result.
"""
from __future__ import annotations

import sys

from ..version import __version__
from ..errors import QuantError
from ..job import Job
from ..quantization.methods.learned import OPTIMIZERS as LEARNED_OPTIMIZERS
from ..transform.lora.merge import lora_scales
from .parser import ALWAYS_ON, NOT_AVAILABLE, _dest, build_convert_parser

SPELLINGS = {"input", "output", "optimizer", "simple", "merge_lora", "merge_loras", "merge_lora_scale",
             "merge_lora_dampen"}


def build_parser():
    parser = build_convert_parser(
        prog="convert_to_quant",
        usage="convert_to_quant -i INPUT [-o OUTPUT] [options]   |   convert_to_quant verify FILE [--reference SRC]"
              "   |   convert_to_quant calibrate -i MODEL -o CALIB   |   convert_to_quant demo",
        description="Quantize a safetensors checkpoint into a file stock ComfyUI (v0.27+) loads. Default: INT8 with "
                    "per-row scales (int8_tensorwise, [N,1] scales), round-to-nearest, verified after writing.",
        epilog="Subcommands: `verify OUT.safetensors [--reference SRC]`, `calibrate -i MODEL -o CALIB.safetensors` "
               "(= calibrate_activation_scales), `demo`. Every flag is listed with what it does in README.md.")
    parser.add_argument("--version", action="version", version=f"quant_core {__version__}")
    return parser


def job_from_args(args) -> tuple[Job, list[str]]:
    """The job the parsed flags describe, and the notices to print (compatibility flags that are always on)."""
    given = dict(vars(args))
    notices = [text for flag, text in ALWAYS_ON.items() if given.pop(_dest(flag), False)]
    for flag, (_, what) in NOT_AVAILABLE.items():
        if _dest(flag) in given:
            raise QuantError(f"{flag}: {what} is not available in this version")
    settings = {k: v for k, v in given.items() if k not in SPELLINGS}
    settings.update(_method_settings(given))
    loras = _lora_settings(given)
    if loras:
        settings["loras"] = loras
    if "presets" in settings:
        settings["presets"] = tuple(dict.fromkeys(settings["presets"]))
    if "simple" in given and "optimizer" not in given:
        notices.append("--simple: round-to-nearest is the default method")
    return Job.build(settings), notices


def _method_settings(given: dict) -> dict:
    """--optimizer rtn|gptq|quip names a method; original|adamw|radam select learned rounding with that optimizer."""
    optimizer = given.get("optimizer")
    if "simple" in given and optimizer not in (None, "rtn"):
        raise QuantError(f"--simple is round-to-nearest; it contradicts --optimizer {optimizer}")
    if optimizer is None:
        return {}
    if optimizer in LEARNED_OPTIMIZERS:
        return {"method": "learned", "optimizer": optimizer}
    return {"method": optimizer}


def _lora_settings(given: dict) -> tuple:
    single, several = given.get("merge_lora"), tuple(given.get("merge_loras", ()))
    if not single and not several:
        for flag in ("merge_lora_scale", "merge_lora_dampen"):
            if flag in given:
                raise QuantError(f"--{flag.replace('_', '-')} applies with --merge-lora or --merge-loras")
        return ()
    if "merge_lora_dampen" in given and len(([single] if single else []) + list(several)) < 2:
        raise QuantError("--merge-lora-dampen applies to several LoRAs (--merge-loras A B …)")
    return tuple(lora_scales(single, several, given.get("merge_lora_scale", 1.0), given.get("merge_lora_dampen", True)))


def run_convert(argv: list[str]) -> int:
    from ..pipeline import convert
    args = build_parser().parse_args(argv)
    job, notices = job_from_args(args)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    if job.quantize.is_legacy():
        fmt = job.main_format()
        print(f"WARNING: {fmt.name} is NOT loadable by upstream ComfyUI (KeyError on load); only some forks and custom "
              f"nodes read it. For stock ComfyUI use int8 --scaling_mode row or fp8 --scaling_mode tensor.",
              file=sys.stderr)
    result = convert(args.input, getattr(args, "output", None), job)
    print_result(result, job)
    return 0


def print_result(result, job: Job) -> None:
    plan = result.plan
    quantized = plan.of("quantize")
    mix: dict[str, int] = {}
    for d in quantized:
        mix[d.format.describe()] = mix.get(d.format.describe(), 0) + 1
    print(f"wrote {result.output}")
    if job.quantize.format == "fp16":
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
    if job.output.report_quality:
        print(result.report.table(limit=None))
        if result.report.auto is not None:
            print(result.report.auto.table())
