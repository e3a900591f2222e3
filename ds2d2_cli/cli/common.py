"""Shared CLI plumbing: consoles, error-to-exit-code mapping, rich progress, common options."""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ds2d2_cli.errors import Ds2d2Error, TrainingInterrupted

F = TypeVar("F", bound=Callable[..., Any])


class State:
    quiet: bool = False
    debug: bool = False


state = State()


def stdout_console() -> Console:
    """Tables and summaries; plain text (no colour codes) when stdout is not a terminal."""
    return Console(quiet=state.quiet, highlight=False, emoji=False)  # "file:100:" is no emoji code


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False)


def fail(message: str, exit_code: int) -> None:
    stderr_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one clean line and a stable exit code (no traceback unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Ds2d2Error as exc:
            if state.debug:
                traceback.print_exc()
            fail(_escape(str(exc)), exc.exit_code)
        except TrainingInterrupted as exc:
            stderr_console().print(f"[bold yellow]interrupted:[/] {_escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr_console().print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if state.debug:
                traceback.print_exc()
            fail(_escape(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"), 1)

    return wrapper  # type: ignore[return-value]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def write_json_output(path: Optional[Path], data: Any) -> None:
    """`--json FILE` (or `-` for stdout) machine-readable output."""
    from ds2d2_cli import distributed

    if path is None or not distributed.is_main():  # under torchrun: rank 0 speaks for all
        return
    if str(path) == "-":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    from ds2d2_cli.fileio import write_json

    write_json(path, data, indent=2)


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any, owner: "RichReporter"):
        self._progress, self._id, self._owner = progress, task_id, owner

    def update(self, advance: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._progress.update(self._id, advance=advance, info=info)

    def close(self) -> None:
        self._owner._close(self._id)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichReporter:
    """Progress bars on stderr when it is a terminal and not --quiet; notes always (unless quiet)."""

    def __init__(self) -> None:
        self._console = stderr_console()
        self._progress: Progress | None = None
        self._open = 0
        self._interactive = self._console.is_terminal and not state.quiet

    def task(self, description: str, total: int | None, completed: int = 0) -> Any:
        if not self._interactive:
            return _PlainTask(self, description, total, completed)
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=self._console, transient=False,
            )
            self._progress.start()
        self._open += 1
        task_id = self._progress.add_task(description, total=total, completed=completed, info="")
        return _RichTask(self._progress, task_id, self)

    def _close(self, task_id: Any) -> None:
        if self._progress is None:
            return
        self._open -= 1
        if self._open <= 0:
            self._progress.stop()
            self._progress = None
            self._open = 0

    def note(self, message: str) -> None:
        if not state.quiet:
            self._console.print(f"[cyan]note:[/] {_escape(message)}", soft_wrap=True)


class _PlainTask:
    """Non-terminal progress: a plain line at the end (no bar noise in CI logs)."""

    def __init__(self, owner: RichReporter, description: str, total: int | None, completed: int):
        self._owner, self._description, self._done, self._start = owner, description, completed, time.time()
        self._total = total

    def update(self, advance: int = 1, **fields: Any) -> None:
        self._done += advance

    def close(self) -> None:
        # Closed while an error propagates (a `finally`): stay quiet, the error is the one line to print.
        if not state.quiet and sys.exc_info()[1] is None:
            self._owner._console.print(
                f"{self._description}: {self._done}{'/' + str(self._total) if self._total else ''} "
                f"in {time.time() - self._start:.1f}s", soft_wrap=True
            )


PRESET_HELP = "preset name (see `ds2d2 presets`) or path to a YAML preset"
SET_HELP = "override one config value, e.g. --set train.lr=0.01 (repeatable)"
