"""Layers kept in high precision by default, whatever the preset: one table.

Vocabulary / position tables are lookups, not matmuls (ComfyUI only reads int8/fp8 embeddings, and the saving
is small against the quality risk). Input and output layers are tiny, sensitive, and ComfyUI reads some of their
shapes to detect the architecture (docs/FORMATS.md), which packed formats would change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

try:
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse

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


# --- users' regular expressions (layer config `match`, --exclude-layers) ------------------------------------------
# Python's `re` backtracks: `(a+)+$` takes exponential time on a 34-character layer name, and k unbounded
# quantifiers in a row take ~n^k. No linear-time engine is a dependency, so a user's pattern is checked on its
# parse tree before use and refused unless its matching time is bounded (polynomially, with a small exponent).
MAX_PATTERN_CHARS = 4096
MAX_PATTERN_GROUPS = 100
MAX_PATTERN_NESTING = 50
NOMINAL_NAME_CHARS = 64  # a variable quantifier counts as this many choices (a typical layer name's length)
MAX_PATTERN_CHOICES = (NOMINAL_NAME_CHARS + 1) ** 4  # about four variable quantifiers, or fewer plus alternations
MAX_ALTERNATIVES = 10_000  # combinations of alternatives (each is retried in full, unlike a quantifier's steps)
REGEX_RULE = ("user regexes must match in bounded time on Python's backtracking engine: no backreferences or "
              "(?(group)...) conditionals; no quantifier over a part that itself varies in length or has "
              "alternatives (write (a+)+ as a+, (a|ab)* as [ab]*); at most about four variable quantifiers "
              f"(* + ? {{m,n}}), fewer when combined with alternations, and {MAX_ALTERNATIVES} combinations of "
              "alternatives; at most "
              f"{MAX_PATTERN_CHARS} characters, {MAX_PATTERN_GROUPS} groups and {MAX_PATTERN_NESTING} levels of nesting")
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


class _Unbounded(Exception):
    pass


def compile_regex(pattern: str, what: str, noun: str = "regular expression") -> re.Pattern:
    """A user's regular expression whose matching time is bounded (see REGEX_RULE), or a one-line QuantError
    naming the setting `what` (and calling the pattern `noun`)."""
    shown = repr(pattern) if len(pattern) <= 80 else repr(pattern[:77]) + "..."
    if len(pattern) > MAX_PATTERN_CHARS:
        raise QuantError(f"{what}: {noun} {shown} is refused: {len(pattern)} characters; {REGEX_RULE}")
    try:
        parsed = _sre_parse.parse(pattern)
        if parsed.state.groups - 1 > MAX_PATTERN_GROUPS:
            raise _Unbounded(f"{parsed.state.groups - 1} groups")
        _choices(parsed, 0, NOMINAL_NAME_CHARS + 1, MAX_PATTERN_CHOICES)
        _choices(parsed, 0, 1, MAX_ALTERNATIVES)
        return re.compile(pattern)
    except (re.error, OverflowError, ValueError) as e:
        raise QuantError(f"{what}: bad {noun} {shown}: {e}") from None
    except RecursionError:
        raise QuantError(f"{what}: {noun} {shown} is refused: nested too deeply; {REGEX_RULE}") from None
    except _Unbounded as e:
        raise QuantError(f"{what}: {noun} {shown} is refused: {e}; {REGEX_RULE}") from None


def _choices(items, depth: int, star: int, limit: int) -> int:
    """An upper bound on the ways the backtracking engine may try to match `items` (a parsed (sub)pattern) at one
    position: a sequence multiplies, alternatives add, `?` counts 2 and a quantifier without a fixed count `star`.
    Raises _Unbounded above `limit`, and for what no bound exists (backreferences, a quantifier over a varying part)."""
    if depth > MAX_PATTERN_NESTING:
        raise _Unbounded(f"nested more than {MAX_PATTERN_NESTING} deep")
    total = 1
    for op, av in items:
        name = str(op)
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise _Unbounded("it uses a backreference or conditional")
        if name == "BRANCH":
            count = sum(_choices(branch, depth + 1, star, limit) for branch in av[1])
        elif name in ("SUBPATTERN", "ASSERT", "ASSERT_NOT", "ATOMIC_GROUP"):
            count = _choices(av[-1] if name != "ATOMIC_GROUP" else av, depth + 1, star, limit)
        elif name in _REPEATS:
            count = _repeat_choices(*av, depth, star, limit)
        else:
            count = 1
        total = min(total * count, limit + 1)
    if total > limit:
        raise _Unbounded("too many variable quantifiers and alternatives")
    return total


def _repeat_choices(low: int, high: int, body, depth: int, star: int, limit: int) -> int:
    inner = _choices(body, depth + 1, star, limit)
    width = body.getwidth()
    if high > 1 and (inner > 1 or width[0] != width[1]):
        raise _Unbounded("a quantifier repeats a part that itself varies in length or has alternatives "
                         "(nested quantifiers backtrack exponentially)")
    if low == high:
        return inner
    return inner + 1 if high <= 1 else star
