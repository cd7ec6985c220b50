"""The project's exceptions: every message says what was wrong, where, and what to do."""


class BorderlineError(Exception):
    """Base of every error this package raises on purpose."""


class DatasetError(BorderlineError, ValueError):
    """A dataset folder, annotation file, video or image folder is missing or malformed."""


class CheckpointError(BorderlineError, ValueError):
    """A checkpoint or weights file cannot be used (wrong shapes, truncated, not tensors)."""


class ParameterError(BorderlineError, ValueError):
    """A stage or function parameter is out of range or of the wrong type."""


class RunFolderError(BorderlineError):
    """A run folder lacks what a stage needs, or was made with other parameters."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty), for
    messages that quote an error raised by another library."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
