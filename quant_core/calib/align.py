"""Which calibration layer describes which layer of the model being converted.

A calibration file names layers the way its producer saw them: `calibrate` uses the model file's own names, a
ComfyUI capture uses the module names under the diffusion model (`double_blocks.0.img_attn.qkv`) or the text encoder
(`clip_l.transformer.text_model.encoder.layers.0.mlp.fc1`), while the file being converted may carry a prefix
(`model.diffusion_model.` in a checkpoint) or none (`text_model.…` in a CLIP-L file). The two name sets are aligned by
one prefix rewrite — strip a prefix from the calibration names, add one to get the model's — chosen to match the
most layers. Then:

- a matched layer whose input width differs is a different model: refused, naming the layers;
- model layers without statistics while the file also holds layers that match nothing is a different model too
  (or a different version of it): refused, naming both sides;
- a file that covers only some of the model's layers (a capture restricted to some layers) or holds extra ones (a
  capture of several text encoders used on one of them) is fine: the layers without statistics are listed by the
  consumers ("not in the calibration file").
"""
from __future__ import annotations

from collections import Counter

from ..errors import QuantError

SHOW = 5  # layer names quoted in an error


def _suffixes(name: str) -> list[tuple[str, str]]:
    """(prefix, rest) for every split of a dotted name at a dot, whole name first."""
    parts = name.split(".")
    return [(".".join(parts[:i]) + ("." if i else ""), ".".join(parts[i:])) for i in range(len(parts))]


def best_rewrite(calib: list[str], model: list[str]) -> tuple[str, str]:
    """(calibration prefix, model prefix) whose rewrite matches the most names (ties: the shortest prefixes)."""
    by_rest: dict[str, list[str]] = {}
    for name in model:
        for prefix, rest in _suffixes(name):
            by_rest.setdefault(rest, []).append(prefix)
    votes: Counter = Counter()
    for name in calib:
        seen = set()
        for prefix, rest in _suffixes(name):
            for model_prefix in by_rest.get(rest, ()):
                if "." not in rest and prefix and model_prefix:
                    continue  # a match needs two name parts, or one side's whole name
                if (prefix, model_prefix) not in seen:
                    seen.add((prefix, model_prefix))
                    votes[(prefix, model_prefix)] += 1
    if not votes:
        return "", ""
    return max(votes, key=lambda pair: (votes[pair], -len(pair[0]) - len(pair[1])))


def align_layers(calib: dict[str, int | None], model: dict[str, int], where: str,
                 needed: set[str] | None = None) -> dict[str, str]:
    """model layer → calibration layer, for calibration widths `calib` and model widths `model` (layer → K, every
    layer of the model, quantized or not: a capture records them all). `needed`: the layers that want statistics
    (default: all). Raises QuantError (one line, naming layers) when the file describes a different model."""
    if not calib or not model:
        return {}
    strip, add = best_rewrite(list(calib), list(model))
    mapping = {}
    for name in calib:
        if name.startswith(strip):
            target = add + name[len(strip):]
            if target in model:
                mapping[target] = name
    if not mapping:
        raise QuantError(f"{where}: none of its {len(calib)} layers is a layer of this model (it has e.g. "
                         f"{_names(calib)}; the model has e.g. {_names(model)}): statistics from another model")
    wrong = [f"{m} (K={model[m]}, file K={calib[c]})" for m, c in mapping.items()
             if calib[c] is not None and model[m] != calib[c]]
    if wrong:
        raise QuantError(f"{where}: {len(wrong)} layers have another input width than in this model: "
                         f"{', '.join(wrong[:SHOW])}{' …' if len(wrong) > SHOW else ''}: statistics from another model")
    missing = [m for m in (model if needed is None else needed) if m in model and m not in mapping]
    extra = [c for c in calib if c not in set(mapping.values())]
    if missing and extra:
        raise QuantError(f"{where}: statistics from another model (or another version of it): {len(missing)} layers "
                         f"of this model are not in the file (e.g. {_names(missing)}) while {len(extra)} layers of "
                         f"the file match no layer of the model (e.g. {_names(extra)})")
    return mapping


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:SHOW]) + (" …" if len(names) > SHOW else "")
