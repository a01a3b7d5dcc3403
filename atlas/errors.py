"""The one exception users see: a one-line message naming the problem and what to do."""


class AtlasError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
