"""How long-running library code reports progress without printing.

Stages take a `Reporter`; the CLI passes one that draws rich progress bars (or nothing
with `--quiet` / when stdout is not a terminal), tests and API users get `NullReporter`.
"""

from __future__ import annotations

from typing import Any, Protocol


class Task(Protocol):
    def update(self, advance: int = 1, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int | None, completed: int = 0) -> Task: ...

    def note(self, message: str) -> None: ...


class _NullTask:
    def update(self, advance: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class NullReporter:
    """Reports nothing; notes are kept so callers and tests can read them."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def task(self, description: str, total: int | None, completed: int = 0) -> Task:
        return _NullTask()

    def note(self, message: str) -> None:
        self.notes.append(message)
