import signal
import sys


def _terminate(signum, frame):
    raise KeyboardInterrupt


# Ctrl-C or SIGTERM while torch is still importing: exit quietly (nothing has been written yet).
signal.signal(signal.SIGTERM, _terminate)
try:
    from .cli import main
except KeyboardInterrupt:
    print("interrupted; no output written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
