"""GPU check: every stage of the pipeline through the real CLI on one CUDA device, in under 8 minutes.

Written before any GPU was lent to the project, to be run the first day one is. It runs the
`ds2d2` commands themselves (the Typer app, in this process: one import and one CUDA
context for all of them; `torchrun`, the CUDA tests, the step benchmark and the compile run
as their own processes, with a time limit), in this order, so that a cut budget drops the
least important steps:

    data         prepare-data synthetic (4 scenes of 1400 px), prepare-data dota --split 800 --gap 200
    retinanet    tiny-synthetic at 800 px: train-teacher, train-amplifier, distill with every method
                 of the registry (none, ds2d2, fitnet, cwd, pkd, mgd, fgd, dist), eval --merge-patches,
                 export --format onnx --verify, predict --slice 800
    faster_rcnn  tiny-synthetic-frcnn at 800 px: the same
    amp-off      distill ds2d2 with train.amp=false, both families (every other run has AMP on)
    torchrun     distill ds2d2 under torchrun --nproc_per_node 1 (NCCL)
    channels_last  distill ds2d2 with train.channels_last=true
    cuda-tests   pytest tests/test_disw.py tests/test_explicit.py tests/test_rotated.py tests/test_spectral.py
                 (none may skip)
    distill-step benchmarks/bench_distill_step.py --device cuda --quick --full --size 800: DS2D2's step
                 against the student's and student + teacher forward, every method, tiny and paper models
    paper        retina-dior and frcnn-dior (R101-FPN256 -> R18-FPN256, batch 8, 800 px) on random
                 local "ImageNet" weights (frozen BN, 3 trainable stages: the paper's compute):
                 teacher, amplifier, distill ds2d2
    obb          tiny-synthetic-obb at 800 px: teacher, amplifier, distill ds2d2 and fgd, eval, export, predict
    compile      distill ds2d2 with train.compile=true

Training runs are a few iterations (teacher 20, amplifier 10, students 20, paper models 10),
logged in two windows so the second gives a steady images/s. One JSON (default
benchmarks/results/gpu_check.json) records per step its status, time, images/s (whole run
and steady), peak CUDA memory (`peak_cuda_memory_mb` of each run's summary.json), the
step benchmark's ratios, the tests' counts, and for a failed step its error and the tail of
its output (every step's whole output is in WORK/logs/). A failed step does not stop the
check; the steps that need it are skipped. It is rewritten after every step. Steps are not
started past --budget-s (default 420 s; processes are stopped at it), so the whole check
ends within 8 minutes; a step left out for time counts as not done. Exit code 0 only when
every step is ok.

    python benchmarks/gpu_check.py                 # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --dry-run-cpu   # the same plan on the CPU at 64 px, 2 iterations

Without a CUDA device the first form stops at once with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

MARKER = ".gpu_check"  # a work folder holding it was made by this script and may be replaced
CUDA_TESTS = ("tests/test_disw.py", "tests/test_explicit.py", "tests/test_rotated.py", "tests/test_spectral.py")
FAMILIES = (  # (group, preset) of the tiny models: every method runs on both horizontal families
    ("retinanet", "tiny-synthetic"),
    ("faster_rcnn", "tiny-synthetic-frcnn"),
)
PAPER = (("paper-retinanet", "retina-dior"), ("paper-faster_rcnn", "frcnn-dior"))
OBB_PRESET = "tiny-synthetic-obb"
OBB_METHODS = ("ds2d2", "fgd")  # the methods whose masks follow rotated boxes
TAIL_LINES, TAIL_CHARS = 40, 4000


@dataclass(frozen=True)
class Profile:
    """How big each part of the plan is: the GPU check, or its CPU dry run (same steps, tiny sizes)."""

    mode: str
    device: str
    scenes: int  # synthetic scenes; a quarter of them (at least one) are val
    scene_size: int
    patch: int  # --split and the models' input size
    gap: int
    batch: int  # tiny presets; the paper presets keep their own 8 on the GPU
    paper_batch: int
    teacher_iters: int
    amplifier_iters: int
    student_iters: int
    paper_iters: int
    workers: int
    bench: tuple[str, ...]  # bench_distill_step.py options besides --device and --output
    budget_s: float
    step_timeout_s: float  # the most one process step may take (the budget may cut it shorter)
    compile_env: tuple[tuple[str, str], ...] = ()  # environment of the compile step


GPU = Profile(mode="gpu", device="cuda", scenes=4, scene_size=1400, patch=800, gap=200, batch=8, paper_batch=8,
              teacher_iters=20, amplifier_iters=10, student_iters=20, paper_iters=10, workers=4,
              bench=("--quick", "--full", "--size", "800"), budget_s=420.0, step_timeout_s=240.0)
# Batch 2: at 64 px RetinaNet's P6 is 1x1, and PKD's per-channel standard deviation (Bessel-corrected, as
# MMRazor's) of a single value is NaN.
CPU_DRY_RUN = Profile(mode="cpu-dry-run", device="cpu", scenes=4, scene_size=112, patch=64, gap=16, batch=2,
                      paper_batch=2, teacher_iters=2, amplifier_iters=2, student_iters=2, paper_iters=2, workers=0,
                      bench=("--quick", "--size", "64", "--batch", "2", "--repeats", "1", "--threads", "1"),
                      budget_s=1200.0, step_timeout_s=600.0,
                      # the setting and its code path run; inductor's compilation (3 min on 2 CPU cores) does not
                      compile_env=(("TORCH_COMPILE_DISABLE", "1"),))


class StepFailed(Exception):
    """A step ran but what it wrote is not what the check needs (the message says what)."""


@dataclass
class Step:
    """One command of the plan. `kind`: cli (the Typer app in this process), cli-process (the
    same command as its own process), process (any other command), python (a function here).
    `args` may be a callable, for arguments known only once earlier steps have run."""

    name: str
    kind: str
    args: list[str] | Callable[[], list[str]] | Callable[[], None]
    needs: tuple[str, ...] = ()
    facts: Callable[[], dict[str, Any]] | None = None  # what it measured; raises StepFailed
    info: dict[str, Any] = field(default_factory=dict)  # group, stage, method, settings
    env: dict[str, str] = field(default_factory=dict)  # added to a process step's environment


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ----------------------------------------------------------------------------- what the steps wrote


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise StepFailed(f"{path} was not written")
    return json.loads(path.read_text(encoding="utf-8"))


def training_facts(run: Path, iterations: int, gpu: bool, schedule_key: str) -> dict[str, Any]:
    """Speed and memory from a training run's summary.json, the steady speed (the last logged
    window of metrics.jsonl; the first holds the warm-up) and the speed settings of config.json."""
    from ds2d2_cli.metrics_log import MetricsLog

    summary = _read_json(run / "summary.json")
    schedule = _read_json(run / "config.json")[schedule_key]
    if summary.get("iterations") != iterations:
        raise StepFailed(f"{run}: {summary.get('iterations')} iterations, expected {iterations}")
    steps, _ = MetricsLog.read(run / "metrics.jsonl")
    logged = [s for s in steps if "images_per_s" in s]
    peak = summary.get("peak_cuda_memory_mb")
    if gpu and not (isinstance(peak, (int, float)) and peak > 0):
        raise StepFailed(f"{run}/summary.json: peak_cuda_memory_mb is {peak!r}; the run did not use CUDA")
    return {
        "iterations": summary["iterations"],
        "train_seconds": summary.get("seconds"),
        "images_per_s": summary.get("images_per_s"),
        "images_per_s_steady": logged[-1]["images_per_s"] if len(logged) > 1 else None,
        "peak_cuda_memory_mb": peak,
        "batch": schedule["batch_size"],
        "amp": schedule["amp"],  # on CUDA: bf16 where the GPU has it (machine.bf16), else fp16
        "channels_last": schedule["channels_last"],
        "compile": schedule["compile"],
        "skipped_steps": summary.get("skipped_steps"),
        "processes": summary.get("processes", 1),
        "final_losses": summary.get("final_losses"),
        "mAP": summary.get("metrics", {}).get("mAP"),
    }


def eval_facts(path: Path) -> dict[str, Any]:
    metrics = _read_json(path)
    return {key: metrics.get(key) for key in ("images", "images_per_s", "merged_patches", "AP50", "mAP", "metric")}


def export_facts(path: Path) -> dict[str, Any]:
    result = _read_json(path)
    verify = result.get("verify") or {}
    status = verify.get("status")
    if status not in ("passed", "inconclusive"):
        raise StepFailed(f"export --verify status {status!r}")
    return {"format": result.get("format"), "bytes": result.get("bytes"), "verify_status": status,
            **{k: verify.get(k) for k in ("detections_reference", "detections_exported", "matched",
                                          "max_box_abs_diff", "max_score_abs_diff") if k in verify}}


def predict_facts(path: Path, device: str) -> dict[str, Any]:
    result = _read_json(path)
    if not str(result.get("device", "")).startswith(device):
        raise StepFailed(f"predict ran on {result.get('device')!r}, not {device}")
    return {key: result.get(key) for key in ("images", "tiles", "detections", "images_per_s", "device")}


def pytest_facts(junit: Path, gpu: bool) -> dict[str, Any]:
    if not junit.is_file():
        raise StepFailed(f"{junit} was not written")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    skipped = [f"{case.get('classname')}.{case.get('name')}" for case in suite.iter("testcase")
               if case.find("skipped") is not None]
    facts = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
             "skipped_tests": skipped}
    if gpu and skipped:
        raise StepFailed(f"{len(skipped)} test(s) skipped on the GPU machine: {', '.join(skipped)}")
    return facts


def bench_facts(path: Path) -> dict[str, Any]:
    record = _read_json(path)
    cases = {}
    for case in record["results"]["cases"]:
        cases[case["config"]] = {
            "input": case["input"], "batch": case["batch"],
            "student_step_s": case["median_s"]["student"],
            "ratio_vs_student": case["ratio_vs_student"],
            "ratio_ds2d2_vs_student_plus_teacher": case["ratio_ds2d2_vs_student_plus_teacher"],
            "ratio_ds2d2_vs_student": case["ratio_ds2d2_vs_student"],
            "ratio_ds2d2_vs_minimum": case["ratio_ds2d2_vs_minimum"],
        }
    return {"device_name": record.get("device_name"), "cases": cases}


# ----------------------------------------------------------------------------- the plan


class Plan:
    """The steps for one profile and work folder, in the order they run."""

    def __init__(self, profile: Profile, work: Path):
        self.p, self.work = profile, work
        self.steps: list[Step] = []
        self.scenes, self.data, self.data_obb = work / "scenes", work / "data", work / "data-obb"
        self.weights = work / "weights"
        self.gpu = profile.device == "cuda"
        self._build()

    # ---- helpers

    def add(self, name: str, kind: str, args: Any, needs: tuple[str, ...] = (),
            facts: Callable[[], dict[str, Any]] | None = None, env: dict[str, str] | None = None,
            **info: Any) -> None:
        self.steps.append(Step(name, kind, args, needs, facts, info, dict(env or {})))

    def keep_only(self, prefixes: list[str]) -> None:
        """Drop every step but those whose name starts with one of `prefixes` and the steps
        they need, directly or not (to rerun part of a check in what is left of a lease)."""
        by_name = {step.name: step for step in self.steps}
        unknown = [p for p in prefixes if not any(name.startswith(p) for name in by_name)]
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: no step's name starts so; steps: {', '.join(by_name)}")
        keep = {name for name in by_name if any(name.startswith(p) for p in prefixes)}
        todo = list(keep)
        while todo:
            for need in by_name[todo.pop()].needs:
                if need not in keep:
                    keep.add(need)
                    todo.append(need)
        self.steps = [step for step in self.steps if step.name in keep]

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name.replace("/", "-")

    def out_file(self, name: str, suffix: str) -> Path:
        return self.work / "out" / f"{name.replace('/', '-')}{suffix}"

    def schedule(self, key: str, iters: int, batch: int) -> list[str]:
        """`--set`s for the schedule section the stage reads (a preset's teacher_train, or train):
        a few iterations in two logged windows, no evaluation or checkpoint before the end."""
        return [f"{key}.max_iters={iters}", f"{key}.batch_size={batch}", f"{key}.log_every={max(1, iters // 2)}",
                f"{key}.checkpoint_every={iters}", f"{key}.eval_every=null", f"{key}.num_workers={self.p.workers}",
                f"{key}.cache_images=true"]

    def train(self, name: str, command: str, preset: str, stage: str, data: Path, iters: int, batch: int,
              common: list[str], extra: list[str] = (), options: list[str] = (), needs: tuple[str, ...] = (),
              kind: str = "cli", launcher: list[str] | None = None, env: dict[str, str] | None = None,
              **info: Any) -> Path:
        """A training stage (train-teacher, train-amplifier, distill) into its own run folder."""
        from ds2d2_cli.config import load_config

        run = self.run_dir(name)
        sets = [*common, *extra]
        key = load_config(preset, sets).schedule_key(stage)  # type: ignore[arg-type]
        args = [command, "--preset", preset, "--data", str(data), "--out", str(run), "--device", self.p.device,
                *options, *_sets(sets + self.schedule(key, iters, batch))]
        if launcher is not None:
            args = [*launcher, "-m", "ds2d2_cli", "--debug", *args]
        self.add(name, kind, args, needs, lambda: training_facts(run, iters, self.gpu, key), env, stage=command,
                 preset=preset, **info)
        return run / "model.safetensors"

    def val_scene(self) -> Path:
        scenes = sorted((self.scenes / "val" / "images").glob("*.png"))
        if not scenes:
            raise StepFailed(f"no val scene in {self.scenes / 'val' / 'images'}")
        return scenes[0]

    def deploy(self, group: str, model: Path, needs: str) -> None:
        """eval (whole scenes), export to ONNX with --verify, predict on a val scene cut in tiles."""
        p, device = self.p, self.p.device
        report = self.out_file(f"{group}/eval", ".json")
        self.add(f"{group}/eval", "cli", ["eval", str(model), "--merge-patches", "--device", device,
                                          "--json", str(report)], (needs,), lambda: eval_facts(report),
                 group=group, stage="eval")
        exported = self.out_file(f"{group}/export", ".json")
        onnx = self.out_file(f"{group}/student", ".onnx")
        self.add(f"{group}/export", "cli",
                 lambda: ["export", str(model), "--format", "onnx", "--out", str(onnx), "--verify",
                          "--image", str(self.val_scene()), "--json", str(exported)],
                 (needs,), lambda: export_facts(exported), group=group, stage="export")
        predicted = self.out_file(f"{group}/predict", ".json")
        self.add(f"{group}/predict", "cli",
                 ["predict", str(model), str(self.scenes / "val" / "images"), "--out",
                  str(self.work / "predict" / group), "--slice", str(p.patch), "--overlap", str(p.gap),
                  "--device", device, "--no-images", "--json", str(predicted)],
                 (needs,), lambda: predict_facts(predicted, device), group=group, stage="predict")

    # ---- the steps

    def _build(self) -> None:
        from ds2d2_cli.distill.registry import METHODS

        p = self.p
        size = [f"input.size={p.patch}"]
        self.add("data/scenes", "cli", ["prepare-data", "synthetic", "--out", str(self.scenes), "--images",
                                        str(p.scenes), "--size", str(p.scene_size), "--seed", "0"],
                 group="data", stage="prepare-data synthetic")
        cut = ["--split", str(p.patch), "--gap", str(p.gap), "--classes", "synthetic"]
        self.add("data/patches", "cli", ["prepare-data", "dota", str(self.scenes), "--out", str(self.data), *cut],
                 ("data/scenes",), group="data", stage="prepare-data dota")

        # Both horizontal families: the whole pipeline, every method.
        amplifiers = {}
        for group, preset in FAMILIES:
            teacher = self.train(f"{group}/teacher", "train-teacher", preset, "teacher", self.data,
                                 p.teacher_iters, p.batch, size, needs=("data/patches",), group=group)
            amplifier = self.train(f"{group}/amplifier", "train-amplifier", preset, "amplifier", self.data,
                                   p.amplifier_iters, p.batch, size, options=["--teacher", str(teacher)],
                                   needs=(f"{group}/teacher",), group=group)
            amplifiers[group] = (preset, teacher, amplifier)
            for method in METHODS:
                self.distill(group, f"{group}/distill/{method}", method, preset, teacher, amplifier, size)
            self.deploy(group, self.run_dir(f"{group}/distill/ds2d2") / "model.safetensors",
                        f"{group}/distill/ds2d2")

        # AMP off, torchrun, channels_last: DS2D2 students of the teachers above.
        for group, (preset, teacher, amplifier) in amplifiers.items():
            self.distill(group, f"amp-off/{group}", "ds2d2", preset, teacher, amplifier, size, ["train.amp=false"])
        preset, teacher, amplifier = amplifiers["retinanet"]
        env_launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        self.distill("retinanet", "torchrun/retinanet", "ds2d2", preset, teacher, amplifier, size,
                     kind="process", launcher=env_launcher)
        self.distill("retinanet", "channels_last/retinanet", "ds2d2", preset, teacher, amplifier, size,
                     ["train.channels_last=true"])

        junit = self.work / "out" / "cuda-tests.xml"
        self.add("cuda-tests", "process", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           *CUDA_TESTS, f"--junitxml={junit}"],
                 facts=lambda: pytest_facts(junit, self.gpu), group="tests", stage="pytest")
        bench = self.work / "out" / "distill_step.json"
        self.add("distill-step", "process", [sys.executable, str(HERE / "bench_distill_step.py"), "--device",
                                             p.device, *p.bench, "--output", str(bench)],
                 facts=lambda: bench_facts(bench), group="bench", stage="bench_distill_step")

        # The paper's architectures at 800 px, on random local weights (offline, as pretrained).
        self.add("paper/weights", "python", self._paper_weights, group="paper", stage="weights")
        weights = {"teacher": self.weights / "resnet101.pt", "student": self.weights / "resnet18.pt"}
        paper_sets = [*size, "data.classes=synthetic", "data.train_split=train", "data.eval_split=val"]
        for group, preset in PAPER:
            teacher = self.train(f"{group}/teacher", "train-teacher", preset, "teacher", self.data, p.paper_iters,
                                 p.paper_batch, paper_sets, options=["--backbone-weights", str(weights["teacher"])],
                                 needs=("data/patches", "paper/weights"), group=group)
            amplifier = self.train(f"{group}/amplifier", "train-amplifier", preset, "amplifier", self.data,
                                   p.paper_iters, p.paper_batch, paper_sets, options=["--teacher", str(teacher)],
                                   needs=(f"{group}/teacher",), group=group)
            self.train(f"{group}/distill/ds2d2", "distill", preset, "student", self.data, p.paper_iters,
                       p.paper_batch, paper_sets,
                       options=["--method", "ds2d2", "--teacher", str(teacher), "--amplifier", str(amplifier),
                                "--backbone-weights", str(weights["student"])],
                       needs=(f"{group}/amplifier",), group=group, method="ds2d2")
            if group == PAPER[0][0]:
                self._obb(size, cut)  # between the two paper families: the budget cuts the last first

        preset, teacher, amplifier = amplifiers["retinanet"]
        self.distill("retinanet", "compile/retinanet", "ds2d2", preset, teacher, amplifier, size,
                     ["train.compile=true"], kind="cli-process", env=dict(p.compile_env))

    def _obb(self, size: list[str], cut: list[str]) -> None:
        p, group = self.p, "obb"
        self.add("obb/patches", "cli", ["prepare-data", "dota", str(self.scenes), "--out", str(self.data_obb),
                                        *cut, "--boxes", "obb"], ("data/scenes",), group="data",
                 stage="prepare-data dota --boxes obb")
        teacher = self.train("obb/teacher", "train-teacher", OBB_PRESET, "teacher", self.data_obb,
                             p.teacher_iters, p.batch, size, needs=("obb/patches",), group=group)
        amplifier = self.train("obb/amplifier", "train-amplifier", OBB_PRESET, "amplifier", self.data_obb,
                               p.amplifier_iters, p.batch, size, options=["--teacher", str(teacher)],
                               needs=("obb/teacher",), group=group)
        for method in OBB_METHODS:
            self.distill(group, f"obb/distill/{method}", method, OBB_PRESET, teacher, amplifier, size,
                         data=self.data_obb)
        self.deploy(group, self.run_dir("obb/distill/ds2d2") / "model.safetensors", "obb/distill/ds2d2")

    def distill(self, group: str, name: str, method: str, preset: str, teacher: Path, amplifier: Path,
                size: list[str], extra: list[str] = (), kind: str = "cli", launcher: list[str] | None = None,
                data: Path | None = None, env: dict[str, str] | None = None) -> None:
        from ds2d2_cli.distill.registry import get_method

        chosen = get_method(method)
        options, needs = ["--method", method], []
        if chosen.needs_teacher:
            options += ["--teacher", str(teacher)]
            needs.append(f"{group}/teacher")
        if chosen.needs_amplifier:
            options += ["--amplifier", str(amplifier)]
            needs.append(f"{group}/amplifier")
        if not needs:
            needs.append("obb/patches" if group == "obb" else "data/patches")
        self.train(name, "distill", preset, "student", data or self.data, self.p.student_iters, self.p.batch,
                   [*size, *extra], options=options, needs=tuple(needs), kind=kind, launcher=launcher, env=env,
                   group=group, method=method, settings=list(extra) or None)

    def _paper_weights(self) -> None:
        """torchvision state dicts of randomly initialised bodies: `--backbone-weights` makes the
        runs what ImageNet weights would (frozen BN, 3 trainable stages) without a download.

        Frozen BN with a fresh module's running statistics (mean 0, variance 1) is the identity,
        so a random ResNet-101 multiplies activations block after block (classification loss
        ~5e5 at step 1, NaN under fp16 AMP by step 3). Like real weights, these get statistics
        measured on their own activations: a few train-mode passes over noise images."""
        import torch
        import torchvision

        self.weights.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        for name in ("resnet101", "resnet18"):
            body = torchvision.models.get_model(name, weights=None)
            calibrate_batch_norm(body, device=self.p.device)
            torch.save(body.state_dict(), self.weights / f"{name}.pt")


def calibrate_batch_norm(model: Any, device: str = "cpu", batches: int = 4, batch: int = 8, size: int = 224) -> None:
    """Set every BatchNorm's running mean and variance to the average over `batches` of
    standard-normal images (cumulative average, momentum None), as a trained body's would be."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.to(device).train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, device=device))
    model.to("cpu").eval()


# ----------------------------------------------------------------------------- running it


def _tail(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
    return "\n".join(lines)[-TAIL_CHARS:]


def _error_line(log: Path, fallback: str) -> str:
    """The CLI's one-line error, else the last exception line of a traceback, else `fallback`."""
    if log.is_file():
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) and " " not in head:
                return line
    return fallback


def _invoke_cli(args: list[str], log: Path) -> int:
    """The `ds2d2` command in this process, its output (both streams) into `log`."""
    import click

    from ds2d2_cli.cli.app import app

    with log.open("a", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        print("$ ds2d2 --debug " + " ".join(args), flush=True)
        try:
            code = app(args=["--debug", *args], prog_name="ds2d2", standalone_mode=False)
            return int(code or 0)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except click.ClickException as exc:
            print(f"error: {exc.format_message()}", flush=True)
            return exc.exit_code
        except click.Abort:
            return 1
        except Exception:  # noqa: BLE001 - recorded as this step's failure; the check goes on
            traceback.print_exc()
            return 1


class StepTimeout(Exception):
    pass


def _run_process(argv: list[str], log: Path, timeout: float, env: dict[str, str]) -> int:
    """A child process (its own session, so a timeout stops torchrun's workers too)."""
    with log.open("a", encoding="utf-8") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                 start_new_session=True)
        try:
            return child.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            raise StepTimeout(f"stopped after {timeout:.0f} s") from None


def _command_text(step: Step, args: list[str]) -> str:
    if step.kind == "cli":
        return "ds2d2 " + " ".join(args)
    return " ".join(args)


class Check:
    def __init__(self, profile: Profile, work: Path, out: Path, budget_s: float):
        self.profile, self.work, self.out, self.budget_s = profile, work, out, budget_s
        self.logs = work / "logs"
        self.start = time.perf_counter()
        self.records: list[dict[str, Any]] = []
        self.status: dict[str, str] = {}
        self.record: dict[str, Any] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                             os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}
        if profile.device == "cpu" and Path("/sys/class/net/lo").exists():
            self.env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torchrun's gloo where the hostname does not resolve

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, plan: Plan) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.work / "out").mkdir(parents=True, exist_ok=True)
        self.record = {
            "benchmark": "gpu_check",
            "mode": self.profile.mode,
            "ok": False,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "budget_s": self.budget_s,
            "machine": machine_info(self.profile.device),
            "plan": {**asdict(self.profile), "work": str(self.work), "steps": [s.name for s in plan.steps]},
            "steps": self.records,
        }
        print(f"gpu_check ({self.profile.mode}): {len(plan.steps)} steps, budget {self.budget_s:.0f} s, "
              f"logs in {self.logs}", flush=True)
        for step in plan.steps:
            self.records.append(self.run_step(step))
            self.write()
        return self.finish()

    def run_step(self, step: Step) -> dict[str, Any]:
        record: dict[str, Any] = {"name": step.name, **{k: v for k, v in step.info.items() if v is not None}}
        started = self.elapsed()
        print(f"[{started:6.1f} s] {step.name:32s}", end=" ", flush=True)
        missing = [n for n in step.needs if self.status.get(n) != "ok"]
        if missing:
            return self.done(step, record, "skipped", started, reason=f"needs {', '.join(missing)}")
        left = self.budget_s - started
        if left <= 0:
            return self.done(step, record, "skipped", started, reason=f"over the {self.budget_s:.0f} s budget")
        log = self.logs / f"{step.name.replace('/', '-')}.log"
        record["log"] = str(log)
        try:
            args = step.args() if callable(step.args) and step.kind != "python" else step.args
            if step.kind != "python":
                record["command"] = _command_text(step, args)  # type: ignore[arg-type]
            if step.env:
                record["env"] = step.env
            if step.kind == "cli":
                code = _invoke_cli(args, log)  # type: ignore[arg-type]
            elif step.kind == "python":
                with log.open("a", encoding="utf-8") as out, contextlib.redirect_stdout(out), \
                        contextlib.redirect_stderr(out):
                    try:
                        step.args()  # type: ignore[operator]
                        code = 0
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()
                        code = 1
            else:
                argv = args if step.kind == "process" else [sys.executable, "-m", "ds2d2_cli", "--debug", *args]
                code = _run_process(argv, log, min(self.profile.step_timeout_s, left),  # type: ignore[arg-type]
                                    {**self.env, **step.env})
            if code != 0:
                raise StepFailed(_error_line(log, f"exit code {code}"))
            if step.facts is not None:
                record.update(step.facts())
        except (StepFailed, StepTimeout) as exc:
            status = "timeout" if isinstance(exc, StepTimeout) else "failed"
            return self.done(step, record, status, started, error=str(exc), output_tail=_tail(log))
        except Exception as exc:  # noqa: BLE001 - a broken output file, say: this step's failure
            return self.done(step, record, "failed", started, error=f"{type(exc).__name__}: {exc}",
                             output_tail=_tail(log))
        finally:
            self.release_memory()
        return self.done(step, record, "ok", started)

    def done(self, step: Step, record: dict[str, Any], status: str, started: float, **extra: Any) -> dict[str, Any]:
        seconds = round(self.elapsed() - started, 2)
        self.status[step.name] = status
        record.update({"status": status, "seconds": seconds, **extra})
        figures = []
        if record.get("images_per_s") is not None:
            steady = record.get("images_per_s_steady")
            figures.append(f"{record['images_per_s']:.1f} images/s" + (f" ({steady:.1f} steady)" if steady else ""))
        if record.get("peak_cuda_memory_mb"):
            figures.append(f"peak {record['peak_cuda_memory_mb']:.0f} MiB")
        why = extra.get("reason") or extra.get("error") or ""
        print(f"{status:7s} {seconds:6.1f} s  {'; '.join(figures)}{('  ' + why) if why else ''}", flush=True)
        return record

    def release_memory(self) -> None:
        gc.collect()
        if self.profile.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def write(self) -> None:
        """The whole record, rewritten after every step (a cut check leaves what it did)."""
        self.record["wall_s"] = round(self.elapsed(), 1)
        self.record.update(summarise(self.records))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.out)

    def finish(self) -> int:
        self.record["ok"] = all(r["status"] == "ok" for r in self.records)
        self.write()
        bad = [f"{r['name']} ({r['status']})" for r in self.records if r["status"] != "ok"]
        ok = len(self.records) - len(bad)
        print(f"gpu_check: {ok} of {len(self.records)} steps ok in {self.elapsed():.0f} s"
              + (f"; not ok: {', '.join(bad)}" if bad else "") + f" -> {self.out}", flush=True)
        return 0 if not bad else 1


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures side by side, by step name (the steps keep everything)."""
    pick = lambda key: {r["name"]: r[key] for r in records if r.get(key) is not None}  # noqa: E731
    bench = next((r for r in records if r["name"] == "distill-step" and r["status"] == "ok"), None)
    tests = next((r for r in records if r["name"] == "cuda-tests" and "tests" in r), None)
    steady = pick("images_per_s_steady")
    return {
        "images_per_s": pick("images_per_s"),
        "images_per_s_steady": steady,
        "peak_cuda_memory_mb": pick("peak_cuda_memory_mb"),
        # DS2D2 students of one teacher, steady images/s with AMP (every other run) and without
        "amp_on_off": {family: {"on": steady.get(f"{family}/distill/ds2d2"), "off": steady.get(f"amp-off/{family}")}
                       for family, _ in FAMILIES},
        "distill_step": bench["cases"] if bench else None,
        "cuda_tests": {k: tests[k] for k in ("tests", "passed", "failures", "errors", "skipped")} if tests else None,
        "failed": [r["name"] for r in records if r["status"] in ("failed", "timeout")],
        "skipped": {r["name"]: r.get("reason") for r in records if r["status"] == "skipped"},
    }


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
        torch.zeros(1, device="cuda")  # the CUDA context now, not inside the first stage's timing
    return info


def cuda_missing() -> str | None:
    """Why the GPU check cannot run here (None: it can)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA device here (torch {torch.__version__}, {build}); the GPU check needs one, "
            "--dry-run-cpu runs its plan on the CPU")


def prepare_work(work: Path) -> str | None:
    """Empty the work folder, only when this script made it (None) or it is new; else why not."""
    if work.exists():
        if not (work / MARKER).is_file():
            if work.is_dir() and not any(work.iterdir()):
                pass
            else:
                return f"{work} exists and was not made by gpu_check; remove it or pass another --work"
        else:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by benchmarks/gpu_check.py; replaced by its next run\n", encoding="utf-8")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="the same plan on the CPU, 64 px and 2 iterations (tests the plan without a GPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON record (default benchmarks/results/gpu_check.json; with --dry-run-cpu "
                             "WORK/gpu_check.json)")
    parser.add_argument("--work", type=Path, default=None,
                        help="data, runs and logs, replaced on every check (default runs/gpu-check, "
                             "runs/gpu-check-cpu with --dry-run-cpu)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"no step starts after this many seconds and processes stop at it (default "
                             f"{GPU.budget_s:.0f}; {CPU_DRY_RUN.budget_s:.0f} with --dry-run-cpu)")
    parser.add_argument("--only", default=None, metavar="PREFIX[,PREFIX...]",
                        help="run only the steps whose names start so (e.g. paper), and the steps they need")
    args = parser.parse_args(argv)
    profile = CPU_DRY_RUN if args.dry_run_cpu else GPU
    if profile is GPU:
        why = cuda_missing()
        if why is not None:
            print(f"gpu_check: {why}", file=sys.stderr)
            return 2
    budget = args.budget_s if args.budget_s is not None else profile.budget_s
    if budget <= 0:
        print("gpu_check: --budget-s must be positive", file=sys.stderr)
        return 2
    work = (args.work or ROOT / ("runs/gpu-check-cpu" if args.dry_run_cpu else "runs/gpu-check")).resolve()
    out = (args.out or (work / "gpu_check.json" if args.dry_run_cpu else HERE / "results" / "gpu_check.json")).resolve()
    why = prepare_work(work)
    if why is not None:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    plan = Plan(profile, work)
    if args.only:
        try:
            plan.keep_only([p.strip() for p in args.only.split(",") if p.strip()])
        except ValueError as error:
            print(f"gpu_check: {error}", file=sys.stderr)
            return 2
    return Check(profile, work, out, budget).run(plan)


if __name__ == "__main__":
    sys.exit(main())
