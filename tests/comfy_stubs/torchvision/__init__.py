"""Import-only stub of torchvision for ComfyUI's loader on CPU (see ../_quant_core_stubutil.py). Not the real package."""
import sys as _sys

from _quant_core_stubutil import install as _install

__version__ = "0.0.0+quant_core_stub"
_install(_sys.modules[__name__])
