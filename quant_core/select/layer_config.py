"""`--layer-config FILE.json`: per-layer overrides, validated once with errors that name the bad entry.

Schema (first matching rule wins; `match` is a Python regex searched in the layer name, i.e. the weight key
without `.weight`, and refused unless its matching time is bounded: see `select.rules.REGEX_RULE`):

    {"rules": [
        {"match": "double_blocks\\.0\\.", "skip": true},
        {"match": "attn\\.qkv", "format": "fp8", "scaling": "tensor"},
        {"match": "mlp", "format": "int8", "scaling": "row", "convrot": 256, "full_precision_matrix_mult": true},
        {"match": "attn", "format": "int4", "convrot": 64},
        {"match": "txt_mlp", "format": "int8", "scaling": "block", "block_size": 64}
    ]}

convert-to-quant's form — an object mapping regex → settings, with an optional "_default" entry and its key names
("scaling_mode", format names like "float8_e4m3fn" or "int8_tensorwise") — is accepted too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import QuantError
from ..io.reader import brief, open_regular
from ..quantization.formats import FORMAT_FAMILIES, Format, make_format
from .rules import compile_regex

RULE_KEYS = {"match", "skip", "format", "scaling", "block_size", "convrot", "full_precision_matrix_mult"}
SEED_KEY_ALIASES = {"scaling_mode": "scaling", "group_size": "block_size", "pattern": "match", "regex": "match",
                    "convrot_group_size": "convrot"}
SEED_IGNORED_KEYS = {"simple"}  # every method here is chosen globally; `simple` only restates the default
# Format names as convert-to-quant writes them → (family, scaling)
FORMAT_NAME_ALIASES = {
    "float8_e4m3fn": ("fp8", "tensor"), "float8_e5m2": ("fp8_e5m2", "tensor"),
    "int8_tensorwise": ("int8", None), "int8_blockwise": ("int8", "block"), "convrot_w4a4": ("int4", None),
    "float8_e4m3fn_rowwise": ("fp8", "row"), "float8_e4m3fn_blockwise": ("fp8", "block"),
}


@dataclass(frozen=True)
class LayerRule:
    index: int
    pattern: re.Pattern
    skip: bool = False
    format: Format | None = None  # None: the run's main format
    full_precision_matrix_mult: bool | None = None

    def describe(self) -> str:
        return f"layer-config rule {self.index} ({self.pattern.pattern!r})"


def load_layer_config(source, defaults) -> list[LayerRule]:
    """Parse a path or an already-loaded object into rules. `defaults` supplies block size / scaling fallbacks."""
    where = source if isinstance(source, str) else "layer config"
    if isinstance(source, str):
        try:
            with open_regular(source, "--layer-config", "r", encoding="utf-8") as f:  # a FIFO is refused, not read
                source = json.load(f)
        except OSError as e:
            raise QuantError(f"{where}: cannot read layer config: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            raise QuantError(f"{where}: malformed layer config JSON: {' '.join(str(e).splitlines())[:200]}") from None
    entries = _entries(source, where)
    return [_rule(i, entry, where, defaults) for i, entry in enumerate(entries)]


def _entries(config, where: str) -> list[dict]:
    if isinstance(config, dict) and "rules" in config:
        rules = config["rules"]
        if not isinstance(rules, list):
            raise QuantError(f"{where}: 'rules' must be a list of objects")
        return rules
    if isinstance(config, dict):  # convert-to-quant's {regex: settings} form; "_default" applies to everything
        entries = [dict(settings, match=pattern) if isinstance(settings, dict) else settings
                   for pattern, settings in config.items() if pattern != "_default"]
        if "_default" in config:
            default = config["_default"]
            entries.append(dict(default, match="") if isinstance(default, dict) else default)
        return entries
    raise QuantError(f"{where}: a layer config is a JSON object with a 'rules' list")


def _rule(index: int, entry, where: str, defaults) -> LayerRule:
    name = f"{where}: rule {index}"
    if not isinstance(entry, dict):
        raise QuantError(f"{name}: must be a JSON object, got {type(entry).__name__}")
    entry = {SEED_KEY_ALIASES.get(k, k): v for k, v in entry.items() if k not in SEED_IGNORED_KEYS}
    unknown = sorted(set(entry) - RULE_KEYS)
    if unknown:
        raise QuantError(f"{name}: unknown key {brief(unknown[0])} (allowed: {', '.join(sorted(RULE_KEYS))})")
    if not isinstance(entry.get("match"), str):
        raise QuantError(f"{name}: needs a 'match' regex string")
    pattern = compile_regex(entry["match"], name, "regex")
    name = f"{where}: rule {index} ({brief(entry['match'])})"
    _check_types(entry, name)
    skip = entry.get("skip", False)
    if not isinstance(skip, bool):
        raise QuantError(f"{name}: 'skip' must be true or false")
    fpmm = entry.get("full_precision_matrix_mult")
    if fpmm is not None and not isinstance(fpmm, bool):
        raise QuantError(f"{name}: 'full_precision_matrix_mult' must be true or false")
    fmt = None if skip or not ({"format", "scaling", "block_size", "convrot"} & set(entry)) else _format(entry, name, defaults)
    return LayerRule(index, pattern, skip, fmt, fpmm)


def _check_types(entry: dict, name: str) -> None:
    """The value types of a rule's settings (checked even where `skip` makes them moot, so a typo is never silent)."""
    for key in ("format", "scaling"):
        if key in entry and not isinstance(entry[key], str) and not (key == "scaling" and entry[key] is None):
            raise QuantError(f"{name}: {key!r} must be a string, got {_type(entry[key])}")
    if "block_size" in entry and not (_is_int(entry["block_size"]) and entry["block_size"] >= 1):
        raise QuantError(f"{name}: 'block_size' must be a positive integer, got {_type(entry['block_size'])} "
                         f"{brief(entry['block_size'])}")
    convrot = entry.get("convrot", 0)
    if not (isinstance(convrot, bool) or _is_int(convrot) and convrot >= 0):
        raise QuantError(f"{name}: 'convrot' must be true, false or a group size (power of 4), got {_type(convrot)} "
                         f"{brief(convrot)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number",
            int: "an integer", type(None): "null"}.get(type(value), type(value).__name__)


def _format(entry: dict, name: str, defaults) -> Format:
    family, scaling = entry.get("format", defaults.format), entry.get("scaling")
    if family in FORMAT_NAME_ALIASES:
        family, implied = FORMAT_NAME_ALIASES[family]
        scaling = scaling or implied
    if family not in FORMAT_FAMILIES or family == "fp16":
        raise QuantError(f"{name}: unknown format {brief(family)} (choose from {', '.join(f for f in FORMAT_FAMILIES if f != 'fp16')})")
    block_size = entry.get("block_size", defaults.block_size)
    convrot = entry.get("convrot", 0)
    if family == "int4" and convrot is False:
        raise QuantError(f"{name}: int4 is always rotated; 'convrot' can only give its group size")
    if convrot is True or family == "int4" and not convrot:
        convrot = defaults.convrot_group_size
    if scaling is None and family == defaults.format:
        scaling = defaults.scaling_mode
    linear_dtype = defaults.int4_linear_dtype if family == "int4" else "int4"
    try:
        return make_format(family, scaling, block_size, convrot or 0, linear_dtype)
    except ValueError as e:
        raise QuantError(f"{name}: {e}") from None
