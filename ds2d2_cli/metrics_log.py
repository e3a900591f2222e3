"""A run's training log: `OUT/metrics.jsonl`, and optionally the same numbers for TensorBoard.

One JSON object per line, each with the iteration it belongs to (`iter`):

- a logged training step: `epoch`, `lr`, `loss` (the sum that is minimised), every named
  loss term and `images_per_s`;
- an evaluation: `{"iter": N, "eval": {mAP, AP50, ..., per_class: {...}}}`;
- a non-finite step skipped with `on_nonfinite: skip`: `{"iter": N, "skipped_step": {term, value}}`.

`MetricsLog` is the one place that writes the file (rank 0 only; the other processes of a
multi-GPU run write nothing), trims it on `--resume` so it reads as one run, and reads it
back (plots, compare) with a one-line error naming the file and line of a damaged record.
With `train.tensorboard: true` every logged number also goes to `OUT/tensorboard/` as a
scalar (`train/<term>`, `train/lr`, `train/images_per_s`, `eval/<metric>`), written by
torch's `SummaryWriter` (the optional `tensorboard` package).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import atomic_path

LOG_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Fields of a step record that are bookkeeping, not curves.
_NOT_SCALARS = ("iter", "epoch")


def summary_writer_class(setting: str = "train.tensorboard"):
    """torch's SummaryWriter, or a one-line InputError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(f"{setting}=true needs the tensorboard package: pip install 'ds2d2[tensorboard]'") from None
    return SummaryWriter


def _scalars(prefix: str, values: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in `values`, nested dicts flattened with '/'."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


class MetricsLog:
    """Writes, trims and reads a run's `metrics.jsonl` (and feeds the optional TensorBoard sink).

    Files are opened on the first write and closed by `close()` (or the `with` block); a
    process other than rank 0 writes nothing. `tensorboard=True` checks at construction, on
    every process, that the package is installed, so a missing one stops the run before it
    trains.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, setting: str = "train.tensorboard",
                 writes: bool | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_FILE
        if writes is None:
            from ds2d2_cli import distributed  # torch; reading a log needs none of it

            writes = distributed.is_main()
        self.writes = writes
        self._writer_class = summary_writer_class(setting) if tensorboard else None
        self._file = None
        self._tensorboard = None
        self._purge_step: int | None = None

    # ------------------------------------------------------------------ writing

    def open(self) -> None:
        """Create (or append to) the file now rather than at the first record."""
        if self.writes and self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")

    def step(self, record: dict[str, Any]) -> None:
        """A logged training step: {"iter", "epoch", "lr", "loss", <terms>..., "images_per_s"}."""
        self._write(record)
        self._scalars("train", {k: v for k, v in record.items() if k not in _NOT_SCALARS}, record["iter"])

    def evaluation(self, iteration: int, metrics: dict[str, Any]) -> None:
        self._write({"iter": iteration, "eval": metrics})
        self._scalars("eval", metrics, iteration)

    def skipped_step(self, iteration: int, term: str, value: float) -> None:
        self._write({"iter": iteration, "skipped_step": {"term": term, "value": str(value)}})

    def trim(self, last_iteration: int) -> None:
        """On resume, drop the records written after the checkpoint at `last_iteration`, so
        the log reads as one run (TensorBoard hides its later events the same way)."""
        self._purge_step = last_iteration + 1
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
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

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

    def _scalars(self, prefix: str, values: dict[str, Any], iteration: int) -> None:
        if not self.writes or self._writer_class is None:
            return
        if self._tensorboard is None:
            self._tensorboard = self._writer_class(str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        for tag, value in _scalars(prefix, values):
            self._tensorboard.add_scalar(tag, value, iteration)

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


__all__ = ["LOG_FILE", "TENSORBOARD_DIR", "MetricsLog", "summary_writer_class"]
