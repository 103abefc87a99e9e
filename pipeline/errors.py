"""The one exception type users see: a problem they can act on, printed in one line."""


class PipelineError(Exception):
    """Bad input or configuration: names the file, key or option and what to do about it.

    The CLI prints the message on one line and exits with code 2; tracebacks are for bugs.
    """


def reason(err: BaseException, limit: int = 300) -> str:
    """A library error as a clause of a one-line message: whitespace collapsed and, past `limit`
    characters, cut at a word boundary with an ellipsis (never mid-word)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."
