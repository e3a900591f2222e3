"""A run's training log: `OUT/metrics.jsonl`.

One JSON object per line, each with the iteration it belongs to (`iter`):

- a logged training step: `epoch`, `lr`, `loss` (the sum that is minimised), every named
  loss term and `images_per_s`;
- an evaluation: `{"iter": N, "eval": {mAP, AP50, ..., per_class: {...}}}`;
- a non-finite step skipped with `on_nonfinite: skip`: `{"iter": N, "skipped_step": {term, value}}`.

`MetricsLog` is the one place that writes the file (rank 0 only; the other processes of a
multi-GPU run write nothing), trims it on `--resume` so it reads as one run, and reads it
back (plots, compare) with a one-line error naming the file and line of a damaged record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import atomic_path

LOG_FILE = "metrics.jsonl"


class MetricsLog:
    """Writes, trims and reads a run's `metrics.jsonl`.

    The file is opened on the first write and closed by `close()` (or the `with` block); a
    process other than rank 0 writes nothing.
    """

    def __init__(self, run_dir: str | Path, *, writes: bool | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_FILE
        if writes is None:
            from ds2d2_cli import distributed  # torch; reading a log needs none of it

            writes = distributed.is_main()
        self.writes = writes
        self._file = None

    # ------------------------------------------------------------------ writing

    def open(self) -> None:
        """Create (or append to) the file now rather than at the first record."""
        if self.writes and self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")

    def step(self, record: dict[str, Any]) -> None:
        """A logged training step: {"iter", "epoch", "lr", "loss", <terms>..., "images_per_s"}."""
        self._write(record)

    def evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        self._write({"iter": iteration, "eval": metrics})

    def skipped_step(self, iteration: int, term: str, value: float) -> None:
        self._write({"iter": iteration, "skipped_step": {"term": term, "value": str(value)}})

    def trim(self, last_iteration: int) -> None:
        """On resume, drop the records written after the checkpoint at `last_iteration`, so
        the log reads as one run."""
        if not self.writes or not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = _parse(line, self.path, number)
            if not isinstance(record, dict) or record.get("iter", 0) <= last_iteration:
                kept.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        self.open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every line written so far

    # ------------------------------------------------------------------ reading

    @staticmethod
    def read(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(training steps, evaluations) from a metrics.jsonl; skipped-step records are left out."""
        path = Path(path)
        steps, evals = [], []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the training log: {exc}", path) from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _parse(line, path, number)
            if not isinstance(record, dict) or "iter" not in record:
                raise InputError("not a ds2d2 training log line (no iter)", path, number)
            if "skipped_step" in record:
                continue  # a non-finite step skipped with on_nonfinite=skip: no losses to plot
            (evals if "eval" in record else steps).append(record)
        return steps, evals


def _parse(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"not a JSON line ({exc.msg})", path, number) from None


__all__ = ["LOG_FILE", "MetricsLog"]
