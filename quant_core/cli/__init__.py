"""`python -m quant_core` / `convert_to_quant`: one module per command (convert, verify, calibrate, demo).

Anything that is not a subcommand is a conversion (`-i model.safetensors …`)."""
from __future__ import annotations

import signal
import sys
import threading

from ..errors import QuantError


def _run_verify(argv: list[str]) -> int:
    from .verify import run_verify
    return run_verify(argv)


def _run_calibrate(argv: list[str]) -> int:
    from .calibrate import run_calibrate
    return run_calibrate(argv)


def _run_demo(argv: list[str]) -> int:
    from .demo import run_demo
    return run_demo(argv)


COMMANDS = {"verify": _run_verify, "calibrate": _run_calibrate, "demo": _run_demo}
MODULES = {"verify": "verify", "calibrate": "calibrate", "demo": "demo"}


def preload(argv: list[str]) -> None:
    """Import the module of the command `argv` names (and with it torch) without running it: the console script
    does this while an interrupt still exits at once, so no signal lands inside a half-done import."""
    import importlib
    importlib.import_module(f"{__name__}.{MODULES.get(argv[0] if argv else '', 'convert')}")
    import torch  # noqa: F401 (every command needs it; loaded here, not at the first tensor)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        command = COMMANDS.get(argv[0]) if argv else None
        if command is not None:
            return command(argv[1:])
        from .convert import run_convert
        return run_convert(argv)
    except QuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        from ..io.writer import remove_live_temps
        remove_live_temps()
        print("interrupted; no output written", file=sys.stderr)
        return 130
