"""The one error type for user mistakes: the CLI prints its message on one line and exits 2."""


class KilnError(ValueError):
    """A bad input, path or setting. The message names the file, row or setting at fault."""
