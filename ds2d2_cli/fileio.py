"""Atomic file output: nothing half-written is ever left under the final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ds2d2_cli.errors import Ds2d2Error


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


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
