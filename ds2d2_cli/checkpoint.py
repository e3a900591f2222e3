"""The checkpoint format every stage hands over: safetensors weights + string metadata.

Plain `safetensors.torch.load_file` reads the weights; the metadata (all strings, JSON
where structured) says what the weights are, so one loader can refuse a student passed
as `--teacher`, an amplifier of another teacher, or classes that do not match the data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ds2d2_cli import __version__
from ds2d2_cli.config import InputConfig, ModelConfig, RunConfig, stored_config, stored_model
from ds2d2_cli.errors import InputError
from ds2d2_cli.fileio import atomic_path
from ds2d2_cli.sample import SampleSpec, bands_text

FORMAT_NAME = "ds2d2-checkpoint"
FORMAT_VERSION = 2  # 2: `input` carries bands and the data's sample spec (1 is read as 8-bit RGB)
Stage = Literal["teacher", "amplifier", "student"]
STAGES: tuple[str, ...] = ("teacher", "amplifier", "student")


@dataclass
class CheckpointMeta:
    stage: Stage
    model: ModelConfig
    classes: list[str]
    input: InputConfig
    preset: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    teacher_sha256: str | None = None  # amplifiers and students: the teacher they came from
    method: str | None = None  # students: ds2d2 / none / fitnet
    # students started from another student (`distill --init-student`): that checkpoint's path,
    # sha256, method, teacher and its own `init_student`, so a chain's history reads from its last file
    init_student: dict[str, Any] | None = None
    ds2d2_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_strings(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "stage": self.stage,
            "detector": self.model.detector,
            "backbone": self.model.backbone,
            "fpn_channels": str(self.model.fpn_channels),
            "classes": json.dumps(self.classes),
            "input_size": str(self.input.size),
            "normalisation": json.dumps({"mean": list(self.input.resolved.mean), "std": list(self.input.resolved.std)}),
            "bands": json.dumps(list(self.input.resolved.bands)),
            "model": self.model.model_dump_json(),
            "input": self.input.model_dump_json(),
            "preset": self.preset,
            "config": json.dumps(self.config),
            "metrics": json.dumps(self.metrics),
            "ds2d2_version": self.ds2d2_version,
        }
        if self.teacher_sha256:
            meta["teacher_sha256"] = self.teacher_sha256
        if self.method:
            meta["method"] = self.method
        if self.init_student:
            meta["init_student"] = json.dumps(self.init_student)
        return meta

    @classmethod
    def from_strings(cls, meta: dict[str, str], path: Path) -> "CheckpointMeta":
        if meta.get("format") != FORMAT_NAME:
            raise InputError("a safetensors file, but not a ds2d2 checkpoint (no ds2d2 metadata)", path)
        try:
            version = int(meta["format_version"])
            if version > FORMAT_VERSION:
                raise InputError(
                    f"checkpoint format {version} is newer than this ds2d2 ({__version__}) reads; upgrade ds2d2", path
                )
            return cls(
                stage=meta["stage"],  # type: ignore[arg-type]
                model=ModelConfig.model_validate(stored_model(json.loads(meta["model"]))),
                classes=json.loads(meta["classes"]),
                input=InputConfig.model_validate_json(meta["input"]),
                preset=meta.get("preset", ""),
                config=json.loads(meta.get("config", "{}")),
                metrics=json.loads(meta.get("metrics", "{}")),
                teacher_sha256=meta.get("teacher_sha256"),
                method=meta.get("method"),
                init_student=json.loads(meta["init_student"]) if "init_student" in meta else None,
                ds2d2_version=meta.get("ds2d2_version", "?"),
                format_version=version,
            )
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed field is a bad file
            raise InputError(f"damaged ds2d2 metadata ({type(exc).__name__}: {exc})", path) from None


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: CheckpointMeta
    sha256: str

    def run_config(self) -> RunConfig | None:
        """The config of the run that wrote it, settings it predates filled as that run behaved."""
        try:
            return stored_config(self.meta.config)
        except Exception:  # noqa: BLE001 - older or foreign configs: callers fall back to the preset
            return None


def meta_for(stage: Stage, config: RunConfig, role: Literal["teacher", "student"], classes: Sequence[str],
             preset: str, **extra: Any) -> CheckpointMeta:
    return CheckpointMeta(
        stage=stage, model=getattr(config, role), classes=list(classes), input=config.input, preset=preset,
        config=config.model_dump(mode="json"), **extra,
    )


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write atomically: an interrupted save never leaves a half-written checkpoint behind."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta.to_strings())
    return path


def save_tensors(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Plain safetensors (no checkpoint metadata), written atomically: files no stage loads."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_layout(path: Path) -> None:
    """Tell 'not safetensors' from 'truncated' before safetensors' own, terser errors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError("not a safetensors file (too short)", path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100_000_000:
            raise InputError("not a safetensors file", path)
        if 8 + header_len > size:
            raise InputError("truncated safetensors file (header cut off)", path)
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("not a safetensors file (bad header)", path) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + header_len + max(ends) > size:
        raise InputError(f"truncated safetensors file ({size} bytes, needs {8 + header_len + max(ends)})", path)


def _an(word: str) -> str:
    return f"{'an' if word[:1] and word[0] in 'aeiou' else 'a'} {word}"


def load_checkpoint(path: str | Path, stage: Stage | Sequence[Stage] | None = None,
                    option: str | None = None) -> Checkpoint:
    """Load and validate a ds2d2 checkpoint; `stage` is what the calling command expects."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path)
    _check_layout(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw_meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"cannot read safetensors file: {exc}", path) from None
    meta = CheckpointMeta.from_strings(raw_meta, path)
    expected = (stage,) if isinstance(stage, str) else tuple(stage or ())
    if expected and meta.stage not in expected:
        where = f" for {option}" if option else ""
        raise InputError(f"this is {_an(str(meta.stage))} checkpoint; expected {_an(' or '.join(expected))} "
                         f"checkpoint{where}", path)
    return Checkpoint(path, tensors, meta, file_sha256(path))


def lineage(checkpoint: Checkpoint) -> dict[str, Any]:
    """What a student started from `checkpoint` records about it: enough to follow a chain of
    students back to its first one from the last file alone."""
    meta = checkpoint.meta
    return {"path": str(checkpoint.path.resolve()), "sha256": checkpoint.sha256, "method": meta.method,
            "teacher_sha256": meta.teacher_sha256, "preset": meta.preset, "init_student": meta.init_student}


def check_classes(checkpoint: Checkpoint, classes: Sequence[str], data_path: Path) -> None:
    if list(checkpoint.meta.classes) != list(classes):
        raise InputError(
            f"classes of {checkpoint.path.name} ({', '.join(checkpoint.meta.classes)}) do not match the "
            f"dataset's ({', '.join(classes)})", data_path,
        )


def check_bands(checkpoint: Checkpoint, data: SampleSpec, data_path: Path) -> None:
    """Data scored or read by a checkpoint must store the bands its model read in training, the same way."""
    model = checkpoint.meta.input.resolved
    stored = model.sample
    if data.bands != stored.bands or data.dtype != stored.dtype:
        raise InputError(
            f"{checkpoint.path.name} reads {bands_text(model.bands)} of data stored as {stored.describe()}; "
            f"these images are "
            f"{data.describe()}", data_path,
        )
