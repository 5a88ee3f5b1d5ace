"""Where SmoothQuant's 1/s can be folded exactly: one table of (consumer layer pattern → preceding layer), per
architecture, plus the known places where it cannot (and why).

A consumer Y = X·Wᵀ is smoothed as Y = (X·diag(1/s))·(W·diag(s))ᵀ. The model computes the same function only if
X·diag(1/s) is produced by the model itself, by a layer whose output feeds nothing but the smoothed consumers:
- `norm`: a norm with an affine weight (and bias) whose output goes only to the consumers — pre-norm blocks
  (T5, Llama/Mistral); its weight and bias are divided by s;
- `linear`: a value projection whose output reaches the output projection only through attention, which is linear
  per channel (softmax(QKᵀ)·V·diag(1/s) = (softmax(QKᵀ)·V)·diag(1/s)); its rows and bias are divided by s.
Patterns are regexes on layer names (weight key without `.weight`); `source` is formatted with the named groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

NORM, LINEAR = "norm", "linear"


@dataclass(frozen=True)
class FoldRule:
    architecture: str
    consumer: re.Pattern
    source: str  # the preceding layer's name, a template over the consumer pattern's named groups
    kind: str  # NORM or LINEAR

    def source_of(self, layer: str) -> str | None:
        match = self.consumer.search(layer)
        return self.source.format(**match.groupdict()) if match else None


@dataclass(frozen=True)
class NoFold:
    consumer: re.Pattern
    why: str


def _rule(architecture: str, consumer: str, source: str, kind: str) -> FoldRule:
    return FoldRule(architecture, re.compile(consumer), source, kind)


FOLD_RULES = [
    # BERT (e.g. all-MiniLM-L6-v2): value → attention output projection
    _rule("bert", r"^(?P<p>(?:.*\.)?encoder\.layer\.\d+\.attention)\.output\.dense$", "{p}.self.value", LINEAR),
    # T5 (--t5xxl): pre-norm RMSNorm (weight only) → q/k/v and → the feed-forward input; v → o
    _rule("t5", r"^(?P<p>(?:.*\.)?block\.\d+\.layer\.0)\.SelfAttention\.[qkv]$", "{p}.layer_norm", NORM),
    _rule("t5", r"^(?P<p>(?:.*\.)?encoder\.block\.\d+\.layer\.1)\.DenseReluDense\.wi(?:_0|_1)?$", "{p}.layer_norm", NORM),
    _rule("t5", r"^(?P<p>(?:.*\.)?block\.\d+\.layer\.0\.SelfAttention)\.o$", "{p}.v", LINEAR),
    # Llama / Mistral / Qwen-style decoders (--mistral): input/post-attention RMSNorm → projections; v → o
    _rule("llama", r"^(?P<p>(?:.*\.)?layers\.\d+)\.self_attn\.[qkv]_proj$", "{p}.input_layernorm", NORM),
    _rule("llama", r"^(?P<p>(?:.*\.)?layers\.\d+)\.mlp\.(?:gate|up)_proj$", "{p}.post_attention_layernorm", NORM),
    _rule("llama", r"^(?P<p>(?:.*\.)?layers\.\d+\.self_attn)\.o_proj$", "{p}.v_proj", LINEAR),
]

NO_FOLD = [
    NoFold(re.compile(r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense)$"),
           "post-LN BERT: the LayerNorm before it also feeds the residual stream, so 1/s cannot be folded into it"),
    NoFold(re.compile(r"(\.output\.dense|\.mlp\.down_proj|DenseReluDense\.wo|mlp\.2|linear2)$"),
           "its input is an activation function's output (GELU/SiLU/ReLU), which does not commute with 1/s"),
    NoFold(re.compile(r"(attn\.qkv|mlp\.0|linear1|mod\.lin|modulation\.lin)$"),
           "its input is a modulated LayerNorm without an affine weight (Flux-style): no place for 1/s"),
    NoFold(re.compile(r"attn\.proj$"),
           "joint attention: txt and img values share one softmax; this fold is not declared"),
]

UNDECLARED = "no declared preceding layer to fold 1/s into"


def fold_source(layer: str) -> tuple[FoldRule | None, str | None]:
    """(rule, preceding layer) for a consumer, or (None, None)."""
    for rule in FOLD_RULES:
        source = rule.source_of(layer)
        if source is not None:
            return rule, source
    return None, None


def why_not_foldable(layer: str) -> str:
    return next((n.why for n in NO_FOLD if n.consumer.search(layer)), UNDECLARED)
