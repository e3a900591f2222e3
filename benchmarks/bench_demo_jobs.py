"""How to spend two cores on the demo's trainings (issue 23): measured, in one run.

The demo's trainings (amplifier, four students) are independent once the teacher is there.
This trains the same two demo students (the baseline and CWD, from the shipped teacher, on
the demo's scenes, `--iters` iterations each, with their evaluation at the end) three ways, through
`ds2d2_cli.parallel.run_jobs` as `ds2d2 demo --jobs` does:

- `serial`: one after the other, each with all the machine's threads (the demo until now);
- `jobs`: side by side, one process per run, the threads shared out (one each on 2 cores);
- `oversubscribed`: side by side, each run with all the threads (two processes of two
  threads on 2 cores), which keeps `serial`'s figures, since a CPU run's numbers depend on
  its torch thread count only.

Rounds alternate the order (serial, jobs, oversubscribed, then backwards) and the wall time
of each way is the median over rounds. It also checks which ways give the same weights.

    python benchmarks/bench_demo_jobs.py                     # -> benchmarks/results/demo_jobs.json
    python benchmarks/bench_demo_jobs.py --iters 4 --rounds 1 --output /tmp/d.json   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (HERE, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
from bench_distill_step import machine_info, save_record  # noqa: E402

from ds2d2_cli.config import load_config  # noqa: E402
from ds2d2_cli.demo import DEMO_PRESET, SCENE_SIZE, SCENES, _prepare, shipped_teacher, train_stage  # noqa: E402
from ds2d2_cli.parallel import Job, run_jobs  # noqa: E402
from ds2d2_cli.progress import NullReporter  # noqa: E402

STUDENTS = {"baseline": "none", "cwd": "cwd"}


def jobs_for(out: Path, patches: Path, iters: int) -> list[Job]:
    jobs = []
    for name, method in STUDENTS.items():
        config = load_config(DEMO_PRESET, [f"train.max_iters={iters}", "train.eval_every=null",
                                           f"train.checkpoint_every={iters}", f"distill.method={method}"])
        kwargs = dict(stage="student", config=config, out=out / name, resume=False, data_dir=patches,
                      preset=DEMO_PRESET, device="cpu")
        if method != "none":
            kwargs["teacher"] = shipped_teacher()
        jobs.append(Job(name, train_stage, kwargs))
    return jobs


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: load_file(folder / name / "model.safetensors") for name in STUDENTS}


def same(a: dict, b: dict) -> bool:
    return all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def run(quick: bool, device: str = "cpu") -> dict:
    """For `run_all.py`: the default measurement, or a smoke run (`quick`), in a temp folder."""
    if device != "cpu":  # what it measures is how CPU threads and processes share the cores
        return {"skipped": f"CPU only, not run on {device}",
                "cases": [{"summary": f"skipped on {device}: it measures CPU threads and processes"}]}
    work = Path(tempfile.mkdtemp(prefix="demo-jobs-"))
    try:
        return measure(4 if quick else 20, 1 if quick else 2, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(iters: int, rounds: int, work: Path) -> dict:
    cores = torch.get_num_threads()
    ways = {"serial": (1, cores), "jobs": (len(STUDENTS), max(1, cores // len(STUDENTS))),
            "oversubscribed": (len(STUDENTS), cores)}
    patches = _prepare(work / "demo", load_config(DEMO_PRESET), NullReporter(), SCENES, SCENE_SIZE)
    times: dict[str, list[float]] = {way: [] for way in ways}
    trained: dict[str, dict] = {}
    for round_index in range(rounds):
        order = list(ways) if round_index % 2 == 0 else list(reversed(ways))
        for way in order:
            processes, threads = ways[way]
            out = work / "runs" / way
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            outcomes = run_jobs(jobs_for(out, patches, iters), processes=processes, threads=threads,
                                reporter=NullReporter())
            times[way].append(time.perf_counter() - started)
            failed = {n: o.error for n, o in outcomes.items() if o.error}
            if failed:
                raise RuntimeError(f"{way}: {failed}")
            trained[way] = weights(out)
            print(f"  round {round_index + 1} {way:>14} ({processes} x {threads} threads): {times[way][-1]:.1f} s",
                  flush=True)
    wall = {way: round(statistics.median(t), 1) for way, t in times.items()}
    summary = (", ".join(f"{way} {wall[way]:.0f} s (x{wall['serial'] / wall[way]:.2f})" for way in ways)
               + f"; oversubscribed == serial weights: {same(trained['oversubscribed'], trained['serial'])}")
    return {
        "machine": machine_info("cpu"),
        "students": STUDENTS,
        "iterations": iters,
        "rounds": rounds,
        "ways": {way: {"processes": p, "threads_per_run": t, "wall_s": wall[way], "wall_s_rounds": times[way],
                       "speedup_vs_serial": round(wall["serial"] / wall[way], 3)} for way, (p, t) in ways.items()},
        "same_weights": {"oversubscribed_vs_serial": same(trained["oversubscribed"], trained["serial"]),
                         "jobs_vs_serial": same(trained["jobs"], trained["serial"])},
        "summary": summary,
        "cases": [{"summary": summary}],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20, help="iterations per student (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three ways (default 2)")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp folder)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "demo_jobs.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="demo-jobs-"))
    results = measure(args.iters, args.rounds, work)
    results["cpu_count"] = os.cpu_count()
    save_record("demo_jobs", args.output, results, started, "cpu",
                iters=args.iters, rounds=args.rounds)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
