"""Errors that end a command with one clear line instead of a traceback."""

from __future__ import annotations


class QuietError(Exception):
    """An operator mistake or an environment problem: print the message, exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
