"""Errors a user can cause and fix. The CLI prints their message as one line and exits with their code;
anything else is a bug and keeps its traceback."""


class S2EdgeError(Exception):
    """Base class: a clear, one-line, actionable message."""

    exit_code = 1


class InputError(S2EdgeError):
    """Bad arguments, empty text, malformed codes or references."""

    exit_code = 2


class CheckpointError(S2EdgeError):
    """Missing, truncated or inconsistent checkpoint files."""

    exit_code = 3


class AudioError(S2EdgeError):
    """Unreadable, silent, NaN or otherwise unusable audio."""

    exit_code = 4


class ResourceError(S2EdgeError):
    """Not enough GPU or host memory, or an unsupported device."""

    exit_code = 5
