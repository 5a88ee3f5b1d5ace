"""Node inputs for engine settings, built from the engine's declarations (`quant_core.SETTINGS`): the default,
the range and the help text are the CLI's, so the node and the converter cannot disagree."""
from __future__ import annotations

from comfy_api.latest import io

from .. import quant_core


def setting_input(name: str, tooltip: str | None = None, input_name: str | None = None, **widget):
    """The ComfyUI input for one engine setting; `input_name` keeps the name saved workflows use where it differs
    from the setting's; `widget` adds display options (step, …)."""
    spec, default = quant_core.SETTINGS[name]
    name = input_name or name
    tooltip = tooltip or spec.help[:1].upper() + spec.help[1:] + "."
    if spec.kind is bool:
        return io.Boolean.Input(name, default=default, tooltip=tooltip)
    if spec.choices is not None:
        return io.Combo.Input(name, options=list(spec.choices), default=default, tooltip=tooltip)
    limits = {key: value for key, value in (("min", spec.low), ("max", spec.high)) if value is not None}
    if spec.kind is float:
        return io.Float.Input(name, default=default, tooltip=tooltip, **limits, **widget)
    if spec.kind is int:
        return io.Int.Input(name, default=default, tooltip=tooltip, **limits, **widget)
    return io.String.Input(name, default=default or "", tooltip=tooltip, **widget)
