"""`ds2d2 study`: methods x seeds against the undistilled student, as one table with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import PRESET_HELP, SET_HELP, RichReporter, handle_errors, stdout_console, write_json_output
from ds2d2_cli.cli.stages import DATA_HELP, DEVICE_HELP, _device, _json_to_stdout, resolve_config
from ds2d2_cli.errors import InputError

DEFAULT_METHODS = "none,fitnet,cwd,pkd,mgd,fgd,ds2d2"


def _names(value: str, option: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise InputError(f"{option} takes a comma list (got {value!r})")
    return names


def _seeds(value: str) -> list[int]:
    try:
        return [int(v) for v in _names(value, "--seeds")]
    except ValueError:
        raise InputError(f"--seeds takes a comma list of integers (got {value!r})") from None


def print_study(record: dict[str, Any]) -> None:
    from ds2d2_cli.study import gain_text

    shown = ("mAP", "AP50", "AP75", "APs")  # study.md has APm and APl too

    seeds = ",".join(map(str, record["seeds"]))
    where = "scenes" if record.get("merged_patches") else "patches"
    table = Table(title=f"study: AP points on {record['eval_split']} {where}, mean ± std over seeds {seeds}; "
                        "gain vs none paired by seed [95% CI], * excludes 0")
    table.add_column("method", no_wrap=True)
    for metric in shown:
        table.add_column(metric, justify="right", no_wrap=True)
    table.add_column("AP50 gain", justify="right", no_wrap=True)
    table.add_column("mAP gain", justify="right", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    for name, points in (record.get("teacher_metrics") or {}).items():
        table.add_row("teacher" if name == "all" else f"teacher s{name}",
                      *("-" if points.get(m) is None else f"{points[m]:.1f}" for m in shown), "", "", "")
    for method, entry in record["table"].items():
        gain = entry.get("gain") or {}
        cost = entry.get("step_cost_vs_none")
        table.add_row(method, *("-" if entry["mean"][m] is None else f"{entry['mean'][m]:.1f}±{entry['std'][m]:.1f}"
                                for m in shown),
                      gain_text(gain.get("AP50"), 1), gain_text(gain.get("mAP"), 1), f"{cost:.2f}x" if cost else "-")
    console = stdout_console()
    console.print(table)
    for failed in record.get("failed", []):
        console.print(f"[red]failed:[/] {failed['method']} seed {failed['seed']}: {failed.get('error')}")
    for key, path in (record.get("outputs") or {}).items():
        console.print(f"{key}: {path}")


@handle_errors
def study_command(
    preset: str = typer.Option(..., "--preset", "-p", help=PRESET_HELP),
    teacher: Optional[Path] = typer.Option(None, "--teacher", "-t", help="the teacher's model.safetensors "
                                           "(every method but none)", show_default=False),
    amplifier: Optional[Path] = typer.Option(None, "--amplifier", "-a", help="the amplifier's model.safetensors "
                                             "(DS2D2's implicit high-frequency stream)", show_default=False),
    assistant: Optional[Path] = typer.Option(None, "--assistant-teacher", help="method chain's first teacher "
                                             "(a weaker teacher or teacher assistant's model.safetensors)",
                                             show_default=False),
    methods: str = typer.Option(DEFAULT_METHODS, "--methods", help="comma list of registry methods and DS2D2 "
                                "ablations (ds2d2-explicit, ds2d2-implicit, ds2d2-no-disw, ds2d2-adapted) and approximations "
                                "(ds2d2-implicit-every-2, -4; Faster R-CNN ds2d2-rois-128); fgd-recipe, mgd-recipe (their reference "
                                "recipe: student from teacher, clip 35), none-recipe (that recipe without a "
                                "distillation loss, its control), ds2d2-recipe (DS2D2 with it); chain (DS2D2 from "
                                "--assistant-teacher, then from --teacher); none is added as the baseline"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="comma list of student seeds"),
    out: Path = typer.Option(Path("runs/study"), "--out", "-o", help="study folder (runs/<method>/seed<S>, "
                             "study.json, study.md, study.png)"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP, show_default=False),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help="student iterations per run "
                                            "(overrides the preset's schedule)"),
    merge_patches: bool = typer.Option(False, "--merge-patches", help="score whole scenes (DOTA-style patch "
                                       "detections merged back), not patches"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    jobs: int = typer.Option(1, "--jobs", "-j", help="train this many runs at once, each in its own process "
                             "with an equal share of the torch threads (the same figures as one job with that many threads)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write study.json's record to FILE "
                                            "(`-` for stdout)"),
) -> None:
    """Which distillation method wins on your data, and is the gain real?

    Trains every method x seed with the same data, schedule and teacher (finished runs are
    reused, interrupted ones resumed), then one table: mean ± std per metric and the gain
    over `none` paired by seed with a 95% t-interval. Exit code 0 only when every run finished.

    Example: ds2d2 study --preset retina-dota --teacher runs/teacher/model.safetensors
    --amplifier runs/amplifier/model.safetensors --seeds 0,1,2 --out runs/study
    """
    from ds2d2_cli.study import BASELINE, needs_amplifier, plan_study, run_study, study_methods, write_study

    names = _names(methods, "--methods")
    unknown = [n for n in names if n not in study_methods()]
    if unknown:
        raise InputError(f"--methods: unknown {', '.join(unknown)}; available: {', '.join(study_methods())}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    config = resolve_config(preset, list(overrides), stage="student", command="study", max_iters=max_iters)
    data_dir = Path(data) if data is not None else Path(config.data.root)
    runs = plan_study(config, names, _seeds(seeds), out, teacher=teacher, amplifier=amplifier, assistant=assistant)
    reporter = RichReporter()
    if amplifier is None and any(needs_amplifier(run.config) for run in runs):
        reporter.note("no --amplifier: DS2D2's implicit high-frequency stream is off in this study")
    record = run_study(runs, data_dir=data_dir, preset=preset, device=_device(device), merge_patches=merge_patches,
                       reporter=reporter, jobs=jobs)
    record["outputs"] = write_study(record, out)
    if not _json_to_stdout(json_out):
        print_study(record)
    write_json_output(json_out, record)
    if not record["complete"]:
        raise typer.Exit(1)
