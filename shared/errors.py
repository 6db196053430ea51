"""User-facing errors: each prints as one line naming the input at fault, and the CLI exits non-zero."""

from __future__ import annotations

from typing import Any


def first_line(obj: Any, default: str | None = None) -> str:
    """The first line of ``str(obj)``; when that is empty, ``default``, else the object's type name."""
    text = str(obj).strip()
    if text:
        return text.splitlines()[0]
    return default if default is not None else type(obj).__name__


class UserError(Exception):
    """A problem with what the user gave us (a file, a key, a URI, a model reference), not a bug.

    The message is a single line that names the input; the CLI prints it without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    def __reduce__(self):
        # Crossing a process boundary (a Ray worker to the driver) keeps the one line: text that a wrapper appended
        # after a newline (Ray Data adds its retry advice to args[0]) is not part of the message.
        message = str(self.args[0]) if self.args else ""
        return (type(self), (message.split("\n", 1)[0],))


class ConfigError(UserError):
    """A config file or override that does not parse or does not validate."""


class StorageError(UserError):
    """A storage root or artifact that cannot be read or written."""


class ModelError(UserError):
    """A model reference that cannot be resolved or loaded."""


class DataError(UserError):
    """Input data that cannot be used (empty, wrong columns, undecodable)."""
