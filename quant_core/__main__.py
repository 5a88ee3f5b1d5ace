import os
import signal
import stat
import sys


def _exit_interrupted(signum, frame):
    # Nothing is written before the CLI is imported, so there is nothing to unwind; raising instead would unwind
    # through torch's import, where a KeyboardInterrupt inside a C++ callback aborts the process (SIGABRT) and one
    # swallowed by an import probe leaves a half-loaded numpy behind (an unrelated ImportError later).
    print("interrupted; no output written", file=sys.stderr, flush=True)
    os._exit(130)


EARLY_READ_AHEAD_BYTES = 4 << 30  # about what a disk reads during the ~3 s that importing torch takes


def read_ahead_input(argv: list[str]) -> None:
    """Ask the kernel to start reading the input file (`-i/--input`) into the page cache before torch is imported:
    on a cold cache the disk works during start-up instead of after it. Costs no memory that cannot be reclaimed."""
    path = None
    for i, arg in enumerate(argv):
        if arg in ("-i", "--input") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--input="):
            path = arg.split("=", 1)[1]
    if path is None or not hasattr(os, "posix_fadvise"):
        return
    fd = _open_if_regular(path)
    if fd is None:
        return  # missing, a FIFO, a device…: the CLI reports it properly
    try:
        os.posix_fadvise(fd, 0, EARLY_READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advisory only
    finally:
        os.close(fd)


def _open_if_regular(path: str) -> int | None:
    """A read-only fd of `path` if it is a regular file, else None. Torch-free (this runs before torch is imported),
    so not `quant_core.io.reader.open_regular`, but the same rule: stat first (opening a FIFO blocks until a writer
    comes), then a non-blocking open checked again (nothing swapped in between can block it)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def run() -> int:
    """The console scripts' entry point: read ahead, then import the CLI (and torch) and run it."""
    # Ctrl-C or SIGTERM while torch is still importing: exit at once, quietly.
    signal.signal(signal.SIGINT, _exit_interrupted)
    signal.signal(signal.SIGTERM, _exit_interrupted)
    read_ahead_input(sys.argv[1:])
    from .cli import main, preload
    preload(sys.argv[1:])  # the command's module and torch load under the quiet handler too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on an interrupt unwinds and cleans up
    return main()


if __name__ == "__main__":
    sys.exit(run())
