"""`ds2d2 demo`: what a newcomer runs first (`make demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import RichReporter, handle_errors, stdout_console, write_json_output

ROWS = (("teacher", "teacher"), ("baseline", "baseline student"), ("ds2d2", "DS2D2 student"))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def print_results(results: dict[str, Any], out: Path) -> None:
    console = stdout_console()
    table = Table(title=f"ds2d2 demo: held-out synthetic scenes ({results['preset']}, {results['device']})",
                  caption="AP in %, COCO metrics by pycocotools; baseline = same student, schedule and seed, no teacher")
    for column in ("model", "backbone", "mAP", "AP50", "AP75", "APs", "params", "images/s"):
        table.add_column(column, justify="left" if column in ("model", "backbone") else "right")
    for key, label in ROWS:
        row = results[key]
        table.add_row(label, row["backbone"], _pct(row["mAP"]), _pct(row["AP50"]), _pct(row["AP75"]),
                      _pct(row["APs"]), f"{row['params'] / 1e6:.1f} M", f"{row['images_per_s']:.1f}")
    console.print(table)
    gain = results["gain_AP50_points"]
    colour = "green" if gain > 0 else "red"
    console.print(f"DS2D2 student vs baseline: [{colour}]{gain:+.1f} AP50[/], {results['gain_mAP_points']:+.1f} mAP "
                  f"(points); teacher AP50 {_pct(results['teacher']['AP50'])}")
    export = results.get("export")
    if export:
        check = export["verify"]
        console.print(f"exported: {export['file']} ({export['bytes'] / 1e6:.1f} MB); onnxruntime vs PyTorch on a "
                      f"held-out patch: {check['matched']} detections matched, max box diff "
                      f"{check['max_box_abs_diff']:.2g} px")
    console.print(f"pictures: {results['pictures']['detections']}, {results['pictures']['training_curves']}")
    console.print(f"results: {out / 'results.json'}; whole demo {results['wall_s']:.0f} s")


@handle_errors
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="demo folder (data, runs, pictures, results.json)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N"),
    fresh: bool = typer.Option(False, "--fresh", help="start over: delete this demo's data, runs and results "
                               "(a re-run reuses them only when made with the same settings, else it stops)"),
    preset: str = typer.Option("tiny-synthetic", "--preset", "-p", help="a preset on the synthetic class set"),
    overrides: List[str] = typer.Option([], "--set", help="override one config value (repeatable)"),
    scenes: int = typer.Option(24, "--scenes", min=2, help="synthetic scenes to generate (a quarter held out)"),
    scene_size: int = typer.Option(640, "--scene-size", min=64, help="side of each synthetic scene in pixels"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write results as JSON to FILE (`-` for stdout)"),
) -> None:
    """Run the whole pipeline on synthetic scenes: teacher, amplifier, DS2D2 student, baseline, eval, export.

    CPU-only, nothing downloaded, about 10 minutes on 2 cores. Example: ds2d2 demo --out runs/demo
    """
    from ds2d2_cli.engine import resolve_device
    from ds2d2_cli.demo import run_demo

    results = run_demo(out, device=resolve_device(device), fresh=fresh, preset=preset, overrides=list(overrides),
                       scenes=scenes, scene_size=scene_size, reporter=RichReporter())
    if not (json_out is not None and str(json_out) == "-"):
        print_results(results, out)
    write_json_output(json_out, results)
