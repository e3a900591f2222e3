"""Errors the library raises; the CLI turns them into one-line messages and exit codes.

Library code never prints or exits: it raises one of these, and `ds2d2_cli.cli` maps
`InputError` to exit code 2 (usage or bad input) and any other `Ds2d2Error` to 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def one_line(text: Any) -> str:
    """An exception's text as one line (error messages are always one line)."""
    return " ".join(str(text).split())


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a training run after its resume checkpoint was written.

    A KeyboardInterrupt, so it passes through `except Exception`; the CLI exits with
    128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), as shells expect.
    """

    def __init__(self, signal_name: str, signal_number: int, iteration: int, checkpoint: Path | None):
        self.signal_name = signal_name
        self.exit_code = 128 + signal_number
        self.iteration = iteration
        self.checkpoint = checkpoint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = (f"checkpoint at iteration {self.iteration}: {self.checkpoint}; continue with --resume"
                 if self.checkpoint is not None else "no iteration finished, nothing to resume")
        return f"stopped by {self.signal_name} ({where})"
