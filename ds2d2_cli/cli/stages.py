"""Training, evaluation and export subcommands."""

from __future__ import annotations

import typer

from ds2d2_cli.cli.common import fail

_PENDING = ("train-teacher", "train-amplifier", "distill", "eval", "export")


def register(app: typer.Typer) -> None:
    for name in _PENDING:
        app.command(
            name,
            help=f"{name}: not available yet in this version.",
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        )(_pending(name))


def _pending(name: str):
    def command(ctx: typer.Context) -> None:
        fail(f"`ds2d2 {name}` is not available yet in this version", 2)

    command.__name__ = name.replace("-", "_")
    return command
