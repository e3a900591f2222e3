"""`benchmarks/capacity_cost.py`: the projection of the capacity-gap study's CPU hours, by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "capacity_cost.py"


@pytest.fixture(scope="module")
def capacity_cost():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("capacity_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_by_hand(capacity_cost):
    steps = {"teacher": 2.0, "resnet18/none": 1.0, "resnet18/ds2d2": 2.0, "resnet18/cwd": 1.5, "resnet18/dist": 1.25,
             "resnet18/ds2d2-dist": 2.5}
    big = {k: 2 * v for k, v in steps.items()}
    measured = {"resnet34": {"seconds_per_step": steps}, "resnet101": {"seconds_per_step": big}}
    p = capacity_cost.project(measured, ("resnet18",))
    # none once: 3 seeds x 450 steps x 1 s
    assert p["none_students_h"] == round(1350 / 3600, 2)
    r34 = p["per_teacher"]["resnet34"]  # shipped: no training; amplifier 150 x 2 s; students (2 + 1.5 + 1.25 + 2.5) s
    assert (r34["teacher_h"], r34["amplifier_h"]) == (0.0, round(300 / 3600, 2))
    assert r34["students_h"] == round(1350 * 7.25 / 3600, 2)
    r101 = p["per_teacher"]["resnet101"]  # trained 4800 x 4 s; students 14.5 s + chain (2 s from R34 + 4 s)
    assert r101["teacher_h"] == round(4800 * 4 / 3600, 2) and r101["amplifier_h"] == round(600 / 3600, 2)
    assert r101["students_h"] == round(1350 * (14.5 + 6) / 3600, 2)
    assert p["wall_h_two_jobs"] == round(p["total_cpu_h"] / 2, 2)


def test_capacity_study_table(capacity_cost):
    spec = importlib.util.spec_from_file_location("capacity_study", SCRIPT.with_name("capacity_study.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    gain = {"mean": 2.5, "ci95": [1.0, 4.0], "per_seed": {}, "distinguishable": True}
    rows = [{"student": "resnet18", "teacher": "resnet50", "teacher_AP50": 40.1, "student_teacher_parameter_ratio": 0.47,
             "methods": {"none": {"AP50": 4.2}, "ds2d2": {"gain": gain},
                         "cwd": {"gain": {"mean": -1.0, "ci95": None, "per_seed": {}, "distinguishable": False}}}}]
    table = study.markdown(rows).splitlines()
    # only the methods that ran get a column (a study cut with --methods)
    assert table[0] == ("| student | teacher | teacher AP50 | student/teacher parameters | none AP50 | "
                        "ds2d2 gain [95% CI] | cwd gain [95% CI] |")
    assert table[2] == "| R18 | R50 | 40.1 | 0.47 | 4.2 | +2.50 [+1.00, +4.00] * | -1.00 |"
    rows.append({"student": "resnet18", "teacher": "resnet101", "teacher_AP50": 45.0,
                 "student_teacher_parameter_ratio": 0.27, "methods": {"none": {"AP50": 4.2}, "chain": {"gain": gain}}})
    table = study.markdown(rows).splitlines()
    assert table[0].endswith("| cwd gain [95% CI] | chain gain [95% CI] |")
    assert table[2] == "| R18 | R50 | 40.1 | 0.47 | 4.2 | +2.50 [+1.00, +4.00] * | -1.00 |  |"
    assert table[3] == "| R18 | R101 | 45.0 | 0.27 | 4.2 |  |  | +2.50 [+1.00, +4.00] * |"
