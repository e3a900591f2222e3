"""Typed run configuration: presets are YAML files validated by these pydantic models.

A preset is the single source of truth for a run: dataset, input size, teacher and
student detectors, each stage's schedule and the distillation weights. The CLI loads a
preset by name (the repository's top-level `presets/`, installed as `ds2d2_cli/presets/`) or by path, applies `--set a.b=value`
overrides, and writes the resolved config into every run directory. A preset file may
start from another (`base: retina-dior` or a path) and say only what differs.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ds2d2_cli.classes import AUTO, CLASS_SETS, class_choice, split_class_text
from ds2d2_cli.distill.registry import DS2D2_STREAMS, METHODS, REFERENCE_SETTINGS, TERMS
from ds2d2_cli.errors import Ds2d2Error, InputError
from ds2d2_cli.sample import IMAGENET_MEAN, IMAGENET_STD, SampleSpec

Detector = Literal["retinanet", "faster_rcnn", "retinanet_obb"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d",
                   "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny"]
BACKBONE_LABELS = {"resnext101_32x8d": "X101-32x8d", "resnext101_64x4d": "X101-64x4d", "mobilenet_v3_large": "MNv3-L",
                   "efficientnet_b0": "EffNet-B0", "regnet_y_400mf": "RegNetY-400MF", "convnext_tiny": "ConvNeXt-T"}
Stage = Literal["teacher", "amplifier", "student"]
BandInit = Literal["rgb", "mean"]
# Each stage's own schedule field (`train` is the student's and every stage's fallback).
SCHEDULE_FIELDS: dict[str, str] = {"teacher": "teacher_train", "amplifier": "amplifier_train", "student": "train"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    classes: str | list[str] = Field(
        description="a shipped class set by name (ds2d2_cli.classes.CLASS_SETS), your own list ([car,truck]), or "
        "auto: the training split's categories in id order; a stage records the resolved list in its run")
    root: Path = Field(description="prepared COCO folder (what `prepare-data` writes by default)")
    train_split: str = "train"
    eval_split: str = "val"

    @field_validator("classes", mode="before")
    @classmethod
    def _known_classes(cls, value: Any) -> str | list[str]:
        """`auto`, a set name, or a usable list (`car,truck` as text is a list too)."""
        if isinstance(value, str) and value.strip() in (AUTO, *CLASS_SETS):
            return value.strip()
        if isinstance(value, str) and split_class_text(value) is None:
            raise ValueError(f"unknown class set {value!r}; available: {', '.join(CLASS_SETS)}; or your own list, "
                             f"e.g. [{value.strip()},other]; or {AUTO} (the training split's own classes)")
        if not isinstance(value, (str, list, tuple)):
            raise ValueError(f"expected a class set name, a list of class names or {AUTO} (got {value!r})")
        try:
            return list(class_choice(value, "data.classes").names)
        except InputError as exc:
            raise ValueError(exc.message) from None

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The names a set or list stands for; None for `auto` (the training split decides)."""
        if self.classes == AUTO:
            return None
        return CLASS_SETS[self.classes] if isinstance(self.classes, str) else tuple(self.classes)


class InputConfig(_Strict):
    """What the models read: input size, bands and their normalisation, and (once resolved
    against prepared data by `resolve`) the data's `SampleSpec`, which checkpoints carry."""

    size: int = Field(gt=0, description="long side of the network input in pixels")
    bands: Literal["auto"] | tuple[str, ...] = Field(
        AUTO, description="bands the models read, in order; auto: all of the prepared data's bands")
    mean: Literal["auto"] | tuple[float, ...] = Field(
        AUTO, description="per-band mean of the scaled values; auto: ImageNet's for red/green/blue, "
                          "the training split's for other bands")
    std: Literal["auto"] | tuple[float, ...] = Field(AUTO, description="per-band std; auto as for mean")
    sample: SampleSpec | None = Field(
        None, description="how the data's stored pixels are read (set from the prepared data, not by hand)")

    @field_validator("bands", mode="before")
    @classmethod
    def _bands_text(cls, value: Any) -> Any:
        if isinstance(value, str) and value != AUTO:
            return tuple(split_class_text(value) or [value.strip()])  # `--set input.bands=red,green,blue,nir`
        return value

    @model_validator(mode="after")
    def _lengths(self) -> "InputConfig":
        if self.bands != AUTO:
            if not self.bands or len(set(self.bands)) != len(self.bands):
                raise ValueError("input.bands must name at least one band, each once")
            for name in ("mean", "std"):
                value = getattr(self, name)
                if value != AUTO and len(value) != len(self.bands):
                    raise ValueError(f"input.{name} has {len(value)} values for {len(self.bands)} bands")
        if self.std != AUTO and any(v <= 0 for v in self.std):
            raise ValueError("input.std values must be positive")
        return self

    @property
    def resolved(self) -> "InputConfig":
        """Concrete bands, mean and std: resolved on the data when `sample` is known, else
        as 8-bit RGB (data prepared, and checkpoints written, before bands existed)."""
        return self.resolve(self.sample or SampleSpec())

    def resolve(self, data: SampleSpec, where: str | Path | None = None) -> "InputConfig":
        """This input made concrete on prepared data described by `data`."""
        bands = data.bands if self.bands == AUTO else tuple(self.bands)
        missing = [b for b in bands if b not in data.bands]
        if missing:
            raise InputError(f"input.bands asks for {', '.join(missing)}, which the data does not have "
                             f"(its bands: {', '.join(data.bands)}); use --set input.bands=auto or name "
                             f"some of {', '.join(data.bands)}", where)

        def auto(values: Any, imagenet: dict[str, float], measured: tuple[float, ...] | None,
                 name: str) -> tuple[float, ...]:
            if values != AUTO:
                if len(values) != len(bands):
                    raise InputError(f"input.{name} has {len(values)} values for {len(bands)} bands "
                                     f"({', '.join(bands)})", where)
                return tuple(values)
            out = []
            for band in bands:
                if band in imagenet:
                    out.append(imagenet[band])
                elif measured is not None:
                    out.append(measured[data.bands.index(band)])
                else:
                    raise InputError(f"no statistics for band {band!r} in the prepared data; prepare it "
                                     f"again or set input.{name}", where)
            return tuple(out)

        mean = auto(self.mean, IMAGENET_MEAN, data.mean, "mean")
        std = auto(self.std, IMAGENET_STD, data.std, "std")
        return InputConfig(size=self.size, bands=bands, mean=mean, std=std, sample=data)

    @property
    def channels(self) -> int:
        return len(self.resolved.bands)

    def comparable(self) -> dict[str, Any]:
        """What decides a model's input, for comparing runs and checkpoints (not the statistics
        of the data beyond the mean and std in use)."""
        r = self.resolved
        return {"size": r.size, "bands": list(r.bands), "mean": list(r.mean), "std": list(r.std),
                "reading": json.loads(json.dumps(r.sample.reading()))}


class ModelConfig(_Strict):
    detector: Detector
    backbone: Backbone
    fpn_channels: int = Field(256, gt=0)
    pretrained: bool = Field(False, description="ImageNet backbone weights from torchvision (needs internet once)")
    backbone_weights: Path | None = Field(None, description="local backbone state_dict instead of downloading")
    norm: Literal["auto", "frozen_bn", "bn", "bn_eval"] = Field(
        "auto", description="auto: frozen BN with pretrained weights (torchvision's detectors), trainable BN from "
        "scratch; bn_eval: running statistics frozen, scale and shift trained in the trainable stages (MMDetection's "
        "norm_eval=True with requires_grad=True, the authors' configs)"
    )
    trainable_layers: int = Field(3, ge=0, le=5)
    band_init: BandInit = Field(
        "rgb", description="how pretrained RGB filters of the first convolution read other bands than red, green, "
        "blue (m = mean RGB filter, N bands): rgb: red, green, blue keep their filters, every other band gets "
        "m x 3/N and each RGB filter gives up a third of those, so extra bands equal to the RGB mean give the RGB "
        "model's output (mean without all three of red, green, blue); mean: every band m x 3/N (timm's). Three "
        "bands keep the RGB filters (reordered if they are red, green, blue in another order); from scratch unused")
    head_norm: Literal["none", "group"] = Field(
        "none", description="GroupNorm in the RetinaNet head convs (torchvision's v2 head): much faster from scratch"
    )
    anchor_base: float = Field(4.0, gt=0, description="RetinaNet anchor size = anchor_base x stride (octave base)")
    rpn_anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_post_nms_top_n_train: int = Field(
        1000, gt=0, description="Faster R-CNN: proposals per image the RPN hands the RoI head in training, the "
        "best after NMS (the authors' rpn_proposal max_per_img; torchvision's default is 2000); inference keeps 1000")
    roi_sampling_ratio: int = Field(
        0, ge=0, description="Faster R-CNN RoIAlign: sampling points per bin side; 0 adapts to the RoI, "
        "ceil(RoI side in feature cells / 7) (the authors, mmcv's RoIAlign); torchvision's default is a fixed 2")
    roi_aligned: bool = Field(
        True, description="Faster R-CNN RoIAlign: half-pixel-corrected coordinates, no clamp of small RoIs to one cell "
        "(the authors, mmcv's default); false: the legacy sampling torchvision's own pooler uses")
    score_thresh: float = Field(0.05, ge=0, le=1)
    detections_per_img: int = Field(100, gt=0)

    @property
    def label(self) -> str:
        """Short name for tables: `R34-FPN64`."""
        name = BACKBONE_LABELS.get(self.backbone, self.backbone.replace("resnet", "R"))
        return f"{name}-FPN{self.fpn_channels}"


class TrainConfig(_Strict):
    epochs: int | None = Field(24, gt=0)
    max_iters: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0)
    lr: float = Field(0.005, gt=0, description="learning rate at lr_base_batch images per step")
    lr_base_batch: int = Field(16, gt=0, description="linear scaling: lr x batch / lr_base_batch (the authors' "
                               "rates are written for 16 images per step)")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    lr_steps: tuple[float, ...] = Field((2 / 3, 11 / 12), description="decay points as fractions of the run")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm (the authors clip none; "
                                    "non-finite gradients are caught either way)")
    seed: int = 0
    log_every: int = Field(20, gt=0)
    tensorboard: bool = Field(False, description="also write every logged number (loss terms, lr, images_per_s, "
                              "evaluations) to OUT/tensorboard/ (needs: pip install 'ds2d2[tensorboard]')")
    checkpoint_every: int = Field(500, gt=0)
    eval_every: int | None = Field(None, gt=0, description="iterations between evaluations (None: only at the end)")
    num_workers: int = Field(2, ge=0, description="loader processes (started once per run)")
    cache_images: bool = Field(False, description="keep decoded images in memory (small datasets)")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU); our one departure from the "
                      "authors' fp32 recipe, for speed: false trains in fp32")
    sync_bn: bool = Field(False, description="multi-GPU (torchrun): SyncBatchNorm across processes")
    channels_last: bool = Field(False, description="NHWC memory format for the trained module (faster convs "
                                "with tensor cores under AMP)")
    compile: bool = Field(False, description="torch.compile the ResNet bodies (static shapes; the first step "
                          "pays the compilation)")
    find_unused_parameters: bool = Field(
        False, description="multi-process: let DDP tolerate parameters a step does not use")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss term or gradient: stop the run, or skip that step and count it")
    augment: tuple[Literal["hflip", "vflip", "rot90"], ...] = Field(
        ("hflip",), description="training augmentations (the authors: horizontal flip only)")

    @field_validator("lr_steps")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < v < 1 for v in value) or list(value) != sorted(value):
            raise ValueError("lr_steps must be increasing fractions between 0 and 1")
        return value

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.epochs is None and self.max_iters is None:
            raise ValueError("set epochs or max_iters")
        return self


class LossWeights(_Strict):
    explicit_low: float = Field(1e-5, ge=0)
    explicit_high: float = Field(1e-5, ge=0)
    implicit_full: float = Field(1.0, ge=0)
    implicit_high: float = Field(1.0, ge=0)
    fitnet: float = Field(1e-5, ge=0, description="weight of the FitNet baseline's feature MSE")
    # The other baselines' weights: None takes the method's reference config for the
    # detector family (distill.registry.REFERENCE_SETTINGS, cited there and in the presets).
    cwd: float | None = Field(None, ge=0, description="CWD loss weight (reference: 10)")
    pkd: float | None = Field(None, ge=0, description="PKD loss weight (reference: RetinaNet 10, Faster R-CNN 6)")
    mgd: float | None = Field(None, ge=0, description="MGD alpha_mgd")
    fgd_fg: float | None = Field(None, ge=0, description="FGD alpha_fgd (foreground)")
    fgd_bg: float | None = Field(None, ge=0, description="FGD beta_fgd (background)")
    fgd_attention: float | None = Field(None, ge=0, description="FGD gamma_fgd (attention maps)")
    fgd_global: float | None = Field(None, ge=0, description="FGD lambda_fgd (global context)")
    dist: float | None = Field(None, ge=0, description="DIST loss weight (reference: 1)")


_LEVELS = Field(None, ge=1, description="distil the N finest FPN levels (None: the reference config's)")


class CWDConfig(_Strict):
    tau: float | None = Field(None, gt=0, description="softmax temperature")
    levels: int | None = _LEVELS


class PKDConfig(_Strict):
    levels: int | None = _LEVELS


class MGDConfig(_Strict):
    mask_ratio: float | None = Field(None, ge=0, lt=1, description="lambda_mgd: share of locations masked")
    levels: int | None = _LEVELS


class FGDConfig(_Strict):
    temperature: float | None = Field(None, gt=0, description="attention temperature")
    levels: int | None = _LEVELS


class DISTConfig(_Strict):
    beta: float | None = Field(None, ge=0, description="weight of the inter-class relation (per sample, across classes)")
    gamma: float | None = Field(None, ge=0, description="weight of the intra-class relation (per class, across samples)")
    tau: float | None = Field(None, gt=0, description="temperature of the class scores; the loss is scaled by tau^2")


class DistillConfig(_Strict):
    method: str = Field("ds2d2", description="a method of ds2d2_cli.distill.registry (ds2d2, none, fitnet, cwd, "
                        "pkd, mgd, fgd, dist, ds2d2-dist)")
    streams: tuple[str, ...] = Field(DS2D2_STREAMS, description="ablation: the terms of an ablatable method "
                                     "(ds2d2's streams) that run")
    weights: LossWeights = LossWeights()
    disw: bool = True
    wavelet: str = "haar"
    implicit_input: Literal["raw", "adapted"] = Field(
        "raw", description="student side of the implicit streams: its raw FPN features (the authors; the adapter "
        "serves the explicit stream only) or the adapter's output (ablation); a student FPN of another width than "
        "the teacher's always uses the adapter's output")
    box_kd_anchors: Literal["all", "not_ignored"] = Field(
        "all", description="RetinaNet box KD over all anchors (the authors) or only those the classification KD keeps")
    kd_normalizer: Literal["per_image", "batch"] = Field(
        "per_image", description="RetinaNet KD divisor: sum over images of max(1, positives) (the authors) or "
        "max(1, positives in the batch)")
    roi_kd_reduction: Literal["sum", "mean"] = Field(
        "sum", description="Faster R-CNN classification KD over sampled RoIs: summed (the authors' code, whose "
        "weights assume it) or averaged (the paper's formula)")
    implicit_roi_draw: Literal["per_stream", "shared"] = Field(
        "per_stream", description="Faster R-CNN implicit streams: each amplifier samples its own RoIs from the "
        "student's proposals (the authors run assign and sample again per stream) or both compare on one draw")
    implicit_every: int = Field(
        1, ge=1, description="approximation, off at 1 (the paper): the implicit streams run on every k-th step "
        "only (iterations 1, 1+k, ...), weighted k times there so that their average weight is the paper's; the "
        "steps between skip the two head passes")
    implicit_rois: int | None = Field(
        None, ge=1, description="approximation, off at None (the paper): Faster R-CNN implicit streams compare on "
        "this many RoIs per image instead of the RoI head's own draw (512), at the same positive fraction; with "
        "roi_kd_reduction sum the classification KD is scaled back to the full draw's size")
    amplifier_rpn: Literal["high_frequency", "frozen"] = Field(
        "high_frequency", description="Faster R-CNN amplifier: its RPN is trained on high-frequency features too "
        "(the authors) or the teacher's RPN stays frozen on full features")
    qfl_beta: float = Field(1.0, ge=0, description="RetinaNet classification KD focusing exponent")
    kd_temperature: float = Field(3.0, gt=0, description="Faster R-CNN classification KD temperature")
    kd_cls_weight: float = Field(0.5, ge=0, description="Faster R-CNN classification KD weight")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="precision of the frozen teacher backbone during distillation (half: less memory)")
    init_student_from_teacher: bool = Field(
        False, description="start the student's neck (FPN) and heads from the teacher: every teacher tensor "
        "outside the backbone body whose name and shape match the student's is copied before training (FGD's and "
        "MGD's init_student=True); needs a teacher, and not with --init-student")
    cwd: CWDConfig = CWDConfig()
    pkd: PKDConfig = PKDConfig()
    mgd: MGDConfig = MGDConfig()
    fgd: FGDConfig = FGDConfig()
    dist: DISTConfig = DISTConfig()

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; available: {', '.join(METHODS)}")
        return value

    @field_validator("streams")
    @classmethod
    def _known_streams(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = [t for m in METHODS.values() if m.ablatable for t in m.terms]
        unknown = [v for v in value if v not in allowed or v not in TERMS]
        if unknown:
            raise ValueError(f"unknown stream(s) {', '.join(map(repr, unknown))}; available: {', '.join(allowed)}")
        return value

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        import pywt

        if value not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"unknown discrete wavelet {value!r} (see pywt.wavelist(kind='discrete'))")
        return value


class RunConfig(_Strict):
    name: str
    description: str = ""
    data: DataConfig
    input: InputConfig
    teacher: ModelConfig
    student: ModelConfig
    train: TrainConfig = Field(description="student schedule (distill and the undistilled baseline)")
    teacher_train: TrainConfig | None = Field(None, description="teacher schedule; defaults to train")
    amplifier_train: TrainConfig | None = Field(None, description="amplifier schedule; defaults to train")
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _same_family(self) -> "RunConfig":
        if self.teacher.detector != self.student.detector:
            raise ValueError(
                f"teacher ({self.teacher.detector}) and student ({self.student.detector}) must be the same detector family"
            )
        return self

    @model_validator(mode="after")
    def _reference_settings(self) -> "RunConfig":
        """Unset baseline settings take their method's reference values for this detector family."""
        reference = REFERENCE_SETTINGS[self.student.detector]
        for section, values in reference.items():
            target = self.distill.weights if section == "weights" else getattr(self.distill, section)
            for key, value in values.items():
                if getattr(target, key) is None:
                    setattr(target, key, value)
        return self

    def with_classes(self, names: list[str] | tuple[str, ...]) -> "RunConfig":
        """This config with `data.classes` the explicit list a stage resolved (what its run records)."""
        return self.model_copy(update={"data": self.data.model_copy(update={"classes": list(names)})})

    def schedule_key(self, stage: Stage) -> str:
        """The config key holding `stage`'s schedule: its own when the preset sets one, else `train`."""
        key = SCHEDULE_FIELDS[stage]
        return key if getattr(self, key) is not None else "train"

    def schedule(self, stage: Stage) -> TrainConfig:
        return getattr(self, self.schedule_key(stage))

    def stage_inputs(self, stage: Stage) -> dict[str, Any]:
        """The settings that decide what `stage` trains (JSON), so a finished stage can be reused
        when only another stage's settings changed. Checkpoints handed over from earlier stages
        are their own stages' business; the data folder's path is not a setting (its class set is)."""
        inputs: dict[str, Any] = {"data": {"classes": comparable_classes(self.data)},
                                  "input": self.input.comparable(),
                                  "teacher": self.teacher.model_dump(mode="json"),
                                  self.schedule_key(stage): self.schedule(stage).model_dump(mode="json")}
        if stage == "amplifier":
            inputs["distill"] = {"wavelet": self.distill.wavelet}
            if self.teacher.detector == "faster_rcnn":  # the only family with an RPN to train or freeze
                inputs["distill"]["amplifier_rpn"] = self.distill.amplifier_rpn
        if stage == "student":
            inputs["student"] = self.student.model_dump(mode="json")
            # how the amplifier was trained is the amplifier stage's business
            inputs["distill"] = self.distill.model_dump(mode="json", exclude={"amplifier_rpn"})
        return inputs


def comparable_classes(data: DataConfig) -> str | list[str]:
    """`data.classes` as runs are compared: a set by its names, so a run that recorded the
    resolved list matches the set it was started with (`auto` stays: resolve it first)."""
    names = data.class_names
    return AUTO if names is None else list(names)


# ----------------------------------------------------------------------------- loading


def presets_folder() -> Path:
    """The shipped presets: `ds2d2_cli/presets/` in an installed wheel, the repository's
    top-level `presets/` in a source checkout (editable installs included)."""
    package = Path(str(resources.files("ds2d2_cli")))
    for folder in (package / "presets", package.parent / "presets"):
        if (folder / "tiny-synthetic.yaml").is_file():
            return folder
    raise Ds2d2Error(f"the shipped presets are missing (looked in {package / 'presets'} and {package.parent / 'presets'})")


def available_presets() -> list[str]:
    folder = presets_folder()
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_file(preset: str, inherited_by: Path | None = None) -> tuple[Path, str]:
    """(file, how messages name it) for a preset name or path; in a `base:` of file
    `inherited_by`, a relative path starts in that file's folder."""
    path = Path(preset)
    if inherited_by is not None and not path.is_absolute():
        path = Path(os.path.normpath(inherited_by.parent / path))
    if preset.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise InputError("preset file not found", path)
        return path, str(path)
    resource = presets_folder() / f"{preset}.yaml"
    if not resource.is_file():
        raise InputError(f"{'base: ' if inherited_by else ''}unknown preset {preset!r}; available: "
                         f"{', '.join(available_presets())} (or a path to a .yaml file)", inherited_by)
    return resource, preset


def _read_preset(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read preset: {exc}", path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise InputError(f"not valid YAML: {getattr(exc, 'problem', exc)}", source, line) from None
    if not isinstance(raw, dict):
        raise InputError("a preset must be a YAML mapping", source)
    return raw


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        merged[key] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def _preset_mapping(preset: str, inherited_by: Path | None = None,
                    chain: tuple[tuple[Path, str], ...] = ()) -> tuple[dict[str, Any], str]:
    """(raw mapping, source) of a preset with its `base:` chain merged in, base first."""
    path, source = _preset_file(preset, inherited_by)
    seen = [p for p, _ in chain]
    if path.resolve() in seen:
        loop = [s for _, s in chain[seen.index(path.resolve()):]] + [source]
        raise InputError(f"preset bases form a cycle: {' -> '.join(loop)}")
    raw = _read_preset(path, source)
    if "base" not in raw:
        return raw, source
    base = raw.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise InputError(f"base: expected a preset name or a path to a .yaml file (got {base!r})", source)
    inherited, base_source = _preset_mapping(base.strip(), path, (*chain, (path.resolve(), source)))
    raw.setdefault("name", path.stem)  # not the base's name: this file is another preset
    if "description" not in raw and inherited.get("description"):
        raw["description"] = f"based on {base_source}: {inherited['description']}"
    return deep_merge(inherited, raw), source


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise InputError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw config dict; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {item}: {'.'.join(keys[: depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def check_overrides_read(config: RunConfig, stage: Stage, overrides: list[str], *, command: str,
                         preset: str) -> None:
    """Refuse a `--set` of a schedule setting `stage` does not read, which would otherwise be
    dropped without a word (a preset's own teacher_train leaves train.* unread by the teacher).
    Whole-section assignments (`teacher_train=null`) choose the schedule and stay allowed."""
    read = config.schedule_key(stage)
    for item in overrides:
        keys, _ = _parse_override(item)
        if len(keys) < 2 or keys[0] not in SCHEDULE_FIELDS.values() or keys[0] == read:
            continue
        if read != "train":
            why = f"preset {preset} trains the {stage} with its own {read} section"
        elif stage == "student":
            why = "the student trains with the train section"
        else:
            why = f"the {stage} trains with the train section (no {SCHEDULE_FIELDS[stage]} section is set)"
        raw_value = item.split("=", 1)[1].strip()
        raise InputError(f"--set {item} is not read by {command}: {why}; "
                         f"use --set {read}.{'.'.join(keys[1:])}={raw_value}")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line (errors are one line): `SOURCE: invalid config: a.b: problem; c: problem`."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        problems.append(f"{loc}: {' '.join(str(err['msg']).split())}")
    return f"{source}: invalid config: {'; '.join(problems)}"


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, source)) from None


UNREADABLE_CONFIG = "(config.json unreadable)"

# Settings added by the fidelity pass, with the values that reproduce what a run written
# before them (a config.json without the key) did. A stored config is read with these, not
# the new defaults, so such a run is never reused or resumed as if it had trained the
# authors' way. amplifier_rpn changed Faster R-CNN amplifiers only.
BEFORE_FIDELITY = {"implicit_input": "adapted", "box_kd_anchors": "not_ignored", "kd_normalizer": "batch",
                   "roi_kd_reduction": "mean"}
# The Faster R-CNN recipe settings that followed (proposals kept in training, RoIAlign sampling,
# RoI draws), with what a Faster R-CNN built or distilled before them did: torchvision's
# defaults, and one RoI draw shared by both implicit streams. Other families never read them.
BEFORE_FRCNN_RECIPE = {"rpn_post_nms_top_n_train": 2000, "roi_sampling_ratio": 2, "roi_aligned": False}
BEFORE_FRCNN_DRAW = {"implicit_roi_draw": "shared"}


def stored_model(raw: Any) -> Any:
    """A recorded model section (a run's teacher/student, a checkpoint's `model`), the Faster
    R-CNN settings it predates filled as that model was built."""
    if isinstance(raw, dict) and raw.get("detector") == "faster_rcnn":
        return {**BEFORE_FRCNN_RECIPE, **raw}
    return raw


def stored_config(raw: dict[str, Any], source: str = "config.json") -> RunConfig:
    """A run folder's config.json as a config, settings it predates filled as that run behaved."""
    if isinstance(raw, dict):
        raw = {**raw, **{role: stored_model(raw[role]) for role in ("teacher", "student") if role in raw}}
    if isinstance(raw, dict) and isinstance(raw.get("distill"), dict):
        legacy = dict(BEFORE_FIDELITY)
        if (raw.get("teacher") or {}).get("detector") == "faster_rcnn":
            legacy.update(amplifier_rpn="frozen", **BEFORE_FRCNN_DRAW)
        raw = {**raw, "distill": {**{k: v for k, v in legacy.items() if k not in raw["distill"]}, **raw["distill"]}}
    return config_from_dict(raw, source)


def config_differences(stored_path: Path, config_json: str) -> list[str]:
    """`key old -> new` for each setting in which the run's config.json and `config_json` differ,
    compared as validated configs, so a run started before a new option existed still matches
    when it behaved as the option's value says (`stored_config`)."""
    try:
        stored = _comparable_dump(stored_config(json.loads(stored_path.read_text())))
    except (OSError, ValueError, InputError):
        return [UNREADABLE_CONFIG]
    return value_differences(stored, _comparable_dump(config_from_dict(json.loads(config_json))))


def _comparable_dump(config: RunConfig) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    dumped["data"]["classes"] = comparable_classes(config.data)
    return dumped


def value_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key old -> new` for every differing leaf of two JSON objects, in the objects' order."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in dict.fromkeys([*old, *new]):
            found += value_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix[:-1]} {_short_json(old)} -> {_short_json(new)}"]


def _short_json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_config(preset: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset (name or path; `base:` inherits another), apply `--set` overrides and validate."""
    raw, source = _preset_mapping(preset)
    return config_from_dict(apply_overrides(raw, overrides or []), source)


def config_to_json(config: RunConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2)
