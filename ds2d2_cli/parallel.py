"""Training runs side by side: processes with a fixed number of torch threads each, whose
progress bars and notes reach the parent's reporter.

Why processes: on a small CPU, separate runs of one thread each finish sooner than the same
runs one after another with all threads (`benchmarks/bench_demo_jobs.py`). A CPU run's
figures depend on its torch thread count, not on what runs beside it, so a run trained here
equals, bit for bit, the same run trained alone with that many threads.

Jobs call a module-level function (spawned processes import it) with a `reporter` keyword.
A job may wait for others (`after`); among the jobs ready to start, the largest `priority`
(say, estimated seconds) goes first, which keeps the longest chain from starting last.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ds2d2_cli.errors import Ds2d2Error
from ds2d2_cli.progress import Reporter, Task


@dataclass(frozen=True)
class Job:
    name: str
    target: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    priority: float = 0.0
    label: str | None = None  # how its bars and notes are tagged (default: its name)


@dataclass
class Outcome:
    """What a job returned, or the one-line error that stopped it."""

    value: Any = None
    error: str | None = None
    wall_s: float = 0.0


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` torch threads (None: as they are), then restore them."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_per_job(jobs: int) -> int:
    """Each of `jobs` processes gets an equal share of this process's torch threads (at least one)."""
    import torch

    return max(1, torch.get_num_threads() // jobs)


def chain_seconds(seconds: dict[str, float], after: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Each job's seconds plus its longest chain of dependants: as a priority, it starts a
    short job that a long one waits for (the demo's amplifier) before the long independent ones."""
    dependants: dict[str, list[str]] = {name: [] for name in seconds}
    for name in seconds:
        for before in after.get(name, ()):
            if before in dependants:
                dependants[before].append(name)
    chains: dict[str, float] = {}

    def chain(name: str, seen: tuple[str, ...] = ()) -> float:
        if name in seen:
            raise ValueError(f"jobs wait for each other: {[*seen, name]}")
        if name not in chains:
            chains[name] = seconds[name] + max((chain(d, (*seen, name)) for d in dependants[name]), default=0.0)
        return chains[name]

    for name in seconds:
        chain(name)
    return chains


def makespan(seconds: dict[str, float], after: dict[str, tuple[str, ...]], processes: int) -> float:
    """How long `run_jobs` takes for jobs of these durations with `chain_seconds` as their
    priorities: its schedule, played out on a clock."""
    priority = chain_seconds(seconds, after)
    finish: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    waiting = dict(seconds)
    now = 0.0
    while waiting or running:
        ready = sorted((n for n in waiting if all(a in finish or a not in seconds for a in after.get(n, ()))),
                       key=lambda n: -priority[n])
        for name in ready[:processes - len(running)]:
            running.append((now + waiting.pop(name), name))
        running.sort()
        now, name = running.pop(0)
        finish[name] = now
    return now


# --- in the worker processes -------------------------------------------------------------

_messages: Any = None  # the parent's queue, set when a worker process starts


def _start_worker(messages: Any, parent: int) -> None:
    global _messages
    _messages = messages
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()


def _stop_when_orphaned(parent: int) -> None:
    """A killed parent (not only Ctrl-C, which reaches the whole process group) must not
    leave its workers training on: they stop within a second or two."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class _ForwardedTask:
    def __init__(self, job: str, number: int):
        self._key = (job, number)

    def update(self, advance: int = 1, **fields: Any) -> None:
        _messages.put(("update", self._key, advance, fields))

    def close(self) -> None:
        _messages.put(("close", self._key))


class _ForwardingReporter:
    """A reporter in a worker: every call goes to the parent, tagged with the job's name."""

    def __init__(self, job: str):
        self._job = job
        self._tasks = 0

    def task(self, description: str, total: int | None, completed: int = 0) -> Task:
        self._tasks += 1
        _messages.put(("task", (self._job, self._tasks), description, total, completed))
        return _ForwardedTask(self._job, self._tasks)

    def note(self, message: str) -> None:
        _messages.put(("note", self._job, message))


def _run_in_worker(job_name: str, target: Callable[..., Any], kwargs: dict[str, Any], threads: int) -> Outcome:
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        value = target(reporter=_ForwardingReporter(job_name), **kwargs)
    except Ds2d2Error as exc:  # as text: exceptions with extra arguments do not always survive pickling
        return Outcome(error=str(exc), wall_s=time.perf_counter() - started)
    return Outcome(value=value, wall_s=time.perf_counter() - started)


# --- in the parent -----------------------------------------------------------------------

class _Relay:
    """Reads the workers' messages on a thread (so a full pipe never blocks a worker) and
    hands them to the reporter on the caller's thread (`pump`)."""

    def __init__(self, messages: Any, reporter: Reporter):
        self._messages = messages
        self._reporter = reporter
        self._inbox: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._tasks: dict[tuple[str, int], Task] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            message = self._messages.get()
            if message is None:
                return
            self._inbox.put(message)

    def pump(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue_module.Empty:
                return
            kind = message[0]
            if kind == "task":
                _, key, description, total, completed = message
                self._tasks[key] = self._reporter.task(f"{key[0]}: {description}", total, completed)
            elif kind == "update" and message[1] in self._tasks:
                self._tasks[message[1]].update(message[2], **message[3])
            elif kind == "close" and message[1] in self._tasks:
                self._tasks.pop(message[1]).close()
            elif kind == "note":
                self._reporter.note(f"{message[1]}: {message[2]}")

    def stop(self) -> None:
        self._messages.put(None)
        self._thread.join()
        self.pump()
        for task in self._tasks.values():  # a worker that died mid-task
            task.close()
        self._tasks.clear()


def run_jobs(jobs: Sequence[Job], *, processes: int, threads: int, reporter: Reporter,
             on_start: Callable[[Job], None] | None = None,
             on_finish: Callable[[Job, Outcome], None] | None = None) -> dict[str, Outcome]:
    """Run `jobs` in `processes` spawned processes of `threads` torch threads each.

    A job whose `after` names a job that failed does not run; its outcome says why. Errors
    other than `Ds2d2Error` are raised here once the running jobs have stopped.
    """
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {names}")
    unknown = {a for job in jobs for a in job.after} - set(names)
    if unknown:
        raise ValueError(f"jobs wait for unknown jobs: {sorted(unknown)}")
    if processes < 1 or threads < 1:
        raise ValueError("processes and threads must be at least 1")
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    relay = _Relay(messages, reporter)
    waiting = list(jobs)
    running: dict[Future, Job] = {}
    outcomes: dict[str, Outcome] = {}
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_start_worker,
                               initargs=(messages, os.getpid()))
    try:
        while waiting or running:
            for job in list(waiting):
                failed = [a for a in job.after if a in outcomes and outcomes[a].error is not None]
                if failed:
                    waiting.remove(job)
                    outcomes[job.name] = outcome = Outcome(error=f"not run: {failed[0]} failed")
                    if on_finish is not None:
                        on_finish(job, outcome)
            ready = sorted((job for job in waiting if all(a in outcomes for a in job.after)),
                           key=lambda job: -job.priority)
            for job in ready[:processes - len(running)]:
                waiting.remove(job)
                if on_start is not None:
                    on_start(job)
                running[pool.submit(_run_in_worker, job.label or job.name, job.target, job.kwargs, threads)] = job
            if not running:
                if waiting:
                    raise ValueError(f"jobs wait for each other: {[job.name for job in waiting]}")
                continue
            finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            relay.pump()
            for future in finished:
                job = running.pop(future)
                outcomes[job.name] = outcome = future.result()
                if on_finish is not None:
                    on_finish(job, outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        relay.stop()
    return outcomes
