"""The seed's model presets: one table of the layers each keeps in high precision or removes.

Patterns are Python regexes searched in the layer name (the weight key without `.weight`); they work with or
without the `model.diffusion_model.` / `text_encoders.` prefixes ComfyUI checkpoints carry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    keep: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def _any(self, patterns: tuple[str, ...]) -> re.Pattern | None:
        if not patterns:
            return None
        key = id(patterns)
        if key not in self._compiled:
            self._compiled[key] = re.compile("|".join(f"(?:{p})" for p in patterns))
        return self._compiled[key]

    def keeps(self, layer: str) -> bool:
        pattern = self._any(self.keep)
        return bool(pattern and pattern.search(layer))

    def removes(self, key: str) -> bool:
        pattern = self._any(self.remove)
        return bool(pattern and pattern.search(key))


_PRESET_LIST = [
    Preset("t5xxl", "T5-XXL text encoder: remove the decoder, keep norms/biases/embeddings high-precision",
           keep=(r"(^|\.)shared$", r"relative_attention_bias", r"layer_norm"), remove=(r"(^|\.)decoder\.",)),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def poor_shape_reason(shape: tuple[int, ...]) -> str:
    """Why `--heur` keeps a weight of this shape unquantized ('' if it is fine)."""
    n, k = shape
    if n * k < 16384:
        return f"too small ({n}×{k})"
    if max(n, k) / max(min(n, k), 1) > 64:
        return f"extreme aspect ratio ({n}×{k})"
    return ""
