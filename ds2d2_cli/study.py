"""`ds2d2 study`: every distillation method x seed against the undistilled student, with error bars.

One teacher (and amplifier), one data set, one schedule; per seed the student is trained
once per method (`none` included), so method and baseline share the seed: the gain is
the paired difference `method - none` per seed, reported with a 95% t-interval over the
seeds. A gain whose interval excludes zero is called distinguishable; the rest is noise
at this number of seeds.

Finished runs are reused and interrupted ones resumed, decided from each run folder's
config.json and teacher hash, so a study cut off by a session or a job limit continues
where it stopped. `plan_study` lays out the runs of the CLI; callers with other layouts
(the gain benchmark trains a teacher per seed) pass their own `StudyRun`s to `run_study`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ds2d2_cli import distributed
from ds2d2_cli.config import RunConfig
from ds2d2_cli.distill.registry import DS2D2_STREAMS, METHODS
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.models.families import FAMILIES
from ds2d2_cli.fileio import atomic_path, read_json, write_json
from ds2d2_cli.parallel import Job, Outcome, run_jobs, threads_per_job
from ds2d2_cli.progress import NullReporter, Reporter
from ds2d2_cli.provenance import machine
from ds2d2_cli.stages.distill import needs_amplifier, needs_teacher

METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
GAIN_METRICS = ("AP50", "mAP")
BASELINE = "none"

# DS2D2's stream ablations, selectable as methods; every registry method is one by its name.
ABLATIONS: dict[str, dict[str, Any]] = {
    "ds2d2-explicit": {"method": "ds2d2", "streams": ("explicit-low", "explicit-high")},
    "ds2d2-implicit": {"method": "ds2d2", "streams": ("implicit-full", "implicit-high")},
    "ds2d2-no-disw": {"method": "ds2d2", "streams": DS2D2_STREAMS, "disw": False},
    "ds2d2-adapted": {"method": "ds2d2", "streams": DS2D2_STREAMS, "implicit_input": "adapted"},
    # approximations (named settings, off in every preset): what a cheaper step costs in AP
    "ds2d2-implicit-every-2": {"method": "ds2d2", "streams": DS2D2_STREAMS, "implicit_every": 2},
    "ds2d2-implicit-every-4": {"method": "ds2d2", "streams": DS2D2_STREAMS, "implicit_every": 4},
    "ds2d2-rois-128": {"method": "ds2d2", "streams": DS2D2_STREAMS, "implicit_rois": 128},  # Faster R-CNN
}
# FGD's and MGD's reference recipes (yzd-v/FGD and yzd-v/MGD detection configs): the student's neck and
# heads start from the teacher (`init_student=True`) and gradients are clipped at 35
# (`optimizer_config grad_clip max_norm=35`). As methods, so that `none` stays a plain baseline.
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # name: (distill settings, train settings)
    "fgd-recipe": ({"method": "fgd", "init_student_from_teacher": True}, {"grad_clip": 35.0}),
    "mgd-recipe": ({"method": "mgd", "init_student_from_teacher": True}, {"grad_clip": 35.0}),
    # the recipe without a distillation loss: what the start from the teacher and the clipping give alone
    "none-recipe": ({"method": "none", "init_student_from_teacher": True}, {"grad_clip": 35.0}),
    # DS2D2 given the same start and clipping (not the authors' recipe: theirs starts from ImageNet)
    "ds2d2-recipe": ({"method": "ds2d2", "streams": DS2D2_STREAMS, "init_student_from_teacher": True},
                     {"grad_clip": 35.0}),
}
LABELS = {
    "none": "baseline (no teacher)", "fitnet": "FitNet", "cwd": "CWD", "pkd": "PKD", "mgd": "MGD", "fgd": "FGD",
    "dist": "DIST", "ds2d2-dist": "DS2D2 + DIST", "ds2d2": "DS2D2", "ds2d2-explicit": "DS2D2 explicit streams only",
    "ds2d2-implicit": "DS2D2 implicit streams only",
    "ds2d2-no-disw": "DS2D2 without DISW", "ds2d2-adapted": "DS2D2, implicit streams on adapted features",
    "ds2d2-implicit-every-2": "DS2D2, implicit streams every 2nd step",
    "ds2d2-implicit-every-4": "DS2D2, implicit streams every 4th step",
    "ds2d2-rois-128": "DS2D2, 128 RoIs per image in the implicit streams",
    "chain": "DS2D2 chain: from the assistant teacher, then from the teacher",
    "fgd-recipe": "FGD, reference recipe (student from teacher, clip 35)",
    "mgd-recipe": "MGD, reference recipe (student from teacher, clip 35)",
    "none-recipe": "no distillation loss, FGD/MGD recipe (student from teacher, clip 35)",
    "ds2d2-recipe": "DS2D2 with the FGD/MGD recipe (student from teacher, clip 35)",
}
# Progressive distillation (MTPD, Cao et al. 2023; TAKD): the student is distilled with DS2D2 from
# `--assistant-teacher` first, then, started from that student (`distill --init-student`), from
# `--teacher`; same seed and schedule in both stages. Its row in the table is the second stage.
CHAIN = "chain"
CHAIN_FIRST = "chain-assistant"  # the first stages' folder: OUT/runs/chain-assistant/seed<S>


def study_methods() -> list[str]:
    return [*METHODS, *ABLATIONS, *RECIPES, CHAIN]


def method_settings(name: str) -> dict[str, Any]:
    """The distill settings a study method sets (the rest from the preset)."""
    if name in ABLATIONS:
        return dict(ABLATIONS[name])
    if name in RECIPES:
        return dict(RECIPES[name][0])
    if name == CHAIN:  # both stages
        return {"method": "ds2d2", "streams": DS2D2_STREAMS}
    if name not in METHODS:
        raise InputError(f"unknown study method {name!r}; available: {', '.join(study_methods())}")
    return {"method": name, "streams": DS2D2_STREAMS} if METHODS[name].ablatable else {"method": name}


def method_config(config: RunConfig, name: str) -> RunConfig:
    update: dict[str, Any] = {"distill": config.distill.model_copy(update=method_settings(name))}
    if name in RECIPES:
        update["train"] = config.train.model_copy(update=RECIPES[name][1])
    return config.model_copy(update=update)


def seeded(config: RunConfig, seed: int) -> RunConfig:
    """The student schedule with `seed` (the teacher is given, not retrained)."""
    return config.model_copy(update={"train": config.train.model_copy(update={"seed": seed})})


@dataclass(frozen=True)
class StudyRun:
    """One student to train: its method, seed, full config and run folder."""

    method: str
    seed: int
    config: RunConfig
    out: Path
    teacher: Path | None = None
    amplifier: Path | None = None
    init_from: "StudyRun | None" = None  # trained (or reused) first; its model starts this run (`chain`)


def plan_study(config: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: Path, *,
               teacher: Path | None, amplifier: Path | None, assistant: Path | None = None) -> list[StudyRun]:
    """The runs of `ds2d2 study`: OUT/runs/<method>/seed<S>, one teacher for all; `chain`'s first
    stages (from `assistant`) in OUT/runs/chain-assistant/seed<S>."""
    if not methods or not seeds:
        raise InputError("a study needs at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise InputError("--methods and --seeds must not repeat a value")
    if config.distill.init_student_from_teacher:
        raise InputError("the preset sets distill.init_student_from_teacher, which the study's none baseline "
                         "cannot take; use a preset without it and methods fgd-recipe or mgd-recipe")
    if CHAIN in methods and assistant is None:
        raise InputError(f"method {CHAIN} needs --assistant-teacher A.safetensors (its first teacher)")
    if assistant is not None and CHAIN not in methods:
        raise InputError(f"--assistant-teacher is read by method {CHAIN} only; add it to --methods")
    runs = []
    for name in methods:
        for seed in seeds:
            run_config = method_config(seeded(config, seed), name)
            if needs_teacher(run_config) and teacher is None:
                raise InputError(f"method {name} needs --teacher T.safetensors")
            first = None
            if name == CHAIN:  # the assistant's amplifier would be another teacher's: none in the first stage
                first = StudyRun(CHAIN_FIRST, seed, run_config, Path(out) / "runs" / CHAIN_FIRST / f"seed{seed}",
                                 assistant)
            runs.append(StudyRun(name, seed, run_config, Path(out) / "runs" / name / f"seed{seed}",
                                 teacher if needs_teacher(run_config) else None,
                                 amplifier if needs_amplifier(run_config) else None, first))
    if amplifier is not None and all(run.amplifier is None for run in runs):
        raise InputError(f"--amplifier is read by DS2D2's implicit high-frequency stream only, and none of the "
                         f"methods here runs it ({', '.join(methods)}): leave it out")
    return runs


# ----------------------------------------------------------------------------- running


def check_reusable(stage: str, out: Path, config: RunConfig, teacher_sha256: str | None = None) -> str:
    """'reuse', 'resume' or 'train' for a run folder of `stage` (`stages.runner.prior_run`);
    another config or teacher is an error (a study never overwrites a run it did not start)."""
    from ds2d2_cli.stages.runner import prior_run, teacher_of

    out = Path(out)
    prior = prior_run(stage, out, config)
    if prior is None:
        return "train"
    state = "finished" if prior.finished else "unfinished"
    if prior.differences:
        raise InputError(f"{'an' if state == 'unfinished' else 'a'} {state} {stage} run with another config "
                         f"({', '.join(prior.differences[:4])}); remove it or use another --out", out)
    if not prior.finished:
        return "resume"
    if not (out / "summary.json").is_file():
        raise InputError(f"a finished {stage} run without summary.json; remove it or use another --out", out)
    if stage != "teacher" and teacher_sha256 != teacher_of(out / "model.safetensors"):
        raise InputError(f"a finished {stage} run from another teacher; remove it or use another --out", out)
    return "reuse"


def check_started_from(out: Path, first: Path, first_action: str) -> None:
    """A finished second stage is reused only when it started from the first stage's student as
    it stands (its lineage's hash), so a retrained first stage retrains the second."""
    from ds2d2_cli.checkpoint import file_sha256, load_checkpoint

    model = Path(first) / "model.safetensors"
    if first_action != "reuse" or not model.is_file():
        raise InputError(f"a finished second stage whose first stage ({first}) is not finished; "
                         "remove it or use another --out", out)
    started = (load_checkpoint(Path(out) / "model.safetensors").meta.init_student or {}).get("sha256")
    if started != file_sha256(model):
        raise InputError(f"a finished second stage started from another student than {model}; "
                         "remove it or use another --out", out)


def ap_points(value: Any) -> float | None:
    """COCO metric -> AP points; COCO's -1 (no such objects) -> None."""
    if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        return None
    return round(100 * value, 2)


def _scene_metrics(model: Path, data_dir: Path, split: str, device: Any, reporter: Reporter,
                   cache: Path) -> dict[str, Any]:
    """Scene-level metrics (patch detections merged), cached in `cache` (a file inside the study's
    own folders, never beside a checkpoint the study did not make: the shipped teacher lives in
    the installed package) and keyed by what decides them: the checkpoint and the split's files."""
    from ds2d2_cli.checkpoint import file_sha256
    from ds2d2_cli.data.prepared import SCENES_SUFFIX
    from ds2d2_cli.stages.evaluate import evaluate_checkpoint

    key: dict[str, Any] = {"checkpoint_sha256": file_sha256(model), "split": split,
                           "split_sha256": {name: file_sha256(data_dir / name) if (data_dir / name).is_file() else None
                                            for name in (f"{split}.json", f"{split}{SCENES_SUFFIX}.json")}}
    if cache.is_file():
        try:
            cached = read_json(cache)
            if all(cached.get(k) == v for k, v in key.items()):
                return cached
        except InputError:
            pass
    metrics = evaluate_checkpoint(model, data_dir=data_dir, split=split, device=device, merge_patches=True,
                                  reporter=reporter)
    metrics.update(key)
    if distributed.is_main():
        cache.parent.mkdir(parents=True, exist_ok=True)  # a run that failed early may have no folder
        write_json(cache, metrics, indent=2)
    return metrics


Plan = tuple[StudyRun, RunConfig, str]  # a run, its config with the data root, and reuse/resume/train


def _train(plan: Plan, first: Plan | None, *, data_dir: Path, preset: str, device: Any,
           reporter: Reporter) -> dict[str, Any]:
    """Train one planned run (and `chain`'s first stage, unless reused); its summary."""
    from ds2d2_cli.stages.distill import distill

    run, config, action = plan
    init_student = None
    if first is not None:
        first_run, first_config, first_action = first
        if first_action != "reuse":
            reporter.note(f"study: {run.method} seed {run.seed}: first stage, from {first_run.teacher} ({first_action})")
            distill(first_config, out=first_run.out, teacher=first_run.teacher, data_dir=data_dir, preset=preset,
                    device=device, resume=first_action == "resume", reporter=reporter)
        init_student = first_run.out / "model.safetensors"
    return distill(config, out=run.out, teacher=run.teacher, amplifier=run.amplifier, init_student=init_student,
                   data_dir=data_dir, preset=preset, device=device, resume=action == "resume",
                   reporter=reporter).summary


def _train_in_parallel(work: list[tuple[Plan, Plan | None]], jobs: int, reporter: Reporter,
                       **kwargs: Any) -> dict[Path, dict[str, Any]]:
    """Train independent runs in `jobs` processes (`threads_per_job` threads each), their
    progress forwarded here; results by run folder, in the order they finish."""
    threads = threads_per_job(jobs)
    reporter.note(f"study: {len(work)} runs to train in {jobs} processes of {threads} torch thread"
                  f"{'s' if threads > 1 else ''} each")
    results: dict[Path, dict[str, Any]] = {}
    runs = {str(plan[0].out): plan[0] for plan, _ in work}
    task = reporter.task("study runs", total=len(work))

    def finished(job: Job, outcome: Outcome) -> None:
        run = runs[job.name]
        if outcome.error is None:
            results[run.out] = {"summary": outcome.value, "wall_s": outcome.wall_s}
            state = f"done in {_duration(outcome.wall_s)}"
        else:
            results[run.out] = {"error": outcome.error}
            state = f"failed: {outcome.error}"
        reporter.note(f"study: {run.method} seed {run.seed} {state}")
        task.update(1)

    try:
        run_jobs([Job(str(plan[0].out), _train, {"plan": plan, "first": first, **kwargs},
                     label=f"{plan[0].method} seed {plan[0].seed}") for plan, first in work],
                 processes=jobs, threads=threads, reporter=reporter, on_finish=finished)
    finally:
        task.close()
    return results


def run_study(runs: Sequence[StudyRun], *, data_dir: Path, preset: str, device: Any = "cpu",
              merge_patches: bool = False, reporter: Reporter | None = None,
              teachers: dict[str, Any] | None = None, jobs: int = 1) -> dict[str, Any]:
    """Train (or reuse) every run, then the study record (see `analyse`).

    `teachers`: optional per-seed teacher metrics to show in the table (the benchmark's).
    `jobs` > 1 trains that many runs at once in separate processes, the torch threads shared
    out (`threads_per_job`); a run's figures then are those of its thread count, as with
    `jobs=1` and the same number of threads. Scoring stays in this process.
    A run that fails is recorded and the others go on; `record["complete"]` says whether all finished.
    """
    import torch

    from ds2d2_cli.checkpoint import file_sha256
    from ds2d2_cli.stages.common import with_data_root

    if not runs:
        raise InputError("a study needs at least one run")
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, not {jobs}")
    if jobs > 1 and distributed.world_size() > 1:
        raise InputError("--jobs runs processes of its own: use it without torchrun")
    reporter = reporter or NullReporter()
    device = torch.device(device)
    started = time.perf_counter()
    shas: dict[Path, str] = {}
    plans = []

    def plan(run: StudyRun) -> tuple[StudyRun, RunConfig, str]:
        config = with_data_root(run.config, data_dir)
        sha = None
        if run.teacher is not None:
            if not Path(run.teacher).is_file():
                raise InputError("teacher checkpoint not found", run.teacher)
            sha = shas.setdefault(Path(run.teacher), file_sha256(run.teacher))
        return run, config, check_reusable("student", run.out, config, sha)

    firsts: dict[Path, tuple[StudyRun, RunConfig, str]] = {}
    for run in runs:  # every folder checked before any training
        planned = plan(run)
        if run.init_from is not None:
            firsts[run.out] = first = plan(run.init_from)
            if planned[2] == "reuse":
                check_started_from(run.out, first[0].out, first[2])
        plans.append(planned)
    to_train = sum(1 for _, _, action in plans if action != "reuse")
    reporter.note(f"study: {len(plans)} runs ({len(plans) - to_train} finished, reused; {to_train} to train)")

    train_kwargs = {"data_dir": data_dir, "preset": preset, "device": device}
    parallel: dict[Path, dict[str, Any]] = {}
    if jobs > 1 and to_train:
        parallel = _train_in_parallel([(p, firsts.get(p[0].out)) for p in plans if p[2] != "reuse"],
                                      min(jobs, to_train), reporter, **train_kwargs)

    outcomes: list[dict[str, Any]] = []
    trained_seconds: list[float] = []
    done = 0
    for index, (run, config, action) in enumerate(plans, 1):
        label = f"{run.method} seed {run.seed}"
        if action != "reuse" and not parallel:
            left = to_train - done
            eta = (f", about {_duration(statistics.fmean(trained_seconds) * left)} left for {left} runs"
                   if trained_seconds else "")
            reporter.note(f"study: run {index}/{len(plans)}: {label} ({action}{eta})")
        t0 = time.perf_counter()
        outcome: dict[str, Any] = {"method": run.method, "seed": run.seed, "run": str(run.out), "action": action}
        if run.out in firsts:
            outcome["first_stage"] = str(firsts[run.out][0].out)
        try:
            if action == "reuse":
                summary = read_json(run.out / "summary.json")
            elif parallel:
                result = parallel[run.out]
                if "error" in result:
                    raise Ds2d2Error(result["error"])
                summary = result["summary"]
            else:
                summary = _train((run, config, action), firsts.get(run.out), reporter=reporter, **train_kwargs)
                trained_seconds.append(time.perf_counter() - t0)
                done += 1
            metrics = summary.get("metrics") or {}
            if merge_patches:
                metrics = _scene_metrics(run.out / "model.safetensors", data_dir, config.data.eval_split, device,
                                         reporter, cache=run.out / "scene_metrics.json")
            outcome.update({
                "status": "finished",
                "metrics": {k: ap_points(metrics.get(k)) for k in METRICS},
                "iterations": summary.get("iterations"),
                "train_seconds": summary.get("seconds"),
                "seconds_per_iteration": (round(summary["seconds"] / summary["iterations"], 4)
                                          if summary.get("iterations") else None),
                "terms": sorted(k for k in summary.get("final_losses", {})),
            })
        except KeyboardInterrupt:
            raise
        except Ds2d2Error as exc:  # diverged, bad data for this run...: the others still run
            outcome.update({"status": "failed", "error": str(exc)})
            reporter.note(f"study: {label} failed: {exc}")
        outcomes.append(outcome)
    distributed.barrier()

    first = runs[0]
    teacher_metrics = teachers
    if teacher_metrics is None:
        taught = next((r for r in runs if r.teacher is not None), None)
        if taught is not None:
            teacher_metrics = {"all": _teacher_points(Path(taught.teacher), data_dir, first.config, merge_patches,
                                                      device, reporter,
                                                      cache=Path(taught.out) / "teacher_scene_metrics.json")}
    record = analyse(outcomes, [r.method for r in runs], [r.seed for r in runs])
    amplifiers = sorted({str(r.amplifier) for r in runs if r.amplifier is not None})
    record.update({
        "study": "ds2d2 study",
        "units": (f"AP points ({'DOTA Task 1' if FAMILIES[first.config.student.detector].oriented else 'COCO'} "
                  "metric x 100); gains paired by seed (method - none), 95% t-interval"),
        "preset": preset,
        "data": str(data_dir),
        "eval_split": first.config.data.eval_split,
        "merged_patches": merge_patches,
        "teacher": sorted({str(r.teacher) for r in runs if r.teacher is not None}),
        "amplifier": amplifiers,
        "assistant_teacher": sorted({str(r.init_from.teacher) for r in runs if r.init_from is not None}),
        "teacher_metrics": teacher_metrics,
        "schedule": json.loads(first.config.train.model_dump_json(exclude={"seed"})),
        "device": str(device),
        "processes": distributed.world_size(),
        "jobs": jobs,
        "torch_threads_per_run": threads_per_job(jobs) if jobs > 1 else torch.get_num_threads(),
        "machine": machine(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 2),
    })
    return record


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _teacher_points(teacher: Path, data_dir: Path, config: RunConfig, merge_patches: bool, device: Any,
                    reporter: Reporter, cache: Path) -> dict[str, float | None]:
    from ds2d2_cli.checkpoint import load_checkpoint

    if merge_patches:
        metrics = _scene_metrics(teacher, data_dir, config.data.eval_split, device, reporter, cache)
    else:
        metrics = load_checkpoint(teacher).meta.metrics or {}
    return {k: ap_points(metrics.get(k)) for k in METRICS}


# ----------------------------------------------------------------------------- statistics

# Two-sided 95% Student t critical values t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical_975(df: int) -> float:
    """t_{0.975, df}; beyond the table the Cornish-Fisher expansion (error < 1e-3)."""
    if df < 1:
        raise ValueError("the t-interval needs at least two paired seeds (df >= 1)")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_gain(values: dict[int, float | None], baseline: dict[int, float | None]) -> dict[str, Any]:
    """Mean of the per-seed differences, their standard deviation and 95% t-interval."""
    seeds = [s for s in values if values[s] is not None and baseline.get(s) is not None]
    diffs = [values[s] - baseline[s] for s in seeds]  # type: ignore[operator]
    result: dict[str, Any] = {"per_seed": {str(s): round(d, 2) for s, d in zip(seeds, diffs)}, "n": len(diffs),
                              "mean": None, "std": None, "ci95": None, "distinguishable": False}
    if not diffs:
        return result
    mean = statistics.fmean(diffs)
    result["mean"] = round(mean, 2)
    if len(diffs) > 1:
        std = statistics.stdev(diffs)
        half = t_critical_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
        result.update({"std": round(std, 2), "ci95": [round(low, 2), round(high, 2)],
                       "distinguishable": bool(low > 0 or high < 0)})
    return result


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return round(statistics.fmean(known), 2), round(statistics.stdev(known), 2) if len(known) > 1 else 0.0


def analyse(outcomes: Sequence[dict[str, Any]], methods: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """The study table: per method mean/std per metric, paired gains vs none, relative step cost."""
    methods = list(dict.fromkeys(methods))
    seeds = list(dict.fromkeys(seeds))
    by: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    for outcome in outcomes:
        if outcome.get("status") == "finished":
            by[outcome["method"]][outcome["seed"]] = outcome
    table: dict[str, Any] = {}
    base = by.get(BASELINE, {})
    base_cost = _mean_std([o.get("seconds_per_iteration") for o in base.values()])[0]
    for method in methods:
        runs = by[method]
        entry: dict[str, Any] = {"label": LABELS.get(method, method), "settings": _jsonable(method_settings(method)),
                                 "seeds": sorted(runs), "mean": {}, "std": {}}
        for metric in METRICS:
            entry["mean"][metric], entry["std"][metric] = _mean_std([runs[s]["metrics"][metric] for s in runs])
        if method != BASELINE and base:
            entry["gain"] = {metric: paired_gain({s: runs[s]["metrics"][metric] for s in runs},
                                                 {s: base[s]["metrics"][metric] for s in base})
                             for metric in GAIN_METRICS}
        cost = _mean_std([o.get("seconds_per_iteration") for o in runs.values()])[0]
        entry["seconds_per_iteration"] = cost
        entry["step_cost_vs_none"] = round(cost / base_cost, 2) if cost and base_cost else None
        table[method] = entry
    gains = {m: e["gain"]["AP50"]["mean"] for m, e in table.items() if e.get("gain") and e["gain"]["AP50"]["mean"]
             is not None}
    best = max(gains, key=gains.get) if gains else None
    # DS2D2 against the strongest other method (its own ablations aside), paired by seed
    others = {m: g for m, g in gains.items() if m not in ("ds2d2", CHAIN) and m not in ABLATIONS}
    versus = None
    if "ds2d2" in gains and others:
        rival = max(others, key=others.get)
        versus = {"method": rival, "AP50": paired_gain(
            {s: o["metrics"]["AP50"] for s, o in by["ds2d2"].items()},
            {s: o["metrics"]["AP50"] for s, o in by[rival].items()})}
    failed = [o for o in outcomes if o.get("status") != "finished"]
    return {"methods": methods, "seeds": seeds, "table": table, "runs": list(outcomes),
            "best_by_AP50_gain": best, "ds2d2_vs_best_other": versus, "failed": failed, "complete": not failed}


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


# ----------------------------------------------------------------------------- outputs


def _cell(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def gain_text(gain: dict[str, Any] | None, digits: int = 2) -> str:
    if not gain or gain.get("mean") is None:
        return "-"
    if gain.get("ci95") is None:
        return f"{gain['mean']:+.{digits}f}"
    low, high = gain["ci95"]
    return f"{gain['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{' *' if gain['distinguishable'] else ''}"


def markdown(record: dict[str, Any], timing: bool = True) -> str:
    """The study table as Markdown (what study.md holds and the README quotes); `timing=False`
    leaves out the wall-time column (runs sharing a busy machine)."""
    seeds = ",".join(map(str, record["seeds"]))
    where = "scenes (patches merged)" if record.get("merged_patches") else "patches"
    lines = [f"Student AP points on {record.get('eval_split', 'eval')} {where}, mean ± std over seeds {seeds}; "
             "gains paired by seed vs `none` with a 95% t-interval, * = interval excludes zero.", "",
             "| method | " + " | ".join(METRICS) + " | AP50 gain [95% CI] | mAP gain [95% CI] |"
             + (" time/iter vs none |" if timing else ""),
             "|---|" + "---|" * (len(METRICS) + 2 + timing)]
    empty = " | | |" + (" |" if timing else "")
    teachers = list((record.get("teacher_metrics") or {}).values())
    if teachers:  # one teacher, or one per seed (the gain benchmark): mean ± std then
        label = "teacher" if len(teachers) == 1 else f"teacher ({len(teachers)}, one per seed)"
        lines.append(f"| {label} | " + " | ".join(_cell(*_mean_std([t.get(m) for t in teachers])) if len(teachers) > 1
                                                  else ("-" if teachers[0].get(m) is None else f"{teachers[0][m]:.2f}")
                                                  for m in METRICS) + empty)
    for method, entry in record["table"].items():
        gain = entry.get("gain") or {}
        cost = entry.get("step_cost_vs_none")
        lines.append(f"| {entry['label']} | " + " | ".join(_cell(entry["mean"][m], entry["std"][m]) for m in METRICS)
                     + f" | {gain_text(gain.get('AP50'))} | {gain_text(gain.get('mAP'))} |"
                     + ((f" {cost:.2f}x |" if cost else " - |") if timing else ""))
    if timing:
        lines += ["", "time/iter: each run's training wall time per iteration over the baseline's (evaluation "
                  "during training included; it moves with the machine's load, runs are not interleaved)."]
    if record.get("best_by_AP50_gain"):
        lines += ["", f"Largest mean AP50 gain: {LABELS.get(record['best_by_AP50_gain'], record['best_by_AP50_gain'])}."]
    versus = record.get("ds2d2_vs_best_other")
    if versus:
        rival = LABELS.get(versus["method"], versus["method"])
        lines += ["", f"DS2D2 minus the best other method ({rival}), AP50 paired by seed: "
                      f"{gain_text(versus['AP50'])}."]
    if record.get("failed"):
        lines += ["", "Failed runs: " + "; ".join(f"{o['method']} seed {o['seed']}: {o.get('error')}"
                                                   for o in record["failed"])]
    return "\n".join(lines) + "\n"


def write_study(record: dict[str, Any], out: Path) -> dict[str, str]:
    """study.json, study.md and study.png in OUT (rank 0 only; each written atomically)."""
    from ds2d2_cli.plots import paired_gain_chart

    out = Path(out)
    paths = {"json": out / "study.json", "markdown": out / "study.md", "chart": out / "study.png"}
    if not distributed.is_main():
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    record = {**record, "outputs": {k: str(v) for k, v in paths.items()}}
    write_json(paths["json"], record, indent=2)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(record), encoding="utf-8")
    paired_gain_chart(record, paths["chart"])
    return {k: str(v) for k, v in paths.items()}
