"""User-facing errors: one line, naming the file or layer and what to do."""


class QuantError(Exception):
    """A problem with the user's input or options; the CLI prints it as one line, exit code 2."""

    exit_code = 2


class VerifyError(QuantError):
    """The written file breaks a rule of the ComfyUI format contract."""

    exit_code = 3
