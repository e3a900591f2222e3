"""`demo`: distillation on synthetic scenes, composed from the real stages.

synthetic scenes -> prepare-data -> the shipped teacher (or train-teacher with its recipe,
`--train-teacher`) -> train-amplifier -> distill, once per student: `none` (the baseline:
same student, schedule and seed, no teacher), FitNet, CWD and DS2D2 -> eval of all on
held-out scenes -> export of the DS2D2 student -> results.json, a table and pictures. Every
step is the function the matching CLI command calls, so the demo takes no shortcut a user's
own pipeline would not take. Finished stages (a run folder with its `model.safetensors`) and
the prepared data are reused, and interrupted stages resumed, only when they were made with
the same settings and teacher; otherwise the demo stops before touching anything and asks
for `--fresh` or another `--out`.
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
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.fileio import atomic_path, read_json, write_json
from ds2d2_cli.parallel import Job, Outcome, chain_seconds, makespan, run_jobs, threads_per_job, torch_threads
from ds2d2_cli.progress import NullReporter, Reporter

DEMO_PRESET = "tiny-synthetic"
SCENES = 24
SCENE_SIZE = 640
PICTURE_SCORE = 0.2  # the one score threshold of detections.png (450-iteration students score low)
DATA_RECORD = "demo_data.json"  # in OUT/data: what the prepared data was generated with
# The students, all the same model, schedule and seed: folder / results key -> method. `none`
# is the undistilled baseline every gain is measured against; FitNet is the classic feature
# baseline and CWD the strongest of `ds2d2 study`'s baselines on these scenes.
STUDENTS = {"baseline": "none", "fitnet": "fitnet", "cwd": "cwd", "ds2d2": "ds2d2"}
STUDENT_LABELS = {"baseline": "baseline", "fitnet": "FitNet", "cwd": "CWD", "ds2d2": "DS2D2"}
STUDENT_TITLES = {name: f"student ({'baseline, no teacher' if name == 'baseline' else label})"
                  for name, label in STUDENT_LABELS.items()}
OWNED = ("data", "teacher", "amplifier", *STUDENTS, "student.onnx", "results.json", "detections.png",
         "training_curves.png")

# The shipped demo teacher (`ds2d2_cli/assets/`): the preset's teacher trained with this recipe
# on the demo's own training scenes; `--train-teacher` trains exactly this in the demo instead,
# and the README gives the command that reproduces the shipped file.
TEACHER_RECIPE = ["teacher_train.max_iters=4800", "teacher_train.eval_every=600", "teacher_train.checkpoint_every=300"]
SHIPPED_TEACHER = "demo_teacher.safetensors"
SHIPPED_RECORD = "demo_teacher.json"  # how it was made and what it scores
# It was trained on the gain benchmark's cut of the demo's training scenes: patches overlapping
# by half (gap 64) give 2.25x the demo's views of the same 18 scenes.
TEACHER_GAP = 64
SCENE_KEYS = ("scenes", "scene_size", "seed", "classes", "input_size")  # which scenes, not how they are cut


def _announce(title: str, out: Path, reporter: Reporter) -> bool:
    """Say which stage trains where; True when it resumes an interrupted run there."""
    resume = (out / RESUME_FILE).is_file()
    reporter.note(f"{title}{' (resuming)' if resume else ''} -> {out}")
    return resume


def train_stage(stage: str, *, reporter: Reporter, **kwargs: Any) -> None:
    """One training stage of the demo, by name: the function its CLI command calls (module
    level, so that a `--jobs` process can run it)."""
    from ds2d2_cli.stages.amplifier import train_amplifier
    from ds2d2_cli.stages.distill import distill
    from ds2d2_cli.stages.teacher import train_teacher

    {"teacher": train_teacher, "amplifier": train_amplifier, "student": distill}[stage](reporter=reporter, **kwargs)


def _data_settings(config: RunConfig, scenes_count: int, scene_size: int, gap: int | None = None) -> dict[str, Any]:
    """Everything the prepared data depends on; recorded with it and compared on reuse."""
    size = config.input.size
    return {"scenes": scenes_count, "scene_size": scene_size, "seed": 0, "classes": "synthetic",
            "input_size": size, "gap": size // 4 if gap is None else gap}


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


def _prepare(out: Path, config: RunConfig, reporter: Reporter, scenes_count: int, scene_size: int,
             gap: int | None = None) -> Path:
    """Synthetic scenes cut into patches; the settings record is written last, once all is there."""
    from ds2d2_cli.data.dota import prepare_dota
    from ds2d2_cli.data.synthetic import generate_synthetic

    settings = _data_settings(config, scenes_count, scene_size, gap)
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
    from ds2d2_cli.data.dataset import load_coco_split, read_image
    from ds2d2_cli.evaluation import load_coco_json, match_detections
    from ds2d2_cli.plots import detections_side_by_side
    from ds2d2_cli.sample import RGB

    scenes = load_coco_split(patches / "val_scenes.json")
    scene = scenes.images[0]
    image = read_image(scenes.image_path(scene), scenes.sample, RGB).permute(1, 2, 0).numpy()
    truth = scenes.annotations_by_image[scene["id"]]
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
QUICK_OVERRIDES = ["amplifier_train.max_iters=5", "train.max_iters=10", "amplifier_train.batch_size=4",
                   "train.batch_size=4", "amplifier_train.eval_every=null", "train.eval_every=null"]
QUICK_TEACHER_OVERRIDES = ["teacher_train.max_iters=20", "teacher_train.batch_size=4", "teacher_train.eval_every=null"]


class _Clock:
    """How long the demo will take on this machine: each stage's step and inference time,
    measured on a real batch before training, times its iterations and evaluations;
    refreshed with the measured pace after every stage."""

    def __init__(self, estimates: dict[str, float], reporter: Reporter, *,
                 after: dict[str, tuple[str, ...]] | None = None, processes: int = 1):
        self.estimates = estimates
        self.reporter = reporter
        self.after = after or {}
        self.processes = processes
        self.started = time.perf_counter()
        self.spent: dict[str, float] = {}

    def _wall(self, names: list[str], scale: float = 1.0) -> float:
        """Wall time of these parts: the runs side by side as `run_jobs` schedules them, the
        rest (evaluation) after them."""
        runs = {n: self.estimates[n] * scale for n in names if n in self.after}
        rest = sum(self.estimates[n] * scale for n in names if n not in self.after)
        if self.processes == 1:
            return sum(runs.values()) + rest
        return makespan(runs, self.after, self.processes) + rest

    @property
    def total(self) -> float:
        return self._wall(list(self.estimates))

    def finished(self, name: str, seconds: float) -> None:
        self.spent[name] = seconds
        pace = self.pace()
        left = self._wall([n for n in self.estimates if n not in self.spent], pace)
        if left > 0:
            self.reporter.note(f"demo: {name} took {_minutes(seconds)} (estimated {_minutes(self.estimates[name])}); "
                               f"about {_minutes(left)} left")


    def pace(self) -> float:
        """Measured over estimated time so far, pulled towards 1 by a prior worth a fifth of the
        run, so one short stage (the amplifier's 15 s) cannot swing the forecast by a quarter."""
        prior = 0.2 * self.total
        done_estimate = sum(self.estimates[n] for n in self.spent)
        return (sum(self.spent.values()) + prior) / (done_estimate + prior) if done_estimate + prior > 0 else 1.0


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


def _estimate(config: RunConfig, student_configs: dict[str, RunConfig], patches: Path, device: torch.device,
              todo: set[str]) -> dict[str, float]:
    """Seconds per demo part on this machine, from a few real training steps of each model."""
    import copy

    from ds2d2_cli.data.dataset import DetectionDataset, collate
    from ds2d2_cli.engine import build_optimizer, total_iterations
    from ds2d2_cli.models.amplifier import amplifier_head, amplify
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.amplifier import AmplifierTask
    from ds2d2_cli.stages.common import load_stage_data, with_data_root
    from ds2d2_cli.stages.distill import DistillTask, needs_amplifier, needs_teacher
    from ds2d2_cli.tasks import DetectorTask

    data = load_stage_data(with_data_root(config, patches))
    n_classes, n_eval = len(data.classes), len(data.eval.images) if data.eval is not None else 0
    dataset = DetectionDataset(data.train, data.config.input)
    generator_state = torch.random.get_rng_state()
    teacher = build_detector(config.teacher, n_classes, data.config.input).to(device)  # input resolved on the data
    student = build_detector(config.student, n_classes, data.config.input).to(device)
    tasks: dict[str, tuple[Callable[[], Any], str]] = {"teacher": (lambda: DetectorTask(teacher), "teacher")}

    def amplifier_task() -> AmplifierTask:
        amplified = copy.deepcopy(teacher)
        amplify(amplified, amplifier_head(amplified), config.distill.wavelet, rpn=config.distill.amplifier_rpn)
        return AmplifierTask(amplified, config.distill.amplifier_rpn)

    tasks["amplifier"] = (amplifier_task, "amplifier")
    for name, student_config in student_configs.items():
        def student_task(student_config=student_config):
            if not needs_teacher(student_config):
                return DetectorTask(copy.deepcopy(student))
            head = amplifier_head(teacher).to(device) if needs_amplifier(student_config) else None
            return DistillTask(copy.deepcopy(student), teacher, student_config, head)
        tasks[name] = (student_task, "student")
    estimates: dict[str, float] = {}
    inference: dict[str, float] = {}
    for name, (make_task, stage) in tasks.items():
        timed_inference = name in ("teacher", "baseline")
        if name not in todo and not timed_inference:
            continue
        task = make_task()
        schedule = config.schedule(stage)  # type: ignore[arg-type]
        images, targets = collate([dataset[i % len(dataset)] for i in range(schedule.batch_size)])
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        task.module.to(device)

        def infer(scored=task.module, images=images) -> None:
            scored.eval()
            with torch.no_grad():
                scored(images)

        if timed_inference:
            inference[name] = _median_seconds(infer) / len(images)
        if name not in todo:
            continue
        optimizer = build_optimizer(task.module, schedule)
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # timing only

        def step(task=task, optimizer=optimizer, images=images, targets=targets) -> None:
            task.train_mode()
            loss = sum(task.losses(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        iterations = total_iterations(schedule, len(dataset))
        evaluations = (iterations // schedule.eval_every if schedule.eval_every else 0) + 1
        per_image = inference["teacher" if stage == "teacher" else "baseline"] if stage != "amplifier" else 0.0
        estimates[name] = _median_seconds(step) * iterations + evaluations * n_eval * per_image
    torch.random.set_rng_state(generator_state)
    # the final scene-level evaluation of the teacher and every student (plus merging and pictures)
    estimates["evaluation"] = n_eval * (inference["teacher"] + len(student_configs) * inference["baseline"]) * 1.2
    return estimates


def shipped_teacher() -> Path:
    """The demo teacher installed with the package (`ds2d2_cli/assets/`)."""
    from importlib import resources

    path = Path(str(resources.files("ds2d2_cli"))) / "assets" / SHIPPED_TEACHER
    if not path.is_file():
        raise Ds2d2Error(f"the shipped demo teacher is missing ({path}); reinstall ds2d2 or pass --train-teacher")
    return path


def shipped_teacher_record() -> dict[str, Any]:
    return read_json(shipped_teacher().with_name(SHIPPED_RECORD))


def _check_shipped_teacher(config: RunConfig, user_overrides: list[str], data_settings: dict[str, Any],
                           quick: bool) -> Path:
    """The shipped teacher stands in for the teacher stage only where it is that stage: the
    same model, input, classes and recipe, and (for a run that claims accuracy) the same
    scenes, so its training scenes are never among the held-out ones."""
    from ds2d2_cli.checkpoint import load_checkpoint

    path = shipped_teacher()
    fix = "; add --train-teacher to train a teacher with these settings"
    made = load_checkpoint(path, "teacher").run_config()
    if made is None:
        raise InputError(f"the shipped teacher's config is not one this version can read{fix}", path)
    differences = value_differences(made.stage_inputs("teacher"), config.stage_inputs("teacher"))
    if differences:
        changed = [d.split(" ", 1)[0] for d in differences]
        named = [o for o in user_overrides
                 if any(c == (key := o.split("=", 1)[0].strip()) or c.startswith(key + ".") for c in changed)]
        if named:
            raise InputError(f"--set {named[0]} changes the teacher, and the demo uses its shipped teacher{fix}", path)
        raise InputError(f"the shipped teacher was trained with other settings ({', '.join(differences[:3])}){fix}",
                         path)
    trained_on = {k: shipped_teacher_record()["data"][k] for k in SCENE_KEYS}
    wanted = {k: data_settings[k] for k in SCENE_KEYS}
    if not quick and trained_on != wanted:
        shown = ", ".join(value_differences(trained_on, wanted)[:3])
        raise InputError(f"the shipped teacher was trained on the demo's default scenes ({shown}); its training "
                         f"scenes could be among these held-out ones{fix}", path)
    return path


def _place_shipped_teacher(folder: Path, shipped: Path, shipped_sha256: str, reporter: Reporter) -> Path:
    """OUT/teacher/model.safetensors: a copy of the shipped teacher (its scene predictions go beside it)."""
    from ds2d2_cli.checkpoint import file_sha256

    model = folder / "model.safetensors"
    if model.is_file():
        reporter.note(f"teacher: reusing the shipped teacher in {model}")
        return model
    with atomic_path(model) as partial:
        shutil.copyfile(shipped, partial)
        if file_sha256(partial) != shipped_sha256:
            raise Ds2d2Error(f"copying the shipped teacher to {model} did not give the same bytes")
    record = shipped_teacher_record()
    reporter.note(f"teacher: the shipped demo teacher ({record['iterations']} iterations on the demo's training "
                  f"scenes, {record['scene_AP50']:.1f} AP50 on the held-out scenes when it was made; --train-teacher "
                  f"trains it here instead) -> {model}")
    return model


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
    train_teacher: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """The whole pipeline; `quick` is a smoke run of every stage (tiny schedules, no accuracy
    claim); `train_teacher` trains the teacher (the shipped teacher's recipe) instead of using
    the shipped one. `jobs` > 1 trains that many models at once, each in its own process;
    `threads` is each training's torch thread count (None: this process's, shared out among
    the jobs). A model's weights depend on its thread count, not on `jobs`."""
    from ds2d2_cli.checkpoint import file_sha256, load_checkpoint
    from ds2d2_cli.models.detectors import count_parameters, model_from_checkpoint
    from ds2d2_cli.plots import training_curves
    from ds2d2_cli.stages.common import with_data_root
    from ds2d2_cli.stages.distill import needs_amplifier, needs_teacher
    from ds2d2_cli.stages.evaluate import evaluate_checkpoint
    from ds2d2_cli.stages.runner import teacher_of

    reporter = reporter or NullReporter()
    if jobs < 1 or (threads is not None and threads < 1):
        raise InputError(f"--jobs and --threads must be at least 1, not {jobs} and {threads}")
    out = Path(out)
    started = time.perf_counter()
    user_overrides = list(overrides or [])
    recipe = TEACHER_RECIPE if preset == DEMO_PRESET else []
    quick_overrides = [*QUICK_OVERRIDES, *(QUICK_TEACHER_OVERRIDES if train_teacher else [])] if quick else []
    config = load_config(preset, [*recipe, *quick_overrides, *user_overrides])
    student_configs = {name: config.model_copy(update={"distill": config.distill.model_copy(update={"method": method})})
                       for name, method in STUDENTS.items()}
    data_settings = _data_settings(config, scenes, scene_size)
    patches_dir = _patches_dir(out, config)
    # Every check before any work (and before --fresh deletes anything), so a refused run
    # leaves the folder as it was.
    shipped = None if train_teacher else _check_shipped_teacher(config, user_overrides, data_settings, quick)
    if fresh:
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    _check_data(out, data_settings)
    teacher_model = out / "teacher" / "model.safetensors"
    if shipped is not None:
        expected_teacher = file_sha256(shipped)
        if teacher_model.is_file() and file_sha256(teacher_model) != expected_teacher:
            raise InputError("holds another teacher than the shipped one (trained with --train-teacher?); "
                             "pass --fresh to start over or choose another --out", out / "teacher")
    else:
        _check_stage(out / "teacher", with_data_root(config, patches_dir), "teacher", "teacher")
        expected_teacher = file_sha256(teacher_model) if teacher_model.is_file() else None
    stages = [("amplifier", "amplifier", "amplifier", config),
              *((name, "student", STUDENT_TITLES[name], c) for name, c in student_configs.items())]
    for name, stage, title, stage_config in stages:
        _check_stage(out / name, with_data_root(stage_config, patches_dir), stage, title)
        model = out / name / "model.safetensors"
        wanted = expected_teacher if name == "amplifier" or needs_teacher(stage_config) else None
        if model.is_file() and teacher_of(model) != wanted:
            raise InputError(f"{title} was trained from another teacher; pass --fresh to start over or choose another "
                             "--out", out / name)
    patches = _prepare(out, config, reporter, scenes, scene_size)
    common = dict(data_dir=patches, preset=preset, device=device)
    # What trains here: name -> (title, stage, config, the stages whose model it takes)
    plan: dict[str, tuple[str, str, RunConfig, tuple[str, ...]]] = {}
    if shipped is None:
        plan["teacher"] = ("teacher", "teacher", config, ())
    plan["amplifier"] = ("amplifier", "amplifier", config, ("teacher",))
    for name, student_config in student_configs.items():
        inputs = (("teacher",) if needs_teacher(student_config) else ()) + \
                 (("amplifier",) if needs_amplifier(student_config) else ())
        plan[name] = (STUDENT_TITLES[name], "student", student_config, inputs)
    todo = [name for name in plan if not (out / name / "model.safetensors").is_file()]
    after = {name: tuple(i for i in inputs if i in todo) for name, (_, _, _, inputs) in plan.items() if name in todo}
    processes = max(1, min(jobs, len(todo)))
    run_threads = threads or (threads_per_job(processes) if processes > 1 else None)
    t0 = time.perf_counter()
    with torch_threads(run_threads):  # timed with the threads the runs will have
        estimates = _estimate(config, student_configs, patches, torch.device(device), set(todo))
    clock = _Clock(estimates, reporter, after=after, processes=processes)
    reporter.note(f"demo: about {_minutes(clock.total + time.perf_counter() - t0)} of training and evaluation on "
                  f"this machine (measured in {time.perf_counter() - t0:.0f} s from a few steps of each model"
                  f"{'; finished stages reused' if len(todo) < len(plan) else ''}"
                  f"{f'; {processes} runs at a time' if processes > 1 else ''}), "
                  "then a few seconds of export and pictures")

    models = {name: out / name / "model.safetensors" for name in plan}
    if shipped is not None:
        models["teacher"] = _place_shipped_teacher(out / "teacher", shipped, expected_teacher, reporter)
    for name in plan:
        if name not in todo:
            reporter.note(f"{plan[name][0]}: reusing {models[name]}")

    def stage_kwargs(name: str) -> dict[str, Any]:
        _, stage, stage_config, inputs = plan[name]
        return dict(stage=stage, config=stage_config, out=out / name, resume=(out / name / RESUME_FILE).is_file(),
                    **{i: models[i] for i in inputs}, **common)

    def announce(name: str) -> None:
        _announce(plan[name][0], out / name, reporter)

    if processes == 1:
        for name in todo:
            t = time.perf_counter()
            announce(name)
            with torch_threads(run_threads):
                train_stage(reporter=reporter, **stage_kwargs(name))
            clock.finished(name, time.perf_counter() - t)
    else:
        def finished(job: Job, outcome: Outcome) -> None:
            if outcome.error is None:
                clock.finished(job.name, outcome.wall_s)

        priority = chain_seconds({name: estimates[name] for name in todo}, after)
        outcomes = run_jobs([Job(name, train_stage, stage_kwargs(name), after[name], priority[name])
                             for name in todo], processes=processes, threads=run_threads,
                            reporter=reporter, on_start=lambda job: announce(job.name), on_finish=finished)
        failed = [name for name in todo if outcomes[name].error is not None]
        if failed:
            raise Ds2d2Error(f"{plan[failed[0]][0]}: {outcomes[failed[0]].error}")
    teacher = models["teacher"]
    students = {name: models[name] for name in STUDENTS}

    results: dict[str, Any] = {}
    predictions: dict[str, Path] = {}
    for name, path in (("teacher", teacher), *students.items()):
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
        if name in STUDENTS:
            results[name]["method"] = STUDENTS[name]
    # gains in points over the undistilled student (same model, schedule and seed)
    results["gains"] = {name: {"AP50_points": round(100 * (results[name]["AP50"] - results["baseline"]["AP50"]), 2),
                               "mAP_points": round(100 * (results[name]["mAP"] - results["baseline"]["mAP"]), 2)}
                        for name in STUDENTS if name != "baseline"}
    results["gain_AP50_points"] = results["gains"]["ds2d2"]["AP50_points"]
    results["gain_mAP_points"] = results["gains"]["ds2d2"]["mAP_points"]

    results["export"] = _export(students["ds2d2"], out / "student.onnx", patches, reporter)
    classes = load_checkpoint(teacher).meta.classes
    picture, counts = _scene_picture(out, patches, {"teacher": predictions["teacher"], "baseline": predictions["baseline"],
                                                    "DS2D2": predictions["ds2d2"]}, classes)
    results["picture_counts"] = {"score_thresh": PICTURE_SCORE, "iou": 0.5, **counts}
    curves = {STUDENT_LABELS[name]: out / name for name in STUDENTS}
    results["pictures"] = {"detections": str(picture),
                           "training_curves": str(training_curves(curves, out / "training_curves.png"))}
    results["teacher_source"] = "trained" if shipped is None else "shipped"
    results["preset"] = preset
    results["device"] = str(device)
    results["quick"] = quick
    results["jobs"] = processes
    results["torch_threads_per_run"] = run_threads or torch.get_num_threads()
    results["estimated_s"] = round(clock.total, 1)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(out / "results.json", results, indent=2)
    return results


def make_shipped_teacher(work: Path, *, device: torch.device | str = "cpu", destination: Path | None = None,
                         reporter: Reporter | None = None) -> dict[str, Any]:
    """Train the demo teacher with `TEACHER_RECIPE` on the demo's default scenes (resumable,
    in `work`), score it on the held-out scenes, and write it as fp16 safetensors with its
    record into the package (`make demo-teacher`; maintainers only)."""
    from ds2d2_cli.checkpoint import file_sha256
    from ds2d2_cli.export import export_safetensors_fp16
    from ds2d2_cli.provenance import machine
    from ds2d2_cli.stages.common import with_data_root
    from ds2d2_cli.stages.evaluate import evaluate_checkpoint

    reporter = reporter or NullReporter()
    work = Path(work)
    destination = Path(destination) if destination else Path(__file__).parent / "assets" / SHIPPED_TEACHER
    config = load_config(DEMO_PRESET, TEACHER_RECIPE)
    settings = _data_settings(config, SCENES, SCENE_SIZE, gap=TEACHER_GAP)
    _check_data(work, settings)
    _check_data(work / "demo-cut", _data_settings(config, SCENES, SCENE_SIZE))
    _check_stage(work / "teacher", with_data_root(config, _patches_dir(work, config)), "teacher", "teacher")
    patches = _prepare(work, config, reporter, SCENES, SCENE_SIZE, gap=TEACHER_GAP)
    model = work / "teacher" / "model.safetensors"
    if model.is_file():  # `_check_stage` made sure it was trained with these settings
        reporter.note(f"teacher: reusing {model}")
    else:
        train_stage("teacher", reporter=reporter, config=config, out=model.parent, data_dir=patches,
                    preset=DEMO_PRESET, device=device, resume=_announce("teacher", model.parent, reporter))
    summary = read_json(work / "teacher" / "summary.json")
    # scored as the demo scores it: the held-out scenes cut as the demo cuts them, patches merged
    demo_patches = _prepare(work / "demo-cut", config, reporter, SCENES, SCENE_SIZE)
    with atomic_path(destination) as partial:
        export_safetensors_fp16(model, partial)
        scored = {}
        for name, path in (("fp32", model), ("fp16", partial)):
            metrics = evaluate_checkpoint(path, data_dir=demo_patches, split=config.data.eval_split, device=device,
                                          merge_patches=True, reporter=reporter)
            scored[name] = {k: round(100 * metrics[k], 2) for k in ("mAP", "AP50", "AP75", "APs", "APm")}
    record = {
        "file": destination.name,
        "sha256": file_sha256(destination),
        "source_sha256": file_sha256(model),
        "preset": DEMO_PRESET,
        "recipe": TEACHER_RECIPE,
        "data": settings,
        "iterations": summary["iterations"],
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "patch_AP50": round(100 * summary["metrics"]["AP50"], 2),
        "scene_AP50": scored["fp16"]["AP50"],  # the shipped file, as the demo scores it
        "scene_metrics": scored,
        "machine": machine(),
        "command": "make demo-teacher",
    }
    write_json(destination.with_name(SHIPPED_RECORD), record, indent=2)
    return record
