"""What the capacity-gap study would cost on this CPU, measured before it is run (issue 24).

The study: teachers of growing capacity (the demo's R34, R50, R101, X101-64x4d), each trained to
the demo teacher's recipe (4800 iterations) with its amplifier (150), and students (R18,
MobileNetV3-Large) distilled from each with none, DS2D2, CWD, DIST and the progressive chain
(DS2D2 from the R34 teacher, then from the big one), three seeds, the demo's 450 iterations.
This times one training step of each kind on the demo preset's input (128 px, batch 8, random
weights and boxes, one torch thread, interleaved, medians) and projects the study's CPU hours,
teacher by teacher, so that what fits in a budget is chosen by the numbers:

    python benchmarks/capacity_cost.py                    # -> benchmarks/results/capacity_cost.json
    python benchmarks/capacity_cost.py --repeats 1 --teachers resnet34 --output /tmp/c.json   # smoke run

Each teacher's projection counts its training (none for R34: the demo ships it), its amplifier
(150 teacher-sized steps, an upper bound), and its students; `none` students are the same for
every teacher and counted once. Wall hours assume two runs at a time on 2 cores (`ds2d2 study --jobs 2`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_distill_step import (  # noqa: E402
    machine_info,
    random_batch,
    save_record,
    step_fn,
    time_steps,
    warmup_optimizer,
)

from ds2d2_cli.classes import get_class_set  # noqa: E402
from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.distill.registry import get_method  # noqa: E402
from ds2d2_cli.models.amplifier import amplifier_head  # noqa: E402
from ds2d2_cli.models.detectors import build_detector  # noqa: E402
from ds2d2_cli.stages.distill import DistillTask  # noqa: E402
from ds2d2_cli.tasks import DetectorTask  # noqa: E402

TEACHERS = ("resnet34", "resnet50", "resnet101", "resnext101_64x4d")
STUDENTS = ("resnet18", "mobilenet_v3_large")
METHODS = ("ds2d2", "cwd", "dist", "ds2d2-dist")  # with a teacher; `none` and the chain are added
SHIPPED = "resnet34"  # the demo teacher, trained already
TEACHER_ITERS, AMPLIFIER_ITERS, STUDENT_ITERS, SEEDS = 4800, 150, 450, 3


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(teacher_backbone: str, students: tuple[str, ...], *, warmup: int, repeats: int) -> dict:
    """Seconds per step: the teacher's own training step, and each student's step per method."""
    device = torch.device("cpu")
    config = load_config("tiny-synthetic", [f"teacher.backbone={teacher_backbone}"])
    num_classes = len(get_class_set(config.data.classes))
    schedule = config.train
    torch.manual_seed(0)
    teacher = build_detector(config.teacher, num_classes, config.input)
    images, targets = random_batch(schedule.batch_size, config.input.size, num_classes,
                                   torch.Generator().manual_seed(0), device)
    own = DetectorTask(build_detector(config.teacher, num_classes, config.input))
    steps = {"teacher": (own, step_fn(own, warmup_optimizer(own, schedule), schedule, images, targets))}
    sizes = {"teacher": parameters(teacher)}
    for student_backbone in students:
        student_cfg = config.student.model_copy(update={"backbone": student_backbone})
        run_config = config.model_copy(update={"student": student_cfg})
        student = build_detector(student_cfg, num_classes, config.input)
        sizes[student_backbone] = parameters(student)
        plain = DetectorTask(student)
        steps[f"{student_backbone}/none"] = (plain, step_fn(plain, warmup_optimizer(plain, schedule), schedule,
                                                            images, targets))
        for method in METHODS:
            method_cfg = run_config.model_copy(update={"distill": run_config.distill.model_copy(
                update={"method": method})})
            task = DistillTask(student, teacher, method_cfg, amplifier_head(teacher) if get_method(method).needs_amplifier else None)
            steps[f"{student_backbone}/{method}"] = (task, step_fn(task, warmup_optimizer(task, schedule), schedule,
                                                                   images, targets))
    times = time_steps(steps, warmup=warmup, repeats=repeats, device=device)
    return {"seconds_per_step": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "parameters": sizes}


def project(measured: dict[str, dict], students: tuple[str, ...]) -> dict:
    """CPU hours per teacher (training, amplifier, its students), `none` once, and the total."""
    hours = 1 / 3600
    per_teacher, none_hours = {}, 0.0
    for student in students:
        none_hours += SEEDS * STUDENT_ITERS * measured[SHIPPED if SHIPPED in measured else next(iter(measured))][
            "seconds_per_step"][f"{student}/none"] * hours
    for name, m in measured.items():
        s = m["seconds_per_step"]
        teacher_h = 0.0 if name == SHIPPED else TEACHER_ITERS * s["teacher"] * hours
        amplifier_h = AMPLIFIER_ITERS * s["teacher"] * hours
        students_h = 0.0
        for student in students:
            per_seed = sum(s[f"{student}/{method}"] for method in METHODS)
            if name != SHIPPED and SHIPPED in measured:  # the chain: DS2D2 from R34, then from this teacher
                per_seed += measured[SHIPPED]["seconds_per_step"][f"{student}/ds2d2"] + s[f"{student}/ds2d2"]
            students_h += SEEDS * STUDENT_ITERS * per_seed * hours
        per_teacher[name] = {"teacher_h": round(teacher_h, 2), "amplifier_h": round(amplifier_h, 2),
                             "students_h": round(students_h, 2),
                             "total_h": round(teacher_h + amplifier_h + students_h, 2)}
    total = none_hours + sum(p["total_h"] for p in per_teacher.values())
    return {"per_teacher": per_teacher, "none_students_h": round(none_hours, 2), "total_cpu_h": round(total, 2),
            "wall_h_two_jobs": round(total / 2, 2)}


def run(repeats: int, teachers: tuple[str, ...], students: tuple[str, ...]) -> dict:
    measured = {t: measure(t, students, warmup=1, repeats=repeats) for t in teachers}
    projection = project(measured, students)
    cases = [{"teacher": name, **m, **projection["per_teacher"][name],
              "summary": f"{name}: {m['parameters']['teacher'] / 1e6:.1f} M parameters, teacher step "
                         f"{m['seconds_per_step']['teacher']:.2f} s; CPU hours: teacher "
                         f"{projection['per_teacher'][name]['teacher_h']}, amplifier "
                         f"{projection['per_teacher'][name]['amplifier_h']}, students "
                         f"{projection['per_teacher'][name]['students_h']}"}
             for name, m in measured.items()]
    return {"machine": machine_info("cpu"), "cases": cases, "input": 128, "batch": 8, "torch_threads": torch.get_num_threads(), "repeats": repeats,
            "schedule": {"teacher": TEACHER_ITERS, "amplifier": AMPLIFIER_ITERS, "student": STUDENT_ITERS,
                         "seeds": SEEDS},
            "projection_one_thread": projection}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    parser.add_argument("--students", default=",".join(STUDENTS))
    parser.add_argument("--output", type=Path, default=HERE / "results" / "capacity_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = run(args.repeats, tuple(args.teachers.split(",")), tuple(args.students.split(",")))
    save_record("capacity_cost", args.output, results, started, "cpu")
    total = results["projection_one_thread"]
    print(f"total {total['total_cpu_h']} CPU hours (one thread per run), about {total['wall_h_two_jobs']} h "
          f"on 2 cores with --jobs 2 -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
