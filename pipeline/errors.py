"""The one exception type users see: a problem they can act on, printed in one line."""


class PipelineError(Exception):
    """Bad input or configuration: names the file, key or option and what to do about it.

    The CLI prints the message on one line and exits with code 2; tracebacks are for bugs.
    """
