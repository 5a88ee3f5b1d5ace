"""Methods choose the codes for a weight on the scale grid its format chose.

Interface: `method.codes(fmt, grid, layer) -> Tensor`, the chosen grid values in scaled units (same shape as
`grid.work`); the format packs them. Any method works with any format through that one call.
"""
from __future__ import annotations

from ..errors import QuantError
from .rtn import RoundToNearest

METHODS = {"rtn": RoundToNearest()}


def get_method(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise QuantError(f"unknown method {name!r} (available: {', '.join(METHODS)})") from None
