"""Command-line parsers derived from the setting declarations (`quant_core.job`).

Every declared flag is added with `default=SUPPRESS`, so the parsed namespace holds exactly the settings the user
typed: those are the `given` settings `Job.build` checks for effect. Flags that are spellings of a setting rather than
settings of their own (format shorthands, presets, --optimizer, the LoRA flags, compatibility flags) are declared
here, next to how they translate.
"""
from __future__ import annotations

import argparse

from ..declare import Spec, specs
from ..errors import QuantError
from ..job import METHOD_CONFIGS, STAGES
from ..quantization.formats import FORMAT_ALIASES, FORMAT_FAMILIES
from ..quantization.methods.learned import OPTIMIZERS as LEARNED_OPTIMIZERS
from ..select.presets import PRESETS


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`error: …`, exit 2) instead of the usage block."""

    def error(self, message):
        raise QuantError(f"{message} (see --help)")


FORMAT_SHORTHANDS = ("int8", "int4", "fp8", "nvfp4", "mxfp8", "fp16")
METHOD_CHOICES = ("rtn", "gptq", "quip", *LEARNED_OPTIMIZERS)
# Flags kept for scripts written for the tool this one replaces; what they asked for is always done.
ALWAYS_ON = {
    "--comfy_quant": "--comfy_quant: .comfy_quant markers are always written (a file with scales but no markers "
                     "loads as garbage)",
    "--save-quant-metadata": "--save-quant-metadata: the _quantization_metadata header is always written "
                             "(ComfyUI <= 0.3.7x reads only the header)",
}
ALWAYS_ON_SPELLINGS = {"--comfy_quant": ("--comfy-quant",), "--save-quant-metadata": ("--save_quant_metadata",)}
# Flags of capabilities this version does not have: named so the refusal is clear.
NOT_AVAILABLE = {
    "--actcal": (False, "activation scale calibration"),
    "--stream-hessian-threshold": (True, "GPTQ/QuIP streaming thresholds"),
    "--stream-ldlq-threshold": (True, "GPTQ/QuIP streaming thresholds"),
    "--stream-ortho-threshold": (True, "GPTQ/QuIP streaming thresholds"),
    "--bf16-hadamard-threshold": (True, "BF16 QuIP Hadamard transforms"),
    "--bf16-hessian-threshold": (True, "BF16 GPTQ/QuIP Hessians"),
}


class _FormatFlag(argparse.Action):
    """--format X and the --int8/--fp8/… shorthands: two different formats are a contradiction."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.const is not None else FORMAT_ALIASES.get(values, values)
        previous = getattr(namespace, "format", None)
        if previous is not None and previous != value:
            raise QuantError(f"{option_string}: the format is already {previous!r}; give one format")
        namespace.format = value


def add_declared(parser: argparse.ArgumentParser, cls, skip: set[str]) -> None:
    """One argument group per config record (its first docstring line is the title); settings in `skip`, and those
    a method config inherits from one added before, are not added again (`skip` grows)."""
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    group = parser.add_argument_group(title)
    for name, (spec, default) in specs(cls).items():
        if spec.flags and name not in skip:
            _add(group, name, spec, default)
            skip.add(name)


def _add(group, name: str, spec: Spec, default) -> None:
    text = spec.help if spec.kind is bool or default is None else f"{spec.help} (default {default})"
    common = dict(dest=name, default=argparse.SUPPRESS, help=text)
    if spec.kind is bool and spec.negatable:
        group.add_argument(*spec.flags, action=argparse.BooleanOptionalAction, **common)
    elif spec.kind is bool:
        group.add_argument(*spec.flags, action="store_const", const=not spec.inverted, **common)
    elif spec.choices is not None:
        group.add_argument(*spec.flags, choices=spec.choices, metavar=spec.metavar, **common)
    else:
        kind = spec.kind if spec.kind in (int, float) else str
        group.add_argument(*spec.flags, type=kind, metavar=spec.metavar, **common)


def build_convert_parser(prog: str, usage: str, description: str, epilog: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, usage=usage, description=description, epilog=epilog)
    parser.add_argument("-i", "--input", required=True, help="input .safetensors file")
    parser.add_argument("-o", "--output", help="output path (default: <input stem>_<method>_<format>.safetensors)")
    added = {"format"}
    for cls in STAGES + METHOD_CONFIGS:
        add_declared(parser, cls, added)
    _add_spellings(parser)
    return parser


def _add_spellings(parser) -> None:
    spell = parser.add_argument_group("Spellings of the settings above")
    spell.add_argument("--format", action=_FormatFlag, choices=(*FORMAT_FAMILIES, *FORMAT_ALIASES),
                       default=argparse.SUPPRESS, help="target format (default int8; convrot_w4a4 = int4)")
    for name in FORMAT_SHORTHANDS:
        spell.add_argument(f"--{name}", action=_FormatFlag, nargs=0, const=name, default=argparse.SUPPRESS,
                           help=f"same as --format {name}")
    spell.add_argument("--optimizer", choices=METHOD_CHOICES, default=argparse.SUPPRESS,
                       help=f"the method: rtn (default), gptq, quip, or learned rounding with the optimizer "
                            f"{'/'.join(LEARNED_OPTIMIZERS)}")
    spell.add_argument("--simple", action="store_true", default=argparse.SUPPRESS,
                       help="round-to-nearest (= --optimizer rtn, the default)")
    for preset in PRESETS.values():
        spell.add_argument(f"--{preset.name}", dest="presets", action="append_const", const=preset.name,
                           default=argparse.SUPPRESS, help=preset.help)
    spell.add_argument("--merge-lora", metavar="FILE", default=argparse.SUPPRESS,
                       help="merge this LoRA before quantization (strength --merge-lora-scale)")
    spell.add_argument("--merge-loras", nargs="+", metavar="FILE", default=argparse.SUPPRESS,
                       help="merge several LoRAs; the first at --merge-lora-scale, each later one dampened by "
                            "0.9^index")
    spell.add_argument("--merge-lora-scale", type=float, default=argparse.SUPPRESS,
                       help="strength of --merge-lora/--merge-loras (default 1)")
    spell.add_argument("--merge-lora-dampen", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help="dampen later LoRAs of --merge-loras (default on)")
    for flag, text in ALWAYS_ON.items():
        spell.add_argument(flag, *ALWAYS_ON_SPELLINGS[flag], dest=_dest(flag), action="store_true",
                           default=argparse.SUPPRESS, help=f"always on: {text.split(': ', 1)[1]}")
    later = parser.add_argument_group("Not available in this version (named so that using them gives a clear error)")
    for flag, (takes_value, what) in NOT_AVAILABLE.items():
        kwargs = {"nargs": "*", "metavar": "V"} if takes_value else {"action": "store_true"}
        later.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, help=f"[{what}]", **kwargs)


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")


def flags_table() -> str:
    """The README's table of every conversion flag (Markdown), derived from the parser itself."""
    parser = build_convert_parser("convert_to_quant", "", "", "")
    rows = ["| flag | setting | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        if isinstance(action, argparse.BooleanOptionalAction):
            flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        setting = f"`{action.dest}`" if action.dest in _setting_names() else ""
        text = (action.help or "").replace("|", "\\|")
        if action.choices:
            text += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| {flags} | {setting} | {text} |")
    return "\n".join(rows)


def _setting_names() -> set[str]:
    return {name for cls in STAGES + METHOD_CONFIGS for name in specs(cls)}
