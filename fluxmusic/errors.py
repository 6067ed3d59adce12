"""The one exception type for user mistakes: a clear message naming the bad value and what is allowed."""


class FluxMusicError(ValueError):
    """A user-facing error. The CLI prints its message and exits 2; the server answers INVALID_ARGUMENT."""
