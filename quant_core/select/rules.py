"""Layers kept in high precision by default, whatever the preset: one table.

Vocabulary / position tables are lookups, not matmuls (ComfyUI only reads int8/fp8 embeddings, and the saving
is small against the quality risk). Input and output layers are tiny, sensitive, and ComfyUI reads some of their
shapes to detect the architecture (docs/FORMATS.md), which packed formats would change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import QuantError


@dataclass(frozen=True)
class DefaultKeep:
    name: str
    pattern: re.Pattern
    reason: str
    override: str  # the SelectSettings field that turns this keep off

    def applies(self, layer: str, select) -> bool:
        return not getattr(select, self.override) and bool(self.pattern.search(layer))


def _names(*names: str) -> re.Pattern:
    return re.compile(r"(^|\.)(" + "|".join(names) + r")(\.|$)")


DEFAULT_KEEPS = (
    DefaultKeep(
        "embeddings",
        _names("embed_tokens", "word_embeddings", "position_embeddings", "token_type_embeddings", "wte", "wpe",
               "tok_embeddings", "shared", "embed_positions", "lm_head", "output_embeddings", "token_embedding",
               "position_embedding", "relative_attention_bias"),
        "embedding/vocabulary table (--quantize-embeddings to include)",
        "quantize_embeddings",
    ),
    DefaultKeep(
        "io",
        _names("img_in", "txt_in", "x_embedder", "context_embedder", "cap_embedder", "t_embedder", "time_in",
               "vector_in", "guidance_in", "time_text_embed", "time_embedding", "text_embedding", "time_projection",
               "img_emb", "patch_embedding", "patch_embed", "pos_embed", "final_layer", "norm_out", "proj_out",
               "head"),
        "model input/output layer (--quantize-io-layers to include)",
        "quantize_io_layers",
    ),
)


def compile_regex(pattern: str, what: str) -> re.Pattern:
    """A user's regular expression, or a one-line QuantError naming the setting `what`."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QuantError(f"{what}: bad regular expression {pattern!r}: {e}") from None
