"""`demo`: the whole pipeline on synthetic scenes, composed from the real stages.

synthetic scenes -> prepare-data -> train-teacher -> train-amplifier -> distill (ds2d2)
and distill (--method none, the baseline: same student, schedule and seed) -> eval of
all three on held-out scenes -> export of the distilled student -> results.json, a
table and pictures. Every step is the function the matching CLI command calls, so the
demo takes no shortcut a user's own pipeline would not take. Finished stages (a run
folder with its `model.safetensors`) and the prepared data are reused, and interrupted
stages resumed, only when they were made with the same settings; otherwise the demo
stops before touching anything and asks for `--fresh` or another `--out`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ds2d2_cli.checkpoint import Stage
from ds2d2_cli.config import RunConfig, UNREADABLE_CONFIG, load_config, value_differences
from ds2d2_cli.engine import RESUME_FILE
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import read_json, write_json
from ds2d2_cli.progress import NullReporter, Reporter

DEMO_PRESET = "tiny-synthetic"
SCENES = 24
SCENE_SIZE = 640
PICTURE_SCORE = 0.3  # the one score threshold of detections.png
DATA_RECORD = "demo_data.json"  # in OUT/data: what the prepared data was generated with
OWNED = ("data", "teacher", "amplifier", "ds2d2", "baseline", "student.onnx", "results.json",
         "detections.png", "training_curves.png")


def _stage(out: Path, run: Callable[..., Any], reporter: Reporter, title: str, **kwargs) -> Path:
    """Run a training stage unless it already finished; resume it when it was interrupted.

    `_check_stage` has already made sure that what is here was made with these settings.
    """
    model = out / "model.safetensors"
    if model.is_file():
        reporter.note(f"{title}: reusing {model}")
        return model
    resume = (out / RESUME_FILE).is_file()
    reporter.note(f"{title}{' (resuming)' if resume else ''} -> {out}")
    run(out=out, resume=resume, reporter=reporter, **kwargs)
    return model


def _data_settings(config: RunConfig, scenes_count: int, scene_size: int) -> dict[str, Any]:
    """Everything the prepared data depends on; recorded with it and compared on reuse."""
    size = config.input.size
    return {"scenes": scenes_count, "scene_size": scene_size, "seed": 0, "classes": "synthetic",
            "input_size": size, "gap": size // 4}


def _patches_dir(out: Path, config: RunConfig) -> Path:
    return out / "data" / f"synthetic-{config.input.size}"


def _refuse(where: Path, what: str, differences: list[str]) -> InputError:
    shown = ", ".join(differences[:3]) + (f", and {len(differences) - 3} more" if len(differences) > 3 else "")
    return InputError(f"{what} was made with other settings ({shown}); pass --fresh to start over "
                      "(deletes this demo's data, runs and results) or choose another --out", where)


def _check_data(out: Path, settings: dict[str, Any]) -> None:
    """Prepared data is reused only when the record next to it matches `settings`."""
    data = out / "data"
    record = data / DATA_RECORD
    if record.is_file():
        made = read_json(record)
        if not isinstance(made, dict):
            raise InputError("not a JSON object; pass --fresh to start over or choose another --out", record)
        differences = value_differences(made, settings)
        if differences:
            raise _refuse(data, "the data", differences)
    elif any(data.glob("synthetic-*/train.json")):
        # Made by a demo that recorded nothing: it cannot be told apart from other settings.
        raise InputError("holds data without a record of its settings (an older ds2d2 demo); pass --fresh to "
                         "start over or choose another --out", data)


def _check_stage(out: Path, config: RunConfig, stage: Stage, title: str) -> None:
    """A finished or interrupted stage is reused or resumed only when made with these settings
    (`stages.runner.prior_run`); otherwise the demo stops before any work."""
    from ds2d2_cli.stages.runner import NO_CONFIG, prior_run

    prior = prior_run(stage, out, config)
    if prior is None:
        return  # nothing here to reuse; the stage starts over
    if prior.differences == [NO_CONFIG]:
        raise InputError(f"{title}: no config.json to check its settings against; pass --fresh to start over "
                         "or choose another --out", out)
    if prior.differences == [UNREADABLE_CONFIG]:
        raise InputError(f"{title}: its config.json is not a config this version can read; pass --fresh to "
                         "start over or choose another --out", out)
    if prior.differences:
        raise _refuse(out, title, prior.differences)


def _prepare(out: Path, config: RunConfig, reporter: Reporter, scenes_count: int, scene_size: int) -> Path:
    """Synthetic scenes cut into patches; the settings record is written last, once all is there."""
    from ds2d2_cli.data.dota import prepare_dota
    from ds2d2_cli.data.synthetic import generate_synthetic

    settings = _data_settings(config, scenes_count, scene_size)
    record = out / "data" / DATA_RECORD
    scenes, patches = out / "data" / "synthetic", _patches_dir(out, config)
    if record.is_file() and (patches / "train.json").is_file() and (patches / "val.json").is_file():
        reporter.note(f"data: reusing {patches}")
        return patches
    reporter.note(f"data: {scenes_count} synthetic {scene_size} px scenes -> {config.input.size} px patches in {patches}")
    record.unlink(missing_ok=True)
    if scenes.exists():
        shutil.rmtree(scenes)  # half-generated scenes from an interrupted run
    generate_synthetic(scenes, images=settings["scenes"], size=settings["scene_size"], seed=settings["seed"],
                       reporter=reporter)
    prepare_dota(scenes, patches, size=settings["input_size"], gap=settings["gap"], classes=settings["classes"],
                 reporter=reporter)
    write_json(record, settings, indent=2)
    return patches


def _scene_picture(out: Path, patches: Path, predictions: dict[str, Path], classes: list[str],
                   score_thresh: float = PICTURE_SCORE) -> tuple[Path, dict[str, Any]]:
    """The first held-out scene: ground truth, then each model's detections at one score
    threshold, each panel titled with its hits / misses / false alarms at IoU 0.5."""
    from ds2d2_cli.data.dataset import read_image
    from ds2d2_cli.evaluation import load_coco_json, match_detections
    from ds2d2_cli.plots import detections_side_by_side

    scenes = load_coco_json(patches / "val_scenes.json")
    scene = scenes["images"][0]
    image = read_image((patches / scene["file_name"]).resolve()).permute(1, 2, 0).numpy()
    truth = [a for a in scenes["annotations"] if a["image_id"] == scene["id"]]
    panels = {f"ground truth: {len(truth)} objects": truth}
    counts: dict[str, Any] = {"objects": len(truth)}
    for label, path in predictions.items():
        found = match_detections(truth, [r for r in load_coco_json(path) if r["image_id"] == scene["id"]],
                                 iou_thresh=0.5, score_thresh=score_thresh)
        counts[label] = {k: found[k] for k in ("hits", "misses", "false_alarms")}
        panels[f"{label}: {found['hits']} hits, {found['misses']} misses, {found['false_alarms']} false alarms"] = \
            found["detections"]
    picture = detections_side_by_side(
        image, panels, classes, out / "detections.png",
        suptitle=f"held-out scene {Path(scene['file_name']).name}: detections with score >= {score_thresh:g}; a hit overlaps "
                 "an unmatched object of its class at IoU >= 0.5 (dashed: false alarm)")
    return picture, counts


def _export(student: Path, onnx_path: Path, patches: Path, reporter: Reporter) -> dict[str, Any] | None:
    """ONNX of the DS2D2 student, checked against PyTorch with onnxruntime on a held-out patch."""
    import importlib.util

    from ds2d2_cli.evaluation import load_coco_json
    from ds2d2_cli.export import export_onnx

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        reporter.note("export: skipped, onnx/onnxruntime are not installed (pip install 'ds2d2[export]')")
        return None
    reporter.note(f"export: the DS2D2 student -> {onnx_path} (verified with onnxruntime)")
    first_patch = load_coco_json(patches / "val.json")["images"][0]["file_name"]
    return export_onnx(student, onnx_path, verify=True, images=[patches / first_patch])


# --quick: every stage runs, in well under 2 minutes on a slow 2-core CPU; no accuracy claim.
QUICK_SCENES, QUICK_SCENE_SIZE = 6, 256
QUICK_OVERRIDES = ["teacher_train.max_iters=20", "amplifier_train.max_iters=5", "train.max_iters=10",
                   "teacher_train.batch_size=4", "amplifier_train.batch_size=4", "train.batch_size=4",
                   "teacher_train.eval_every=null", "amplifier_train.eval_every=null", "train.eval_every=null"]


class _Clock:
    """How long the demo will take on this machine: each stage's step and inference time,
    measured on a real batch before training, times its iterations and evaluations;
    refreshed with the measured pace after every stage."""

    def __init__(self, estimates: dict[str, float], reporter: Reporter):
        self.estimates = estimates
        self.reporter = reporter
        self.started = time.perf_counter()
        self.spent: dict[str, float] = {}

    @property
    def total(self) -> float:
        return sum(self.estimates.values())

    def finished(self, name: str, seconds: float) -> None:
        self.spent[name] = seconds
        done_estimate = sum(self.estimates[n] for n in self.spent)
        pace = sum(self.spent.values()) / done_estimate if done_estimate > 0 else 1.0
        left = sum(v for n, v in self.estimates.items() if n not in self.spent) * pace
        if left > 0:
            self.reporter.note(f"demo: {name} took {_minutes(seconds)} (estimated {_minutes(self.estimates[name])}); "
                               f"about {_minutes(left)} left")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _median_seconds(step: Callable[[], Any], repeats: int = 2) -> float:
    step()  # warm-up: allocations, first-call kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _estimate(config: RunConfig, ds2d2_config: RunConfig, patches: Path, device: torch.device,
              todo: set[str]) -> dict[str, float]:
    """Seconds per demo part on this machine, from a few real training steps of each model."""
    import copy

    from ds2d2_cli.data.dataset import DetectionDataset, collate
    from ds2d2_cli.engine import build_optimizer, total_iterations
    from ds2d2_cli.models.amplifier import amplifier_head, amplify
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.amplifier import AmplifierTask
    from ds2d2_cli.stages.common import load_stage_data, with_data_root
    from ds2d2_cli.stages.distill import DistillTask
    from ds2d2_cli.tasks import DetectorTask

    data = load_stage_data(with_data_root(config, patches))
    n_classes, n_eval = len(data.classes), len(data.eval.images) if data.eval is not None else 0
    dataset = DetectionDataset(data.train)
    generator_state = torch.random.get_rng_state()
    teacher = build_detector(config.teacher, n_classes, config.input).to(device)
    student = build_detector(config.student, n_classes, config.input).to(device)
    amplified = copy.deepcopy(teacher)
    amplify(amplified, amplifier_head(amplified), config.distill.wavelet, rpn=config.distill.amplifier_rpn)
    tasks = {
        "teacher": (DetectorTask(teacher), "teacher"),
        "amplifier": (AmplifierTask(amplified, config.distill.amplifier_rpn), "amplifier"),
        "ds2d2": (DistillTask(copy.deepcopy(student), copy.deepcopy(teacher), ds2d2_config,
                              amplifier_head(teacher).to(device)), "student"),
        "baseline": (DetectorTask(student), "student"),
    }
    estimates: dict[str, float] = {}
    inference: dict[str, float] = {}
    for name, (task, stage) in tasks.items():
        schedule = config.schedule(stage)  # type: ignore[arg-type]
        images, targets = collate([dataset[i % len(dataset)] for i in range(schedule.batch_size)])
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        task.module.to(device)
        optimizer = build_optimizer(task.module, schedule)
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # timing only

        def step(task=task, optimizer=optimizer, images=images, targets=targets) -> None:
            task.train_mode()
            loss = sum(task.losses(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        scored = task.module.detector if name == "ds2d2" else task.module

        def infer(scored=scored, images=images) -> None:
            scored.eval()
            with torch.no_grad():
                scored(images)

        per_image = _median_seconds(infer) / len(images)
        inference[name] = per_image
        if name not in todo:
            continue
        iterations = total_iterations(schedule, len(dataset))
        evaluations = (iterations // schedule.eval_every if schedule.eval_every else 0) + 1
        estimates[name] = _median_seconds(step) * iterations + evaluations * n_eval * per_image
    torch.random.set_rng_state(generator_state)
    # the final scene-level evaluation of teacher, baseline and DS2D2 (plus merging and pictures)
    estimates["evaluation"] = n_eval * (inference["teacher"] + 2 * inference["baseline"]) * 1.2
    return estimates


def run_demo(
    out: Path,
    *,
    device: torch.device | str = "cpu",
    fresh: bool = False,
    preset: str = DEMO_PRESET,
    overrides: list[str] | None = None,
    scenes: int = SCENES,
    scene_size: int = SCENE_SIZE,
    quick: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """The whole pipeline; `quick` is a smoke run of every stage (tiny schedules, no accuracy claim)."""
    from ds2d2_cli.checkpoint import load_checkpoint
    from ds2d2_cli.models.detectors import count_parameters
    from ds2d2_cli.plots import training_curves
    from ds2d2_cli.stages.amplifier import train_amplifier
    from ds2d2_cli.models.detectors import model_from_checkpoint
    from ds2d2_cli.stages.common import with_data_root
    from ds2d2_cli.stages.distill import distill
    from ds2d2_cli.stages.evaluate import evaluate_checkpoint
    from ds2d2_cli.stages.teacher import train_teacher

    reporter = reporter or NullReporter()
    out = Path(out)
    started = time.perf_counter()
    if fresh:
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if quick:
        overrides = [*QUICK_OVERRIDES, *(overrides or [])]
    config = load_config(preset, overrides or [])
    ds2d2_config = config.model_copy(update={"distill": config.distill.model_copy(update={"method": "ds2d2"})})
    baseline_config = config.model_copy(update={"distill": config.distill.model_copy(update={"method": "none"})})
    # Every check before any work, so a refused re-run leaves the folder as it was.
    _check_data(out, _data_settings(config, scenes, scene_size))
    for name, stage, title, stage_config in (("teacher", "teacher", "teacher", config),
                                             ("amplifier", "amplifier", "amplifier", config),
                                             ("ds2d2", "student", "student (DS2D2)", ds2d2_config),
                                             ("baseline", "student", "student (baseline)", baseline_config)):
        _check_stage(out / name, with_data_root(stage_config, _patches_dir(out, config)), stage, title)
    patches = _prepare(out, config, reporter, scenes, scene_size)
    common = dict(data_dir=patches, preset=preset, device=device)
    todo = {name for name in ("teacher", "amplifier", "ds2d2", "baseline")
            if not (out / name / "model.safetensors").is_file()}
    t0 = time.perf_counter()
    clock = _Clock(_estimate(config, ds2d2_config, patches, torch.device(device), todo), reporter)
    reporter.note(f"demo: about {_minutes(clock.total + time.perf_counter() - t0)} of training and evaluation on "
                  f"this machine (measured in {time.perf_counter() - t0:.0f} s from a few steps of each model"
                  f"{'; finished stages reused' if len(todo) < 4 else ''}), then a few seconds of export and pictures")

    def timed(name: str, *args, **kwargs) -> Path:
        t = time.perf_counter()
        path = _stage(*args, **kwargs)
        if name in todo:
            clock.finished(name, time.perf_counter() - t)
        return path

    teacher = timed("teacher", out / "teacher", train_teacher, reporter, "teacher", config=config, **common)
    amplifier = timed("amplifier", out / "amplifier", train_amplifier, reporter, "amplifier", config=config,
                      teacher=teacher, **common)
    students = {
        "ds2d2": timed("ds2d2", out / "ds2d2", distill, reporter, "student (DS2D2)", config=ds2d2_config,
                       teacher=teacher, amplifier=amplifier, **common),
        "baseline": timed("baseline", out / "baseline", distill, reporter, "student (baseline, no teacher)",
                          config=baseline_config, **common),
    }

    results: dict[str, Any] = {}
    predictions: dict[str, Path] = {}
    for name, path in (("teacher", teacher), ("baseline", students["baseline"]), ("ds2d2", students["ds2d2"])):
        reporter.note(f"eval: {name} on the held-out scenes (patch detections merged per scene)")
        predictions[name] = path.parent / "scene_predictions.json"
        metrics = evaluate_checkpoint(path, data_dir=patches, split=config.data.eval_split, device=device,
                                      merge_patches=True, predictions_out=predictions[name], reporter=reporter)
        checkpoint = load_checkpoint(path)
        model = checkpoint.meta.model
        results[name] = {
            **{k: metrics[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")},
            "per_class": metrics["per_class"],
            "params": count_parameters(model_from_checkpoint(checkpoint)),
            "images_per_s": metrics["images_per_s"],
            "backbone": model.label,
            "checkpoint": str(path),
        }
    results["gain_AP50_points"] = round(100 * (results["ds2d2"]["AP50"] - results["baseline"]["AP50"]), 2)
    results["gain_mAP_points"] = round(100 * (results["ds2d2"]["mAP"] - results["baseline"]["mAP"]), 2)

    results["export"] = _export(students["ds2d2"], out / "student.onnx", patches, reporter)
    classes = load_checkpoint(teacher).meta.classes
    picture, counts = _scene_picture(out, patches, {"teacher": predictions["teacher"], "baseline": predictions["baseline"],
                                                    "DS2D2": predictions["ds2d2"]}, classes)
    results["picture_counts"] = {"score_thresh": PICTURE_SCORE, "iou": 0.5, **counts}
    results["pictures"] = {
        "detections": str(picture),
        "training_curves": str(training_curves({"baseline": out / "baseline", "DS2D2": out / "ds2d2"},
                                               out / "training_curves.png")),
    }
    results["preset"] = preset
    results["device"] = str(device)
    results["quick"] = quick
    results["estimated_s"] = round(clock.total, 1)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(out / "results.json", results, indent=2)
    return results
