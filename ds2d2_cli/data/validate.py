"""Bad input: the policy every data converter follows, and the image checks they share.

Every problem found in a dataset is one of three kinds (README, "Bad input and --skip-bad"):

* a **bad item** (`BadItem`: an unreadable image, a label line that does not parse, an
  unknown class, a missing counterpart file ...) stops the run with one line naming the
  file (and line or object); with `skip_bad` the item is skipped instead, reported as a
  note and listed in the summary;
* an item that is **unusable whatever the options** (a zero-area object) is always left
  out, and always reported and listed, the same way;
* an **unambiguous repair** (a self-intersecting quadrilateral re-ordered into its convex
  hull, an object sticking out of its image clipped to it) is made, counted and listed.

Nothing is ever left out silently. Library code only raises and reports (through the
Reporter); the CLI prints.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ds2d2_cli.errors import InputError, one_line  # noqa: F401 - one_line: shared by the converters
from ds2d2_cli.progress import NullReporter, Reporter

# What ds2d2 reads: the formats the remote-sensing datasets ship in (and the DOTA devkit splits).
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
MAX_NOTES = 100  # notes for single items; beyond that the summary's counts and list carry them


class BadItem(InputError):
    """An InputError about one item (image, label file, line, object, annotation) that --skip-bad may skip.

    `reason` is the short category the summary counts it under ("unknown class", ...).
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 reason: str = "bad input"):
        super().__init__(message, path, line)
        self.reason = reason

    def __reduce__(self):  # picklable with its fields (worker processes send these back)
        return (BadItem, (self.message, self.path, self.line, self.reason))


class Problems:
    """Bad items of one run: raised at once, or (`skip_bad`) skipped, reported and listed.

    `skipped` lists every item left out of the output (bad items under --skip-bad and
    zero-area objects), `repaired` every item changed on the way; each entry is a dict
    with file, line, item, reason, problem and action, plus where it belongs (split,
    image) so each output JSON can list its own. Notes are held until `flush` (called
    once the run succeeded), so a failing run prints nothing but its one error line.
    """

    def __init__(self, skip_bad: bool = False, reporter: Reporter | None = None):
        self.skip_bad = skip_bad
        self.reporter = reporter if reporter is not None else NullReporter()
        self.skipped: list[dict[str, Any]] = []
        self.repaired: list[dict[str, Any]] = []
        self._notes = 0
        self._pending: list[str] = []

    def note(self, message: str) -> None:
        """A note for the reporter, held until `flush`: a run that fails prints only its error."""
        self._pending.append(message)

    def flush(self) -> None:
        """Hand the held notes to the reporter (the run succeeded)."""
        pending, self._pending = self._pending, []
        for message in pending:
            self.reporter.note(message)

    # ----------------------------------------------------------------- recording

    def bad(self, exc: BadItem, item: str, **where: Any) -> None:
        """A bad `item`: raise `exc`, or with --skip-bad record and report it (the caller skips it)."""
        if not self.skip_bad:
            raise exc
        self._left_out(exc, item, "skipped", where)

    def drop(self, exc: BadItem, item: str, **where: Any) -> None:
        """An item no option can make usable (zero area): always left out, always reported."""
        self._left_out(exc, item, "dropped", where)

    def repair(self, exc: BadItem, item: str, **where: Any) -> None:
        """An item repaired in place: listed and counted; `note_repairs` reports them per reason."""
        self.repaired.append(self._entry(exc, item, "repaired", where))

    def _entry(self, exc: BadItem, item: str, action: str, where: dict[str, Any]) -> dict[str, Any]:
        return {"file": str(exc.path) if exc.path is not None else None, "line": exc.line, "item": item,
                "reason": exc.reason, "problem": exc.message, "action": action, **where}

    def _left_out(self, exc: BadItem, item: str, action: str, where: dict[str, Any]) -> None:
        self.skipped.append(self._entry(exc, item, action, where))
        self._notes += 1
        if self._notes <= MAX_NOTES:
            self.note(f"{action} {item}: {exc}")
        elif self._notes == MAX_NOTES + 1:
            self.note(f"more than {MAX_NOTES} items left out: the rest are not noted one by one "
                               "(the summary counts them all; --json lists them)")

    def note_repairs(self, label: str, entries: Iterable[dict[str, Any]] | None = None) -> None:
        """One note per kind of repair: how many, and the first one."""
        entries = list(self.repaired if entries is None else entries)
        for reason, count in counts(entries).items():
            first = next(e for e in entries if e["reason"] == reason)
            where = f"{first['file']}:{first['line']}" if first["line"] is not None else first["file"]
            items = first["item"] + ("s" if count > 1 else "")
            self.note(f"{label}{count} {items} repaired ({reason}), e.g. {where}: {first['problem']}")

    # ----------------------------------------------------------------- reading back

    def skipped_where(self, **where: Any) -> list[dict[str, Any]]:
        return [e for e in self.skipped if all(e.get(k) == v for k, v in where.items())]

    def repaired_where(self, **where: Any) -> list[dict[str, Any]]:
        return [e for e in self.repaired if all(e.get(k) == v for k, v in where.items())]

    def report(self) -> "ProblemReport":
        """The figures every prepare summary carries: counts by reason and the full lists."""
        return ProblemReport(self.skip_bad, counts(self.skipped), counts(self.repaired), self.skipped, self.repaired)


@dataclass
class ProblemReport:
    """What bad input did to a run: every item left out (`skipped`) or repaired, and their counts by reason."""

    skip_bad: bool
    skipped_counts: dict[str, int]
    repaired_counts: dict[str, int]
    skipped: list[dict[str, Any]]
    repaired: list[dict[str, Any]]


def counts(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    """{reason: number of entries}, most frequent first (ties by name)."""
    tally = Counter(e["reason"] for e in entries)
    return dict(sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------- images


def _pil():
    from PIL import Image, UnidentifiedImageError

    return Image, UnidentifiedImageError


def unsupported_extension(path: Path) -> BadItem:
    return BadItem(f"unsupported image format {path.suffix or '(no extension)'!r} "
                   f"(ds2d2 reads {', '.join(IMAGE_EXTS)})", path, reason="unsupported image format")


@contextlib.contextmanager
def no_pixel_limit() -> Iterator[None]:
    """DOTA scenes reach 20000 px: lift PIL's decompression-bomb limit while reading them."""
    Image, _ = _pil()
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header only; BadItem for a missing or unreadable file."""
    Image, _ = _pil()
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):  # GeoTIFF: any bands and types, through rasterio
        from ds2d2_cli.data.raster import probe

        info = probe(path)
        return info.width, info.height
    try:
        with no_pixel_limit(), Image.open(path) as img:
            _check_format(img, path)
            return int(img.size[0]), int(img.size[1])
    except BadItem:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _image_error(exc, path) from None


def _image_error(exc: Exception, path: Path) -> BadItem:
    Image, UnidentifiedImageError = _pil()
    if isinstance(exc, FileNotFoundError):
        return BadItem("image file not found", path, reason="missing image")
    if isinstance(exc, IsADirectoryError):
        return BadItem("a folder, not an image file", path, reason="unreadable image")
    if isinstance(exc, UnidentifiedImageError):
        return BadItem("cannot read image: not a recognised image file (corrupt, or not an image)", path,
                       reason="unreadable image")
    text = one_line(getattr(exc, "strerror", None) or exc).replace(f"'{path}'", "").strip(" :")
    if "truncated" in text.lower():
        return BadItem(f"cannot read image: truncated file ({text})", path, reason="unreadable image")
    return BadItem(f"cannot read image: {text or type(exc).__name__}", path, reason="unreadable image")


def _check_format(img: Any, path: Path) -> None:
    if img.format not in IMAGE_FORMATS:
        raise BadItem(f"unsupported image format {img.format or 'unknown'} (ds2d2 reads "
                      f"{', '.join(IMAGE_FORMATS)})", path, reason="unsupported image format")


def check_image(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image that decodes completely; BadItem otherwise.

    Catches missing, corrupt, truncated and unsupported files without the cost of a
    full decode: PNG chunks are verified (CRCs and the end marker), JPEGs decoded at 1/8
    scale (which still reads every byte), other formats decoded in full.
    """
    Image, _ = _pil()
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        from ds2d2_cli.data.raster import probe, read_raster

        info = probe(path)
        read_raster(path, (0, info.height - 1, info.width, 1))  # the last row: a truncated file fails here
        return info.width, info.height
    try:
        with no_pixel_limit(), Image.open(path) as img:
            _check_format(img, path)
            size = img.size
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
        if size[0] <= 0 or size[1] <= 0:
            raise BadItem(f"image has no pixels ({size[0]}x{size[1]})", path, reason="unreadable image")
        return int(size[0]), int(size[1])
    except BadItem:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL raises all of these for bad files
        raise _image_error(exc, path) from None


def open_rgb(path: str | Path):
    """Decode a whole image as RGB (no decompression-bomb limit: DOTA scenes reach 20000 px)."""
    Image, _ = _pil()
    path = Path(path)
    try:
        with no_pixel_limit(), Image.open(path) as img:
            _check_format(img, path)
            img.load()
            image = img.convert("RGB") if img.mode != "RGB" else img.copy()
        if image.size[0] <= 0 or image.size[1] <= 0:
            raise BadItem(f"image has no pixels ({image.size[0]}x{image.size[1]})", path, reason="unreadable image")
        return image
    except BadItem:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _image_error(exc, path) from None


def one_image_per_stem(images: Iterable[Path], problems: Problems, where: Callable[[str], dict[str, Any]]
                       ) -> list[Path]:
    """The images whose stem no other image shares, sorted; the others are bad items (which label file is whose?)."""
    by_stem: dict[str, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.stem, []).append(path)
    unique: list[Path] = []
    for stem, group in by_stem.items():
        if len(group) == 1:
            unique.append(group[0])
            continue
        names = ", ".join(p.name for p in group)
        for path in group:
            problems.bad(BadItem(f"two images share the name {stem!r} ({names}): which label file is whose is "
                                 "ambiguous", path, reason="duplicate image name"), "image", **where(stem))
    return sorted(unique)


def finite(text: str) -> float | None:
    """`text` as a finite number, or None (not a number, nan, inf): every label format's number check."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def difficult_flag(text: str) -> int | None:
    """DOTA's and VOC's difficult flag: 0 when empty, 1 for any non-zero number, None when not a number."""
    if not text:
        return 0
    value = finite(text)
    return None if value is None else (1 if int(value) != 0 else 0)


def read_label_text(path: Path) -> str:
    """A text label file (DOTA labelTxt, YOLO txt, UCAS-AOD txt) as text; BadItem for the whole file otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BadItem("label file not found", path, reason="image without label file") from None
    except UnicodeDecodeError as exc:
        raise BadItem(f"cannot read label file: not UTF-8 text (bad byte at offset {exc.start})", path,
                      reason="unreadable label file") from None
    except OSError as exc:
        raise BadItem(f"cannot read label file: {one_line(exc.strerror or exc)}", path,
                      reason="unreadable label file") from None


def writable_folder(folder: Path) -> None:
    """Create `folder` (and parents) or fail with one line: before any work, not half-way."""
    from ds2d2_cli.errors import Ds2d2Error

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise Ds2d2Error("output path exists and is not a folder", folder) from None
    except OSError as exc:
        raise Ds2d2Error(f"cannot create the output folder: {one_line(exc.strerror or exc)}", folder) from None
    if not folder.is_dir():
        raise Ds2d2Error("output path exists and is not a folder", folder)


class _HeldTask:
    def __init__(self, task: Any):
        self._task = task

    def update(self, advance: int = 1, **fields: Any) -> None:
        self._task.update(advance, **fields)

    def close(self) -> None:
        """Closed with the whole run (`held_progress`), not before."""


class _HeldReporter:
    def __init__(self, reporter: Reporter):
        self._reporter = reporter
        self.tasks: list[Any] = []

    def task(self, description: str, total: int | None, completed: int = 0) -> Any:
        task = self._reporter.task(description, total, completed)
        self.tasks.append(task)
        return _HeldTask(task)

    def note(self, message: str) -> None:
        self._reporter.note(message)


@contextlib.contextmanager
def held_progress(reporter: Reporter) -> Iterator[Reporter]:
    """A reporter whose progress tasks all close when the block ends, not one by one.

    A run that fails after a finished step (a bad annotation after every image was
    checked, a full disk at the end) then reports only its error, not "check images:
    2/2" before it: tasks closed while an error propagates print nothing.
    """
    held = _HeldReporter(reporter)
    try:
        yield held
    finally:
        for task in held.tasks:
            task.close()
