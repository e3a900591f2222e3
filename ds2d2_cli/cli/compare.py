"""`ds2d2 compare RUN...`: an ablation as a table (deltas to the first run) and two charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import RichReporter, handle_errors, stdout_console, write_json_output
from ds2d2_cli.evaluation import METRIC_KEYS


def _cell(value: float | None, delta: float | None = None) -> str:
    if value is None:
        return "-"
    if delta is None:
        return f"{value:.1f}"
    colour = "green" if delta > 0 else ("red" if delta < 0 else "dim")
    return f"{value:.1f}\n[{colour}]{delta:+.1f}[/]"


def _count(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def print_comparison(comparison: dict[str, Any]) -> None:
    console = stdout_console()
    table = Table(title=f"compare (AP in %, deltas vs {comparison['reference']})")
    table.add_column("run (method)", overflow="fold", min_width=8)
    for key in METRIC_KEYS:
        table.add_column(key, justify="right", no_wrap=True)
    table.add_column("img/s", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    for row in comparison["runs"]:
        deltas = row.get("deltas") or {}
        speed = row.get("images_per_s")
        table.add_row(
            f"{row['name']}\n[dim]({row['info'].get('method') or row['info'].get('stage') or '-'})[/]",
            *(_cell(row["metrics"][k], deltas.get(k)) for k in METRIC_KEYS),
            f"{speed:.1f}" if isinstance(speed, (int, float)) else "-", _count(row["info"].get("params")),
        )
    console.print(table)
    classes = comparison["classes"]
    if classes and len(comparison["runs"]) > 1:
        per_class = Table(title="per-class AP50 (%)")
        per_class.add_column("class", no_wrap=True)
        for row in comparison["runs"]:
            per_class.add_column(row["name"], justify="right", overflow="fold", min_width=5)
        for name in classes:
            per_class.add_row(name, *(
                _cell(row["per_class_AP50"][name], (row.get("per_class_delta") or {}).get(name))
                for row in comparison["runs"]))
        console.print(per_class)


@handle_errors
def compare_command(
    runs: List[Path] = typer.Argument(..., help="run folders (with summary.json) or `ds2d2 eval --json` files; "
                                      "the first is the reference"),
    out: Optional[Path] = typer.Option(Path("runs/compare"), "--out", "-o",
                                       help="folder for compare.json and the PNG charts"),
    names: List[str] = typer.Option([], "--name", help="label for each run, in order (repeatable) "
                                    "\\[default: folder names]", show_default=False),
    no_charts: bool = typer.Option(False, "--no-charts", help="table only; write nothing"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the comparison as JSON to FILE "
                                            "(`-` for stdout)"),
) -> None:
    """Compare runs: metrics with deltas to the first run, per-class AP50 deltas and training curves.

    Example: ds2d2 compare runs/baseline runs/fitnet runs/ds2d2 --out runs/compare
    """
    from ds2d2_cli.compare import compare_runs, write_comparison

    comparison = compare_runs(runs, names or None)
    reporter = RichReporter()
    for warning in comparison["warnings"]:
        reporter.note(warning)
    if not no_charts and out is not None:
        comparison["files"] = write_comparison(comparison, out)
    if not (json_out is not None and str(json_out) == "-"):
        print_comparison(comparison)
        for what, path in (comparison.get("files") or {}).items():
            reporter.note(f"{what.replace('_', ' ')}: {path}")
    write_json_output(json_out, comparison)
