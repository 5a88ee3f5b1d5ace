"""Methods choose the codes for a weight on the scale grid its format chose.

Interface: `method.codes(fmt, grid, layer) -> Tensor`, the chosen grid values in scaled units (same shape as
`grid.work`); the format packs them. Any method works with any format through that one call.
`make_method(options)` builds the method an options record asks for.
"""
from __future__ import annotations

from ..errors import QuantError
from .learned import LearnedRounding
from .rtn import RoundToNearest

# name -> builder(options); `options` is a QuantOptions (or None for the defaults)
METHODS = {
    "rtn": lambda options: RoundToNearest(),
    "learned": lambda options: LearnedRounding(options.learned if options is not None else None),
}


def get_method(name: str, options=None):
    try:
        builder = METHODS[name]
    except KeyError:
        raise QuantError(f"unknown method {name!r} (available: {', '.join(METHODS)})") from None
    return builder(options)
