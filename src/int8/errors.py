"""Errors a user can cause and fix.

Every error here is a user-facing problem (bad input, missing file, no access):
the CLI prints its message and hint without a traceback and exits with code 2.
Anything else that escapes is a bug in int8 and keeps its traceback.
"""

from __future__ import annotations


class Int8Error(Exception):
    """A problem the user can fix; `hint` says how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(Int8Error):
    """An option or argument's value is not one int8 accepts (checked before any work)."""


class SourceNotFound(Int8Error):
    """The preset, folder or Hub repo named as a source does not exist."""


class NoWeightsFound(Int8Error):
    """A folder or repo has no weight files that int8 can read."""


class CorruptCheckpoint(Int8Error):
    """A weight file is truncated, malformed, or disagrees with its index."""


class UnsupportedModel(Int8Error):
    """The architecture or a tensor layout is not one int8 can convert."""


class BadTensor(Int8Error):
    """A tensor holds values that would make the output garbage (NaN, Inf, overflow)."""


class OutputExists(Int8Error):
    """The output folder exists and --overwrite was not given."""


class OutputError(Int8Error):
    """The output could not be written (disk full, permissions)."""


class HubError(Int8Error):
    """The Hub (or the server at HF_ENDPOINT) refused or failed a request."""


class VerificationFailed(Int8Error):
    """A checkpoint did not pass verification (used by push)."""


class UnsafePath(CorruptCheckpoint):
    """A checkpoint names or links to a file outside its folder (an absolute name, a ``..`` escape,
    a symlink out of the folder): int8 never reads such a file."""


class SourceChanged(CorruptCheckpoint):
    """A source file changed size (was truncated or rewritten) while int8 was reading it."""


class ResourceLimit(CorruptCheckpoint):
    """A checkpoint declares more tensors, or a larger header, than any real model has."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's text (at most ``limit`` characters), or its class name when it has none:
    how a message quotes an error it translates."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
