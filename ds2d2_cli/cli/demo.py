"""`ds2d2 demo`: what a newcomer runs first (`make demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import RichReporter, handle_errors, stdout_console, write_json_output



def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def print_results(results: dict[str, Any], out: Path) -> None:
    console = stdout_console()
    table = Table(title=f"ds2d2 demo: held-out synthetic scenes ({results['preset']}, {results['device']})",
                  caption="AP in %, COCO metrics by pycocotools; baseline = same student, schedule and seed, no teacher")
    for column in ("model", "backbone", "mAP", "AP50", "AP75", "APs", "params", "images/s"):
        table.add_column(column, justify="left" if column in ("model", "backbone") else "right")
    from ds2d2_cli.demo import STUDENT_LABELS, STUDENTS

    rows = [("teacher", f"teacher ({results.get('teacher_source', 'trained')})"),
            *((name, f"{STUDENT_LABELS[name]} student") for name in STUDENTS)]
    for key, label in rows:
        row = results[key]
        table.add_row(label, row["backbone"], _pct(row["mAP"]), _pct(row["AP50"]), _pct(row["AP75"]),
                      _pct(row["APs"]), f"{row['params'] / 1e6:.1f} M", f"{row['images_per_s']:.1f}")
    console.print(table)
    for name, gain in results["gains"].items():
        colour = "green" if gain["AP50_points"] > 0 else "red"
        console.print(f"{STUDENT_LABELS[name]} student vs baseline: [{colour}]{gain['AP50_points']:+.1f} AP50[/], "
                      f"{gain['mAP_points']:+.1f} mAP (points)")
    console.print("one run, one seed: `ds2d2 study` gives the paired gain over seeds with its interval")
    export = results.get("export")
    if export:
        check = export["verify"]
        console.print(f"exported: {export['file']} ({export['bytes'] / 1e6:.1f} MB); onnxruntime vs PyTorch on a "
                      f"held-out patch: {check['matched']} detections matched, max box diff "
                      f"{check['max_box_abs_diff']:.2g} px")
    console.print(f"pictures: {results['pictures']['detections']}, {results['pictures']['training_curves']}")
    console.print(f"results: {out / 'results.json'}; whole demo {results['wall_s']:.0f} s "
                  f"(estimated at its start: {results['estimated_s']:.0f} s)")
    if results.get("quick"):
        console.print("[yellow]--quick: a smoke run of every stage on a tiny schedule; these figures claim nothing "
                      "about accuracy (run `ds2d2 demo` without --quick for that)[/]")


@handle_errors
def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="demo folder (data, runs, pictures, results.json) "
                                       "\\[default: runs/demo, with --quick runs/demo-quick]", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N"),
    fresh: bool = typer.Option(False, "--fresh", help="start over: delete this demo's data, runs and results "
                               "(a re-run reuses them only when made with the same settings, else it stops)"),
    preset: str = typer.Option("tiny-synthetic", "--preset", "-p", help="a preset on the synthetic class set"),
    overrides: List[str] = typer.Option([], "--set", help="override one config value (repeatable)"),
    scenes: Optional[int] = typer.Option(None, "--scenes", min=2, help="synthetic scenes to generate (a quarter "
                                         "held out) \\[default: 24, with --quick 6]", show_default=False),
    scene_size: Optional[int] = typer.Option(None, "--scene-size", min=64, help="side of each synthetic scene in "
                                             "pixels \\[default: 640, with --quick 256]", show_default=False),
    quick: bool = typer.Option(False, "--quick", help="a smoke run of every stage in about a minute (tiny "
                               "schedules and scenes; no accuracy claim)"),
    train_teacher: bool = typer.Option(False, "--train-teacher", help="train the teacher here (the shipped "
                                       "teacher's recipe, about 40 min on 2 cores) instead of using the teacher "
                                       "shipped with ds2d2; needed for --set teacher.* or other scenes"),
    jobs: int = typer.Option(1, "--jobs", min=1, help="train this many models at once, each in its own process "
                             "(CPU; the amplifier and students are independent once the teacher is there)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads per training \\[default: the "
                                          "machine's, shared out among --jobs]", show_default=False),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write results as JSON to FILE (`-` for stdout)"),
) -> None:
    """Distill on synthetic scenes: shipped teacher, amplifier, students (baseline, FitNet, CWD, DS2D2), eval, export.

    CPU-only, nothing downloaded; it says at its start how long it will take on this machine
    (measured from a few steps of each model) and refreshes that after every stage.
    Example: ds2d2 demo --out runs/demo; ds2d2 demo --quick (a one-minute smoke run)
    """
    from ds2d2_cli.engine import resolve_device
    from ds2d2_cli.demo import QUICK_SCENE_SIZE, QUICK_SCENES, SCENE_SIZE, SCENES, run_demo

    out = out or Path("runs/demo-quick" if quick else "runs/demo")
    scenes = scenes or (QUICK_SCENES if quick else SCENES)
    scene_size = scene_size or (QUICK_SCENE_SIZE if quick else SCENE_SIZE)
    results = run_demo(out, device=resolve_device(device), fresh=fresh, preset=preset, overrides=list(overrides),
                       scenes=scenes, scene_size=scene_size, quick=quick, train_teacher=train_teacher,
                       jobs=jobs, threads=threads, reporter=RichReporter())
    if not (json_out is not None and str(json_out) == "-"):
        print_results(results, out)
    write_json_output(json_out, results)
