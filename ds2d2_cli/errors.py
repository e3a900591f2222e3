"""Errors the library raises; the CLI turns them into one-line messages and exit codes.

Library code never prints or exits: it raises one of these, and `ds2d2_cli.cli` maps
`InputError` to exit code 2 (usage or bad input) and any other `Ds2d2Error` to 1.
"""

from __future__ import annotations

from pathlib import Path


class Ds2d2Error(Exception):
    """A failure we can explain in one line (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class InputError(Ds2d2Error):
    """Bad user input: a file, folder, preset, option or checkpoint we cannot use (exit code 2)."""

    exit_code = 2
