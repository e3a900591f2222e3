"""`ds2d2_cli.parallel`: jobs side by side in processes, their progress forwarded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds2d2_cli.errors import InputError
from ds2d2_cli.parallel import Job, chain_seconds, makespan, run_jobs


class _Recorder:
    """A reporter that keeps what reached it: notes, and per task its total, steps and closing."""

    def __init__(self):
        self.notes: list[str] = []
        self.tasks: dict[str, dict] = {}

    def task(self, description, total, completed=0):
        record = self.tasks.setdefault(description, {"total": total, "done": completed, "closed": False})

        class _Task:
            def update(self, advance=1, **fields):
                record["done"] += advance

            def close(self):
                record["closed"] = True

        return _Task()

    def note(self, message):
        self.notes.append(message)


def _double(*, reporter, value):
    reporter.note(f"got {value}")
    task = reporter.task("work", total=3)
    for _ in range(3):
        task.update(1)
    task.close()
    return value * 2


def _refuse(*, reporter):
    raise InputError("this input is bad")


def _sleep(*, reporter, pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)


def _threads(*, reporter):
    import torch

    reporter.note("counted")
    return torch.get_num_threads()


def test_chain_seconds_and_makespan_by_hand():
    # amplifier (1 s) -> ds2d2 (5 s); two independent 4 s runs; two processes
    seconds = {"amplifier": 1.0, "ds2d2": 5.0, "x": 4.0, "y": 4.0}
    after = {"ds2d2": ("amplifier",)}
    assert chain_seconds(seconds, after) == {"amplifier": 6.0, "ds2d2": 5.0, "x": 4.0, "y": 4.0}
    # amplifier and x start at 0; ds2d2 at 1 (to 6); y at 4 (to 8). Longest-own-first would give 10.
    assert makespan(seconds, after, 2) == 8.0
    assert makespan(seconds, after, 1) == 14.0
    assert makespan(seconds, after, 4) == 6.0
    # a finished job's dependants are ready at once
    assert makespan({"ds2d2": 5.0, "x": 4.0}, after, 2) == 5.0
    with pytest.raises(ValueError, match="wait for each other"):
        chain_seconds({"a": 1.0, "b": 1.0}, {"a": ("b",), "b": ("a",)})


def test_jobs_run_in_order_with_their_threads_and_progress_forwarded():
    recorder = _Recorder()
    finished = []
    outcomes = run_jobs([
        Job("first", _double, {"value": 1}),
        Job("second", _double, {"value": 2}, after=("first",)),
        Job("refused", _refuse),
        Job("blocked", _double, {"value": 3}, after=("refused",)),
        Job("threads", _threads, label="thread count"),
    ], processes=2, threads=1, reporter=recorder, on_finish=lambda job, outcome: finished.append(job.name))
    assert outcomes["first"].value == 2 and outcomes["second"].value == 4
    assert outcomes["threads"].value == 1
    assert outcomes["refused"].error == "this input is bad" and outcomes["refused"].value is None
    assert outcomes["blocked"].error == "not run: refused failed"
    assert finished.index("first") < finished.index("second") and sorted(finished) == sorted(outcomes)
    assert "first: got 1" in recorder.notes and "second: got 2" in recorder.notes
    assert recorder.tasks["first: work"] == {"total": 3, "done": 3, "closed": True}
    assert recorder.tasks["second: work"] == {"total": 3, "done": 3, "closed": True}
    assert outcomes["first"].wall_s > 0
    assert "thread count: counted" in recorder.notes  # tagged with the label, not the name


def test_bad_job_lists_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        run_jobs([Job("a", _threads), Job("a", _threads)], processes=1, threads=1, reporter=_Recorder())
    with pytest.raises(ValueError, match="unknown"):
        run_jobs([Job("a", _threads, after=("b",))], processes=1, threads=1, reporter=_Recorder())


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has stopped; its new parent reaps it


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    """Killing the parent (`kill PID`, not Ctrl-C, which reaches every process of the group)
    must not leave a worker training on."""
    pid_file = tmp_path / "worker.pid"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from test_parallel import _sleep; from ds2d2_cli.parallel import Job, run_jobs; "
              "from ds2d2_cli.progress import NullReporter; "
              f"run_jobs([Job('s', _sleep, {{'pid_file': {str(pid_file)!r}}})], processes=1, threads=1, "
              "reporter=NullReporter())")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the worker never started"
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while _running(worker):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.2)
