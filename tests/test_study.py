"""`ds2d2 study`: the statistics by hand, the plan, reuse and resume, the CLI end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config
from ds2d2_cli.errors import InputError
from ds2d2_cli.study import (analyse, markdown, method_settings, paired_gain, plan_study, study_methods,
                             t_critical_975)

from conftest import TINY

runner = CliRunner()


# ----------------------------------------------------------------------------- statistics


def test_t_critical_values():
    assert t_critical_975(1) == 12.706 and t_critical_975(2) == 4.303 and t_critical_975(30) == 2.042
    assert t_critical_975(60) == pytest.approx(2.000, abs=1e-3)  # table value 2.000
    assert t_critical_975(120) == pytest.approx(1.980, abs=1e-3)  # table value 1.980
    with pytest.raises(ValueError):
        t_critical_975(0)


def test_paired_gain_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.4843
    gain = paired_gain({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert gain["mean"] == 2.0 and gain["std"] == 1.0 and gain["n"] == 3
    assert gain["ci95"] == [round(2 - 4.303 / math.sqrt(3), 2), round(2 + 4.303 / math.sqrt(3), 2)] == [-0.48, 4.48]
    assert gain["distinguishable"] is False and gain["per_seed"] == {"0": 1.0, "1": 2.0, "2": 3.0}
    # paired, not pooled: a large spread between seeds shared by both sides cancels
    gain = paired_gain({0: 3.0, 1: 23.0, 2: 43.0}, {0: 1.0, 1: 20.0, 2: 42.0})
    assert gain["mean"] == 2.0 and gain["ci95"] == [-0.48, 4.48]
    gain = paired_gain({0: 12.0, 1: 12.2, 2: 11.8}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert gain["ci95"] == [round(2 - 4.303 * 0.2 / math.sqrt(3), 2), round(2 + 4.303 * 0.2 / math.sqrt(3), 2)]
    assert gain["distinguishable"] is True
    # one seed: a mean, no interval; a missing baseline seed is left out of the pairing
    one = paired_gain({0: 5.0, 1: 6.0}, {0: 4.0})
    assert one["mean"] == 1.0 and one["ci95"] is None and one["n"] == 1 and not one["distinguishable"]


def _outcome(method, seed, ap50, seconds=1.0):
    metrics = {m: ap50 / 2 for m in ("mAP", "AP75", "APs", "APm", "APl")} | {"AP50": ap50}
    return {"method": method, "seed": seed, "status": "finished", "metrics": metrics,
            "seconds_per_iteration": seconds}


def test_analyse_table_best_method_and_failures():
    outcomes = [_outcome("none", 0, 10.0), _outcome("none", 1, 12.0),
                _outcome("cwd", 0, 11.0, 2.0), _outcome("cwd", 1, 13.5, 2.0),
                _outcome("ds2d2", 0, 13.0, 3.0), {"method": "ds2d2", "seed": 1, "status": "failed", "error": "diverged"}]
    record = analyse(outcomes, ["none", "cwd", "ds2d2"], [0, 1])
    table = record["table"]
    assert table["none"]["mean"]["AP50"] == 11.0 and table["none"]["std"]["AP50"] == round(math.sqrt(2), 2)
    assert "gain" not in table["none"]
    assert table["cwd"]["gain"]["AP50"]["mean"] == 1.25 and table["cwd"]["step_cost_vs_none"] == 2.0
    assert table["ds2d2"]["gain"]["AP50"]["mean"] == 3.0 and table["ds2d2"]["gain"]["AP50"]["n"] == 1
    assert record["best_by_AP50_gain"] == "ds2d2"
    versus = record["ds2d2_vs_best_other"]
    assert versus["method"] == "cwd" and versus["AP50"]["mean"] == 2.0 and versus["AP50"]["n"] == 1
    assert not record["complete"] and record["failed"][0]["error"] == "diverged"
    text = markdown({**record, "eval_split": "val"})
    assert "| CWD |" in text and "+1.25 [" in text and "Failed runs: ds2d2 seed 1: diverged" in text
    assert "DS2D2 minus the best other method (CWD), AP50 paired by seed: +2.00." in text


# ----------------------------------------------------------------------------- plan


def test_plan_lays_out_methods_times_seeds(tmp_path):
    config = load_config("tiny-synthetic")
    teacher, amplifier = tmp_path / "t.safetensors", tmp_path / "a.safetensors"
    runs = plan_study(config, ["none", "ds2d2", "ds2d2-explicit", "mgd"], [0, 3], tmp_path / "study",
                      teacher=teacher, amplifier=amplifier)
    assert [(r.method, r.seed) for r in runs][:3] == [("none", 0), ("none", 3), ("ds2d2", 0)]
    assert runs[1].out == tmp_path / "study/runs/none/seed3" and runs[1].config.train.seed == 3
    by = {(r.method, r.seed): r for r in runs}
    assert by[("none", 0)].teacher is None and by[("none", 0)].amplifier is None
    assert by[("ds2d2", 0)].amplifier == amplifier  # the high-frequency stream needs it
    assert by[("ds2d2-explicit", 0)].amplifier is None and by[("ds2d2-explicit", 0)].teacher == teacher
    assert by[("ds2d2-explicit", 0)].config.distill.streams == ("explicit-low", "explicit-high")
    assert by[("mgd", 3)].config.distill.method == "mgd"
    assert {"none", "fitnet", "cwd", "pkd", "mgd", "fgd", "ds2d2", "ds2d2-no-disw"} <= set(study_methods())
    assert method_settings("ds2d2-adapted")["implicit_input"] == "adapted"
    with pytest.raises(InputError, match="needs --teacher"):
        plan_study(config, ["none", "cwd"], [0], tmp_path, teacher=None, amplifier=None)
    with pytest.raises(InputError, match="must not repeat"):
        plan_study(config, ["none"], [0, 0], tmp_path, teacher=None, amplifier=None)
    with pytest.raises(InputError, match="none of the methods here runs it"):  # not silently dropped
        plan_study(config, ["none", "cwd", "ds2d2-explicit"], [0], tmp_path, teacher=tmp_path / "t.safetensors",
                   amplifier=tmp_path / "a.safetensors")


def test_fgd_and_mgd_reference_recipes(tmp_path):
    """As study methods (none stays plain) and as presets: student from teacher, clip 35."""
    base = load_config("retina-dior")
    assert base.train.grad_clip is None and not base.distill.init_student_from_teacher
    runs = plan_study(base, ["none", "fgd", "fgd-recipe", "mgd-recipe"], [0], tmp_path,
                      teacher=tmp_path / "t.safetensors", amplifier=None)
    by = {r.method: r.config for r in runs}
    assert (by["none"].train.grad_clip, by["none"].distill.init_student_from_teacher) == (None, False)
    assert (by["fgd"].train.grad_clip, by["fgd"].distill.init_student_from_teacher) == (None, False)
    control = plan_study(base, ["none", "none-recipe"], [0], tmp_path, teacher=tmp_path / "t.safetensors",
                         amplifier=None)[1]
    assert control.teacher == tmp_path / "t.safetensors"  # read for its neck and heads, never run
    assert (control.config.distill.method, control.config.distill.init_student_from_teacher,
            control.config.train.grad_clip) == ("none", True, 35.0)
    with pytest.raises(InputError, match="needs --teacher"):
        plan_study(base, ["none", "none-recipe"], [0], tmp_path, teacher=None, amplifier=None)
    ds2d2 = plan_study(base, ["ds2d2-recipe"], [0], tmp_path, teacher=tmp_path / "t.safetensors",
                       amplifier=tmp_path / "a.safetensors")[0]
    assert ds2d2.amplifier == tmp_path / "a.safetensors" and ds2d2.config.distill.streams == base.distill.streams
    assert (ds2d2.config.distill.method, ds2d2.config.distill.init_student_from_teacher,
            ds2d2.config.train.grad_clip) == ("ds2d2", True, 35.0)
    for name, method in (("fgd-recipe", "fgd"), ("mgd-recipe", "mgd")):
        assert by[name].distill.method == method and by[name].distill.init_student_from_teacher
        assert by[name].train.grad_clip == 35.0 and by[name].train.lr == base.train.lr
    for preset, method in (("retina-dior-fgd", "fgd"), ("retina-dior-mgd", "mgd"),
                           ("tiny-synthetic-fgd", "fgd"), ("tiny-synthetic-mgd", "mgd")):
        config = load_config(preset)
        assert config.distill.method == method and config.distill.init_student_from_teacher
        assert config.train.grad_clip == 35.0
        with pytest.raises(InputError, match="none baseline cannot take"):
            plan_study(config, ["none", method], [0], tmp_path, teacher=tmp_path / "t.safetensors", amplifier=None)
    assert load_config("retina-dior-fgd").train.lr == base.train.lr


def test_plan_of_a_chain(tmp_path):
    """`chain`: per seed a first stage from the assistant (no amplifier: it is the teacher's) that
    starts the second, from the teacher; the table's row is the second."""
    config = load_config("tiny-synthetic")
    teacher, amplifier, assistant = (tmp_path / f"{n}.safetensors" for n in ("t", "a", "ta"))
    runs = plan_study(config, ["none", "chain"], [0, 1], tmp_path / "study", teacher=teacher, amplifier=amplifier,
                      assistant=assistant)
    chain = [r for r in runs if r.method == "chain"]
    assert [r.out for r in chain] == [tmp_path / "study/runs/chain/seed0", tmp_path / "study/runs/chain/seed1"]
    first = chain[1].init_from
    assert first.out == tmp_path / "study/runs/chain-assistant/seed1" and first.teacher == assistant
    assert first.amplifier is None and first.config == chain[1].config and first.config.train.seed == 1
    assert chain[1].teacher == teacher and chain[1].amplifier == amplifier
    assert chain[1].config.distill.method == "ds2d2" and "chain" in study_methods()
    assert all(r.init_from is None for r in runs if r.method == "none")
    with pytest.raises(InputError, match="needs --assistant-teacher"):
        plan_study(config, ["chain"], [0], tmp_path, teacher=teacher, amplifier=None)
    with pytest.raises(InputError, match="read by method chain only"):
        plan_study(config, ["ds2d2"], [0], tmp_path, teacher=teacher, amplifier=None, assistant=assistant)


# ----------------------------------------------------------------------------- CLI


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def teacher(tiny_data, module_tmp):
    root = module_tmp("study-teacher")
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--max-iters", "2", *_sets(TINY), "--out", str(root / "teacher"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root / "teacher/model.safetensors"


def _study(tiny_data, teacher, out, *extra, methods="cwd,ds2d2-explicit", seeds="0,1"):
    return runner.invoke(app, ["study", "--preset", "tiny-synthetic", "--data", str(tiny_data), "--teacher",
                               str(teacher), "--methods", methods, "--seeds", seeds, "--max-iters", "2",
                               *_sets(TINY), "--out", str(out), "--device", "cpu", *extra])


def test_study_end_to_end_reuses_finished_runs(tiny_data, teacher, tmp_path):
    out = tmp_path / "study"
    result = _study(tiny_data, teacher, out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    record = json.loads((out / "study.json").read_text())
    assert record["methods"] == ["none", "cwd", "ds2d2-explicit"] and record["seeds"] == [0, 1]
    assert record["complete"] and len(record["runs"]) == 6
    assert all(r["action"] == "train" for r in record["runs"])
    assert set(record["table"]["cwd"]["gain"]) == {"AP50", "mAP"}
    assert record["table"]["cwd"]["gain"]["AP50"]["n"] == 2
    assert (out / "study.md").read_text().startswith("Student AP points")
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "runs/cwd/seed1/model.safetensors").is_file()
    seeds = {json.loads((out / f"runs/none/seed{s}/config.json").read_text())["train"]["seed"] for s in (0, 1)}
    assert seeds == {0, 1}
    # again, with --json -: nothing trains, stdout is the record alone
    again = _study(tiny_data, teacher, out, "--json", "-")
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert all(r["action"] == "reuse" for r in rerun["runs"])
    assert rerun["table"]["cwd"]["mean"] == record["table"]["cwd"]["mean"]


def test_reuse_decisions(tmp_path):
    """train / resume (the resume state of the same config) / refuse (another config)."""
    from ds2d2_cli.config import config_to_json
    from ds2d2_cli.engine import RESUME_FILE
    from ds2d2_cli.study import check_reusable

    config = load_config("tiny-synthetic")
    run = tmp_path / "run"
    assert check_reusable("student", run, config) == "train"
    (run / RESUME_FILE).parent.mkdir(parents=True)
    (run / RESUME_FILE).write_bytes(b"state")
    (run / "config.json").write_text(config_to_json(config))
    assert check_reusable("student", run, config) == "resume"
    other = load_config("tiny-synthetic", ["train.lr=0.5"])
    with pytest.raises(InputError, match="an unfinished student run with another config"):
        check_reusable("student", run, other)


def test_study_refuses_a_finished_run_of_another_teacher(tiny_data, teacher, tmp_path):
    out = tmp_path / "study"
    assert _study(tiny_data, teacher, out, methods="cwd", seeds="0").exit_code == 0
    model = out / "runs/cwd/seed0/model.safetensors"
    before = model.stat().st_mtime_ns
    copy = tmp_path / "copy.safetensors"  # the same bytes elsewhere: the same teacher
    copy.write_bytes(teacher.read_bytes())
    again = _study(tiny_data, copy, out, methods="cwd", seeds="0", )
    assert again.exit_code == 0 and model.stat().st_mtime_ns == before
    other = tmp_path / "other.safetensors"  # one weight bit flipped: another teacher
    data = bytearray(teacher.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    refused = _study(tiny_data, other, out, methods="cwd", seeds="0")
    assert refused.exit_code == 2 and "from another teacher" in refused.output
    assert "Traceback" not in refused.output and model.stat().st_mtime_ns == before


def test_study_refuses_unknown_methods_and_bad_seeds(tiny_data, teacher, tmp_path):
    result = _study(tiny_data, teacher, tmp_path / "s", methods="cwd,magic")
    assert result.exit_code == 2 and "unknown magic" in result.output and "Traceback" not in result.output
    result = _study(tiny_data, teacher, tmp_path / "s", seeds="0,x")
    assert result.exit_code == 2 and "--seeds takes a comma list of integers" in result.output
    assert not (tmp_path / "s").exists()


def test_study_with_merged_patches_scores_scenes(tiny_data, teacher, tmp_path):
    out = tmp_path / "study"
    result = _study(tiny_data, teacher, out, "--merge-patches", methods="none", seeds="0")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "study.json").read_text())
    assert record["merged_patches"] is True
    cached = json.loads((out / "runs/none/seed0/scene_metrics.json").read_text())
    assert cached["merged_patches"] is True and "checkpoint_sha256" in cached
    assert record["runs"][0]["metrics"]["AP50"] == (None if cached["AP50"] < 0 else round(100 * cached["AP50"], 2))


def test_study_scores_the_teacher_inside_its_own_folder(tiny_data, teacher, tmp_path):
    """The teacher's merged-scene score is cached in the study, never beside the teacher (the
    shipped one is inside the installed package, perhaps read-only)."""
    before = sorted(p.name for p in teacher.parent.iterdir())
    out = tmp_path / "study"
    result = _study(tiny_data, teacher, out, "--merge-patches", methods="cwd", seeds="0")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in teacher.parent.iterdir()) == before
    cached = json.loads((out / "runs/cwd/seed0/teacher_scene_metrics.json").read_text())
    assert cached["split"] == "val" and set(cached["split_sha256"]) == {"val.json", "val_scenes.json"}


def test_scene_metrics_cache_follows_the_split_files(tiny_data, teacher, tmp_path, monkeypatch):
    import shutil

    from ds2d2_cli import study as study_module
    from ds2d2_cli.progress import NullReporter
    from ds2d2_cli.stages import evaluate

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    calls = []
    monkeypatch.setattr(evaluate, "evaluate_checkpoint",
                        lambda model, **kw: calls.append(kw["data_dir"]) or {"AP50": 0.25, "merged_patches": True})
    cache = tmp_path / "cache.json"
    first = study_module._scene_metrics(teacher, data, "val", "cpu", NullReporter(), cache)
    again = study_module._scene_metrics(teacher, data, "val", "cpu", NullReporter(), cache)
    assert len(calls) == 1 and first == again and first["AP50"] == 0.25
    scenes = data / "val_scenes.json"  # other held-out scenes: the cached score no longer holds
    scenes.write_text(scenes.read_text().replace("}", "} ", 1))
    study_module._scene_metrics(teacher, data, "val", "cpu", NullReporter(), cache)
    assert len(calls) == 2


@pytest.mark.slow
def test_study_under_torchrun(tiny_data, teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    out = tmp_path / "study"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ds2d2_cli",
               "study", "--preset", "tiny-synthetic", "--data", str(tiny_data), "--teacher", str(teacher),
               "--methods", "cwd", "--seeds", "0", "--max-iters", "2", *_sets([*TINY, "train.batch_size=1"]),
               "--out", str(out), "--device", "cpu", "--json", "-"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((out / "study.json").read_text())
    assert record["processes"] == 2 and record["complete"]
    assert json.loads((out / "runs/cwd/seed0/summary.json").read_text())["processes"] == 2


def test_study_chain_trains_two_stages_and_reuses_them(tiny_data, teacher, tmp_path):
    """The assistant here is the teacher itself (any teacher checkpoint of the data will do)."""
    from ds2d2_cli.checkpoint import file_sha256, load_checkpoint

    out = tmp_path / "study"
    result = _study(tiny_data, teacher, out, "--assistant-teacher", str(teacher), methods="chain", seeds="0")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "study.json").read_text())
    assert record["methods"] == ["none", "chain"] and record["assistant_teacher"] == [str(teacher)]
    chain_run = next(r for r in record["runs"] if r["method"] == "chain")
    first, second = out / "runs/chain-assistant/seed0", out / "runs/chain/seed0"
    assert chain_run["first_stage"] == str(first) and chain_run["run"] == str(second)
    lineage = load_checkpoint(second / "model.safetensors").meta.init_student
    assert lineage["sha256"] == file_sha256(first / "model.safetensors")
    assert json.loads((first / "summary.json").read_text())["teacher"] == str(teacher)
    assert record["table"]["chain"]["gain"]["AP50"]["n"] == 1
    stamps = [p.stat().st_mtime_ns for p in (first / "model.safetensors", second / "model.safetensors")]
    again = _study(tiny_data, teacher, out, "--assistant-teacher", str(teacher), methods="chain", seeds="0")
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in (first / "model.safetensors", second / "model.safetensors")] == stamps
    # a second stage whose first stage is gone is not reused as if it still fitted
    import shutil

    shutil.rmtree(first)
    refused = _study(tiny_data, teacher, out, "--assistant-teacher", str(teacher), methods="chain", seeds="0")
    assert refused.exit_code == 2 and "first stage" in refused.output and "Traceback" not in refused.output


def test_study_jobs_train_in_processes_with_the_same_weights(tiny_data, teacher, tmp_path):
    """`--jobs 2`: runs train in two processes of one torch thread each; each run's weights are
    those of the same run trained here with one thread."""
    import torch
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = _study(tiny_data, teacher, tmp_path / "alone", methods="cwd", seeds="0")
        torch.set_num_threads(2)  # two jobs share two threads: one each
        jobs = _study(tiny_data, teacher, tmp_path / "jobs", "--jobs", "2", methods="cwd", seeds="0")
    finally:
        torch.set_num_threads(threads)
    assert alone.exit_code == 0, alone.output
    assert jobs.exit_code == 0, jobs.output
    assert "2 runs to train in 2 processes of 1 torch thread each" in " ".join(jobs.output.split())
    record = json.loads((tmp_path / "jobs/study.json").read_text())
    assert record["complete"] and record["jobs"] == 2 and record["torch_threads_per_run"] == 1
    assert [r["action"] for r in record["runs"]] == ["train", "train"]
    for run in ("none/seed0", "cwd/seed0"):
        ours, theirs = (load_file(tmp_path / f"{where}/runs/{run}/model.safetensors") for where in ("jobs", "alone"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), run
    again = _study(tiny_data, teacher, tmp_path / "jobs", "--jobs", "2", methods="cwd", seeds="0")
    assert again.exit_code == 0 and "processes of" not in again.output
    assert [r["action"] for r in json.loads((tmp_path / "jobs/study.json").read_text())["runs"]] == ["reuse"] * 2


def test_study_refuses_zero_jobs(tiny_data, teacher, tmp_path):
    result = _study(tiny_data, teacher, tmp_path / "s", "--jobs", "0")
    assert result.exit_code == 2 and "--jobs must be at least 1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_study_fgd_recipe_starts_the_student_from_the_teacher(tiny_data, teacher, tmp_path):
    out = tmp_path / "study"
    result = _study(tiny_data, teacher, out, methods="fgd-recipe", seeds="0")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "runs/fgd-recipe/seed0/summary.json").read_text())
    assert summary["init_from_teacher"] and all(not k.startswith("backbone.body") for k in summary["init_from_teacher"])
    config = json.loads((out / "runs/fgd-recipe/seed0/config.json").read_text())
    assert config["train"]["grad_clip"] == 35.0 and config["distill"]["init_student_from_teacher"] is True
    assert json.loads((out / "runs/none/seed0/summary.json").read_text())["init_from_teacher"] is None
