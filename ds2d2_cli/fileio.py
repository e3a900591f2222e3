"""Atomic file output: nothing half-written is ever left under the final name.

One mechanism: `atomic_path` writes one file under a temporary name next to it and renames
it when the block succeeds; `staging` builds a whole run's output on it (JSON files next to
their final names, other files in hidden folders inside the output folder) and moves it all
into place only when the whole block succeeds. Write failures (an unwritable folder, a full
disk) become one-line `Ds2d2Error`s naming the file or folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from ds2d2_cli.errors import Ds2d2Error, one_line


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise Ds2d2Error(f"cannot write here: {exc.strerror or exc}", path) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise Ds2d2Error(f"cannot write: {exc.strerror or exc}", path) from None
    except Exception:
        # torch.save and safetensors report a full disk as a short write ("unexpected pos ..."):
        # look at the free space while the partial file still takes it up.
        full = _nearly_full(path.parent)
        tmp_path.unlink(missing_ok=True)
        if full:
            raise Ds2d2Error("cannot write: no space left on device", path) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


FULL_DISK_BYTES = 64 << 20


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | Path) -> Any:
    """A JSON file, or a one-line InputError naming it."""
    from ds2d2_cli.errors import InputError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable JSON file: {exc}", path) from None


def write_json(path: str | Path, data: Any, indent: int | None = None) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent)


class Staging:
    """A run's output, staged under temporary names (see `staging`)."""

    def __init__(self, out: Path, stack: contextlib.ExitStack):
        self.out = out
        self._stack = stack  # the JSON files' `atomic_path`s: renamed when it closes, after the moves
        self._folders: list[Path] = []
        self._moves: list[Callable[[], None]] = []

    def folder(self, prefix: str, suffix: str = "") -> Path:
        """A new hidden folder inside OUT for files to wait in; removed when the block ends."""
        try:
            path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=self.out))
        except OSError as exc:
            raise Ds2d2Error(f"cannot write here: {one_line(exc.strerror or exc)}", self.out) from None
        self._folders.append(path)
        return path

    def write_json(self, path: str | Path, data: Any, indent: int | None = None) -> None:
        """Write `path` now under a temporary name next to it; renamed onto `path` when the block succeeds."""
        tmp = self._stack.enter_context(atomic_path(path))
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent)

    def publish(self, staged: Path, final: Path) -> None:
        """Move the file `staged` (in a staging folder) onto `final` when the block succeeds, in call order."""
        def move() -> None:
            try:
                os.replace(staged, final)
            except OSError as exc:
                raise Ds2d2Error(f"cannot write: {one_line(exc.strerror or exc)}", final) from None
        self._moves.append(move)

    def publish_contents(self, staged: Path, final: Path, what: str) -> None:
        """Move every file in the folder `staged` (if any) into the folder `final` when the block succeeds."""
        def move() -> None:
            try:
                final.mkdir(parents=True, exist_ok=True)
                for path in sorted(staged.iterdir()):
                    os.replace(path, final / path.name)
            except FileNotFoundError:
                return  # nothing was staged there
            except OSError as exc:
                raise Ds2d2Error(f"cannot move {what} into place: {one_line(exc.strerror or exc)}", final) from None
        self._moves.append(move)


@contextlib.contextmanager
def staging(out: str | Path, *, create: bool = False) -> Iterator[Staging]:
    """Stage a set of output files in OUT; move them into place only when the whole block succeeds.

    Inside the block, `Staging.write_json` writes each JSON file under a temporary name next
    to its final one, `Staging.folder` gives hidden folders inside OUT for other files, and
    `Staging.publish` / `publish_contents` name where those go. When the block ends well the
    staged files are moved into place (in the order given), then the JSON files renamed
    (the last written first). A failure on the way (a full disk ...) removes every
    temporary file and folder and raises one `Ds2d2Error` naming the file or folder; no JSON
    file of the set appears under its final name. With `create`, OUT is made (with its
    parents; "cannot write here" when that fails) and the folders made for it are removed
    again when the block fails, if still empty.
    """
    out = Path(out)
    created: list[Path] = []
    if create:
        probe = out
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_empty(created)
            raise Ds2d2Error(f"cannot write here: {one_line(exc.strerror or exc)}", out) from None
    stack = contextlib.ExitStack()
    stage = Staging(out, stack)
    try:
        with stack:
            yield stage
            for move in stage._moves:
                move()
    except BaseException:
        _remove_folders(stage._folders)
        _remove_empty(created)
        raise
    _remove_folders(stage._folders)


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) where they are still empty."""
    for path in folders:
        with contextlib.suppress(OSError):
            path.rmdir()
