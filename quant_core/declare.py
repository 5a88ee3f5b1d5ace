"""Each setting is declared once, as a field of the config record of the stage it belongs to.

The declaration carries the default, the command-line spellings, the help text, the allowed values and the
condition under which the setting has an effect. The CLI parser (`quant_core.cli.parser`), the library keywords
(`quant_core.quantize(**settings)`), the ComfyUI node inputs and the README's flags table are all derived from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import QuantError


@dataclass(frozen=True)
class Spec:
    """How one setting is spelled and checked. `needs(settings)` says why the setting has no effect with the other
    settings given (a dict of every setting's value), or returns None when it does have one."""

    flags: tuple[str, ...]  # command-line spellings, the first one canonical; () = library and nodes only
    help: str
    kind: type
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds of numbers
    high: float | None = None
    negatable: bool = False  # the CLI has --flag and --no-flag
    inverted: bool = False  # the CLI flag stores False (e.g. --no-progress for progress=True)
    metavar: str | None = None
    needs: Callable[[dict], str | None] | None = None

    def label(self, name: str) -> str:
        return self.flags[0] if self.flags else name


def option(default: Any, *flags: str, help: str, kind: type | None = None, **spec) -> Any:
    """A dataclass field declaring one setting (see `Spec`)."""
    kind = kind or type(default)
    return dataclasses.field(default=default, metadata={"spec": Spec(tuple(flags), help, kind, **spec)})


def specs(cls) -> dict[str, tuple[Spec, Any]]:
    """name → (Spec, default) of every declared setting of a config class, in declaration order."""
    return {f.name: (f.metadata["spec"], f.default) for f in dataclasses.fields(cls) if "spec" in f.metadata}


def check(name: str, spec: Spec, value: Any) -> Any:
    """The value converted to the declared kind, or a one-line QuantError naming the setting."""
    label = spec.label(name)
    if spec.kind is object:  # paths or parsed JSON: checked by the stage that reads them
        return value
    if value is None and spec.kind is not bool:
        return None
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise QuantError(f"{label} must be true or false, got {value!r}")
        return value
    if spec.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (spec.kind is int and not float(value).is_integer()):
            raise QuantError(f"{label} must be {'an integer' if spec.kind is int else 'a number'}, got {value!r}")
        value = spec.kind(value)
        if not math.isfinite(value):
            raise QuantError(f"{label} must be a finite number, got {value}")
        if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
            raise QuantError(f"{label} must be {_range(spec)}, got {value:g}")
        return value
    if spec.kind is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise QuantError(f"{label} must be a list, got {type(value).__name__}")
        return tuple(value)
    if spec.kind is str and not isinstance(value, str):
        raise QuantError(f"{label} must be a string, got {type(value).__name__}")
    if spec.choices is not None and value not in spec.choices:
        raise QuantError(f"unknown {name.replace('_', ' ')} {value!r} ({label}: choose from "
                         f"{', '.join(map(str, spec.choices))})")
    return value


def _range(spec: Spec) -> str:
    if spec.high is None:
        return f"{spec.low:g} or more"
    if spec.low is None:
        return f"{spec.high:g} or less"
    return f"between {spec.low:g} and {spec.high:g}"
