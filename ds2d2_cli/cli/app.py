"""The `ds2d2` command: a thin Typer shell over the stage modules in `ds2d2_cli.stages`."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.table import Table

from ds2d2_cli import __version__
from ds2d2_cli.cli import compare, demo, prepare, stages, study
from ds2d2_cli.cli.common import PRESET_HELP, SET_HELP, handle_errors, state, stdout_console

app = typer.Typer(
    name="ds2d2",
    help=(
        "Small, fast remote-sensing detectors by DS2D2 knowledge distillation.\n\n"
        "Pipeline: prepare-data -> train-teacher -> train-amplifier -> distill -> eval -> export.\n\n"
        "Example:\n\n"
        "  ds2d2 prepare-data dota --split 1024\n\n"
        "  ds2d2 train-teacher --preset retina-dota --out runs/teacher\n\n"
        "  ds2d2 distill --teacher runs/teacher/model.safetensors --preset retina-dota"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ds2d2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars, notes or tables (errors still go to stderr)"),
    debug: bool = typer.Option(False, "--debug", help="show Python tracebacks on errors"),
) -> None:
    state.quiet = quiet
    state.debug = debug


app.add_typer(prepare.app, name="prepare-data")
stages.register(app)
app.command("demo")(demo.demo_command)
app.command("compare")(compare.compare_command)
app.command("study")(study.study_command)


@app.command("presets")
@handle_errors
def presets_command(
    show: Optional[str] = typer.Argument(None, help="print this preset's resolved config as JSON"),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """List the shipped presets, or show one resolved (`ds2d2 presets tiny-synthetic`)."""
    from ds2d2_cli.config import available_presets, config_to_json, load_config

    console = stdout_console()
    if show is not None:
        console.print_json(config_to_json(load_config(show, overrides)))
        return
    table = Table(title="presets")
    for column in ("name", "detector", "teacher", "student", "input", "data"):
        table.add_column(column, no_wrap=True)  # names and paths stay whole, to be typed back
    for name in available_presets():
        cfg = load_config(name)
        table.add_row(name, cfg.teacher.detector, cfg.teacher.label, cfg.student.label,
                      str(cfg.input.size), str(cfg.data.root))
    if not console.is_terminal:
        console.width = max(console.width, 120)  # piped: no 80-column squeeze
    console.print(table)


GLOBAL_FLAGS = ("--debug", "--quiet", "-q")


def global_flags_first(args: list[str]) -> list[str]:
    """`ds2d2 CMD ... --debug` means `ds2d2 --debug CMD ...`: users put these flags anywhere."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]


def main() -> None:
    app(args=global_flags_first(sys.argv[1:]))


_ = PRESET_HELP  # re-exported for stage modules
