"""The one exception users see: a one-line message naming the problem and what to do."""


class AtlasError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name when it has none): drivers and
    libraries write pages, a user-facing message quotes one line."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
