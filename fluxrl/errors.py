"""User-facing errors: one clear sentence, no traceback on the CLI."""


class FluxrlError(Exception):
    """An error caused by the user's input (a file, a name, a flag). The CLI prints it and exits non-zero."""
