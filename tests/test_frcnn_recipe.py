"""The Faster R-CNN recipe settings (issue 23): proposals kept in training, RoIAlign's sampling
and alignment, and the implicit streams' RoI draws. Each reaches the torchvision module it
names, the RoIAlign values are checked by hand, `per_stream` draws twice and `shared` once,
and the settings as they were before reproduce the model ds2d2 built before, bit for bit."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, roi_align

from ds2d2_cli.checkpoint import CheckpointMeta
from ds2d2_cli.config import (BEFORE_FRCNN_DRAW, BEFORE_FRCNN_RECIPE, config_differences, config_to_json, load_config,
                              stored_config)
from ds2d2_cli.distill.implicit import faster_rcnn_implicit_loss, sample_rois
from ds2d2_cli.distill.spectral import high_frequency
from ds2d2_cli.models.amplifier import amplifier_head
from ds2d2_cli.models.backbones import build_fpn_backbone
from ds2d2_cli.models.detectors import build_detector
from ds2d2_cli.models.families import family_of
from ds2d2_cli.models.families.faster_rcnn import AlignedMultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

PRESET = "tiny-synthetic-frcnn"
SMALL = ["teacher.backbone=resnet18", "teacher.fpn_channels=16", "student.fpn_channels=16"]
AS_BEFORE = [f"{role}.{key}={json.dumps(value)}" for role in ("teacher", "student")
             for key, value in BEFORE_FRCNN_RECIPE.items()]
NAMES = ["0", "1", "2", "3"]


def _batch(n: int = 2, size: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=gen))
        xy = torch.rand(6, 2, generator=gen) * (size - 40)
        wh = 8 + torch.rand(6, 2, generator=gen) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 4, (6,), generator=gen)})
    return images, targets


# ------------------------------------------------------------------ the settings reach torchvision


def test_paper_presets_and_defaults_are_the_authors_recipe():
    """Authors' configs: rpn_proposal max_per_img 1000, RoIAlign sampling_ratio 0 with mmcv's
    aligned=True, a new RoI draw per implicit stream; the rest is torchvision's default, which is theirs."""
    for preset in ("frcnn-dior", "frcnn-dota", PRESET):
        config = load_config(preset)
        for model in (config.teacher, config.student):
            assert (model.rpn_post_nms_top_n_train, model.roi_sampling_ratio, model.roi_aligned) == (1000, 0, True)
        assert config.distill.implicit_roi_draw == "per_stream"
    config = load_config("frcnn-dior", ["student.pretrained=false"])  # offline: the architecture only
    model = build_detector(config.student, 20, config.input)
    rpn, heads = model.rpn, model.roi_heads
    assert rpn._post_nms_top_n == {"training": 1000, "testing": 1000}  # max_per_img: train, test
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}  # nms_pre (per level): train, test
    assert rpn.nms_thresh == 0.7 and heads.nms_thresh == 0.5 and heads.score_thresh == 0.05
    assert heads.detections_per_img == 100
    assert heads.fg_bg_sampler.batch_size_per_image == 512 and heads.fg_bg_sampler.positive_fraction == 0.25
    assert (heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold) == (0.5, 0.5)
    pool = heads.box_roi_pool
    assert isinstance(pool, AlignedMultiScaleRoIAlign) and pool.aligned is True
    assert (pool.sampling_ratio, pool.output_size, pool.featmap_names) == (0, (7, 7), NAMES)


def test_the_settings_as_before_build_torchvisions_own_pooler():
    config = load_config(PRESET, AS_BEFORE)
    model = build_detector(config.student, 3, config.input)
    pool = model.roi_heads.box_roi_pool
    assert type(pool) is MultiScaleRoIAlign and pool.sampling_ratio == 2
    assert model.rpn._post_nms_top_n["training"] == 2000


def test_proposals_kept_in_training_reach_the_rpn():
    """A random RPN at 128 px keeps far more than 7 proposals after NMS: the cap decides."""
    config = load_config(PRESET, [*SMALL, "student.rpn_post_nms_top_n_train=7"])
    torch.manual_seed(0)
    model = build_detector(config.student, 3, config.input)
    images, targets = _batch()
    model.train()
    batch, targets = model.transform(images, targets)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features, targets)
    assert [p.shape[0] for p in proposals] == [7, 7]
    model.eval()
    with torch.no_grad():
        proposals, _ = model.rpn(batch, features)
    assert all(p.shape[0] > 7 for p in proposals)  # inference keeps its own 1000


# ------------------------------------------------------------------ RoIAlign, by hand


def _ramp(power: int) -> OrderedDict[str, torch.Tensor]:
    """Four levels of a 64 px input (strides 4-32) whose value at column j is j**power."""
    levels = OrderedDict()
    for name, n in zip(NAMES, (16, 8, 4, 2)):
        column = torch.arange(n, dtype=torch.float32) ** power
        levels[name] = column.expand(1, 1, n, n).clone()
    return levels


@pytest.mark.parametrize("box, power, ratio, aligned, expected", [
    # box x 8..16 px = cells 2..4 of level "0" (stride 4), one bin, one sample at its centre
    ([8.0, 8, 16, 16], 1, 1, False, 3.0),  # legacy: the sample sits at cell coordinate 3
    ([8.0, 8, 16, 16], 1, 1, True, 2.5),  # aligned: half a cell left (pixel centres at j + 0.5)
    # box x 8..24 px = cells 2..6 on the values j**2 (linear between cells)
    ([8.0, 8, 24, 24], 2, 2, False, (9 + 25) / 2),  # 2 samples: cells 3, 5
    ([8.0, 8, 24, 24], 2, 0, False, (6.5 + 12.5 + 20.5 + 30.5) / 4),  # adaptive: ceil(4 / 1) = 4 samples, 2.5..5.5
    ([8.0, 8, 24, 24], 2, 0, True, (4 + 9 + 16 + 25) / 4),  # adaptive and aligned: samples at 2, 3, 4, 5
])
def test_roi_align_sampling_and_alignment_by_hand(box, power, ratio, aligned, expected):
    pool = AlignedMultiScaleRoIAlign(NAMES, 1, ratio, aligned=aligned)
    out = pool(_ramp(power), [torch.tensor([box])], [(64, 64)])
    assert out.shape == (1, 1, 1, 1) and out.item() == pytest.approx(expected, abs=1e-5)
    if not aligned:  # torchvision's own pooler agrees
        assert MultiScaleRoIAlign(NAMES, 1, ratio)(_ramp(power), [torch.tensor([box])], [(64, 64)]).item() == out.item()


def test_aligned_pooler_levels_match_torchvision_and_roi_align():
    """Every level in use: aligned=False is torchvision's pooler bit for bit; aligned=True is
    roi_align(aligned=True) on the level the FPN mapping picks (sqrt area < 112 px: P2, < 224: P3,
    < 448: P4, else P5; the authors' mmdet mapping, finest_scale 56, is the same)."""
    torch.manual_seed(0)
    feats = OrderedDict((name, torch.randn(2, 3, 512 // s, 512 // s)) for name, s in zip(NAMES, (4, 8, 16, 32)))
    sizes = torch.tensor([50.0, 150, 300, 480])  # one box per level: P2, P3, P4, P5
    boxes = [torch.cat([torch.full((4, 2), 3.0), 3.0 + sizes[:, None].expand(4, 2)], 1) for _ in range(2)]
    shapes = [(512, 512), (512, 512)]
    for ratio in (0, 2):
        legacy = AlignedMultiScaleRoIAlign(NAMES, 7, ratio, aligned=False)(feats, boxes, shapes)
        assert torch.equal(legacy, MultiScaleRoIAlign(NAMES, 7, ratio)(feats, boxes, shapes))
        aligned = AlignedMultiScaleRoIAlign(NAMES, 7, ratio, aligned=True)(feats, boxes, shapes)
        for image in range(2):
            for level, (name, stride) in enumerate(zip(NAMES, (4, 8, 16, 32))):
                roi = torch.cat([torch.tensor([[float(image)]]), boxes[image][level:level + 1]], 1)
                want = roi_align(feats[name], roi, 7, 1 / stride, ratio, aligned=True)
                assert torch.equal(aligned[image * 4 + level], want[0])
        assert not torch.equal(aligned, legacy)


def test_settings_as_before_are_the_model_ds2d2_built_before():
    """rpn_post_nms_top_n_train=2000, roi_sampling_ratio=2, roi_aligned=false: the FasterRCNN the
    family built before these settings existed (torchvision's defaults), same losses and detections."""
    config = load_config(PRESET, [*SMALL, *AS_BEFORE])
    cfg, input_cfg = config.student, config.input
    torch.manual_seed(0)
    ours = build_detector(cfg, 3, input_cfg)
    torch.manual_seed(0)
    backbone = build_fpn_backbone(cfg, (1, 2, 3, 4), lambda c: LastLevelMaxPool(), input_cfg.resolved.bands)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.rpn_anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    before = FasterRCNN(backbone, 4, rpn_anchor_generator=anchors, box_score_thresh=cfg.score_thresh,
                        box_detections_per_img=cfg.detections_per_img, min_size=128, max_size=128,
                        image_mean=list(input_cfg.resolved.mean), image_std=list(input_cfg.resolved.std))
    state = ours.state_dict()
    assert state.keys() == before.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in before.state_dict().items())
    images, targets = _batch()
    losses = []
    for model in (ours, before):
        model.train()
        torch.manual_seed(5)
        losses.append(model(images, [dict(t) for t in targets]))
    assert losses[0].keys() == losses[1].keys() and all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])
    with torch.no_grad():
        found = [m.eval()(images) for m in (ours, before)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*found) for k in a)


# ------------------------------------------------------------------ RoI draws of the implicit streams


def _implicit_streams(draw: str, seed: int = 11, *overrides: str):
    """Both implicit losses of one step, RoIs drawn after `torch.manual_seed(seed)`; the step's cache."""
    config = load_config(PRESET, [*SMALL, f"distill.implicit_roi_draw={draw}", *overrides])
    torch.manual_seed(0)
    teacher = build_detector(config.teacher, 3, config.input).eval()
    student = build_detector(config.student, 3, config.input).train()
    high_head = amplifier_head(teacher).eval()
    family = family_of(student)
    images, targets = _batch()
    batch, targets = student.transform(images, targets)
    features = student.backbone(batch.tensors)
    with torch.no_grad():
        t_features = teacher.backbone(batch.tensors)
    step = family.detection_step(student, batch, targets, features)

    def hf(levels):
        return OrderedDict((k, high_frequency(v)) for k, v in levels.items())

    torch.manual_seed(seed)
    full = family.implicit_loss(step, teacher, family.head(teacher), features, t_features, config.distill)
    high = family.implicit_loss(step, teacher, high_head, hf(features), hf(t_features), config.distill)
    return full, high, step, teacher, high_head, (features, t_features, hf)


def test_per_stream_draws_anew_for_each_amplifier_and_shared_draws_once():
    full_p, high_p, step_p, teacher, high_head, (features, t_features, hf) = _implicit_streams("per_stream")
    full_s, high_s, step_s, *_ = _implicit_streams("shared")
    per_stream, shared = step_p.cache["rois"], step_s.cache["rois"]
    assert len(per_stream) == 2 and len(shared) == 1
    # the second draw is another sample of the same proposals: other RoIs, same count per image
    assert [r.shape for r in per_stream[0]] == [r.shape for r in per_stream[1]]
    assert not all(torch.equal(a, b) for a, b in zip(*per_stream))
    # the draws are sample_rois' own, in order, from the seed on
    proposals, targets = step_p.cache["proposals"], step_p.targets
    torch.manual_seed(11)
    first = sample_rois(teacher.roi_heads, proposals, targets)
    second = sample_rois(teacher.roi_heads, proposals, targets)
    assert all(torch.equal(a, b) for a, b in zip(first, per_stream[0]))
    assert all(torch.equal(a, b) for a, b in zip(second, per_stream[1]))
    assert all(torch.equal(a, b) for a, b in zip(first, shared[0]))
    # the full-frequency stream reads the first draw either way; only the high stream's RoIs change
    assert all(torch.equal(full_p[k], full_s[k]) for k in full_p)
    assert any(not torch.equal(high_p[k], high_s[k]) for k in high_p)
    sizes = step_p.batch.image_sizes
    for rois, got in ((second, high_p), (first, high_s)):  # each loss is the one of its own RoIs
        want = faster_rcnn_implicit_loss(high_head, hf(features), hf(t_features), proposals, sizes, targets, rois=rois)
        assert all(torch.equal(want[k], got[k]) for k in got)


def test_implicit_rois_draws_fewer_rois_and_keeps_the_summed_kd_at_the_full_draws_scale():
    """distill.implicit_rois (an approximation): at the sampler's own size it is the paper's step
    bit for bit; smaller, each stream compares on that many RoIs per image (plus the ground
    truth), its classification KD scaled by full / thinned, and the RoI head keeps its sampler."""
    full_p, high_p, step_p, teacher, high_head, (features, t_features, hf) = _implicit_streams("per_stream")
    size = teacher.roi_heads.fg_bg_sampler.batch_size_per_image
    same = _implicit_streams("per_stream", 11, f"distill.implicit_rois={size}")
    assert all(torch.equal(a[k], b[k]) for a, b in ((full_p, same[0]), (high_p, same[1])) for k in a)
    full_t, high_t, step_t, teacher_t, high_head_t, _ = _implicit_streams("per_stream", 11, "distill.implicit_rois=16")
    assert teacher_t.roi_heads.fg_bg_sampler.batch_size_per_image == size
    gt = [len(t["boxes"]) for t in step_t.targets]
    for draw in step_t.cache["rois"]:
        assert all(len(r) <= 16 + n for r, n in zip(draw, gt))
        assert sum(len(r) for r in draw) < sum(len(r) for r in step_p.cache["rois"][0])
    proposals, sizes = step_t.cache["proposals"], step_t.batch.image_sizes
    want = faster_rcnn_implicit_loss(high_head_t, hf(features), hf(t_features), proposals, sizes, step_t.targets,
                                     rois=step_t.cache["rois"][1])
    assert torch.allclose(high_t["cls"], want["cls"] * (size / 16)) and torch.equal(high_t["box"], want["box"])


# ------------------------------------------------------------------ runs and checkpoints written before


def test_runs_and_checkpoints_written_before_read_as_they_were_built(tmp_path):
    """A Faster R-CNN config.json or checkpoint without the new keys was built and distilled the old
    way: it must read so (no silent reuse, and its checkpoint rebuilds with its own pooler). Other
    families never read the keys, so for them nothing changes."""
    new = load_config(PRESET)
    old = json.loads(config_to_json(new))
    for role in ("teacher", "student"):
        for key in BEFORE_FRCNN_RECIPE:
            old[role].pop(key)
    old["distill"].pop("implicit_roi_draw")
    read = stored_config(old)
    for model in (read.teacher, read.student):
        assert {k: getattr(model, k) for k in BEFORE_FRCNN_RECIPE} == BEFORE_FRCNN_RECIPE
    assert read.distill.implicit_roi_draw == BEFORE_FRCNN_DRAW["implicit_roi_draw"] == "shared"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    differ = config_differences(path, config_to_json(new))
    assert "student.roi_sampling_ratio 2 -> 0" in differ
    assert 'distill.implicit_roi_draw "shared" -> "per_stream"' in differ

    retina = json.loads(config_to_json(load_config("tiny-synthetic")))
    for role in ("teacher", "student"):
        for key in BEFORE_FRCNN_RECIPE:
            retina[role].pop(key)
    retina["distill"].pop("implicit_roi_draw")
    path.write_text(json.dumps(retina))
    assert config_differences(path, config_to_json(load_config("tiny-synthetic"))) == []

    meta = CheckpointMeta(stage="teacher", model=new.teacher, classes=["a", "b", "c"], input=new.input,
                          preset=PRESET, config=old).to_strings()
    model = json.loads(meta["model"])
    for key in BEFORE_FRCNN_RECIPE:
        model.pop(key)
    meta["model"] = json.dumps(model)
    read_meta = CheckpointMeta.from_strings(meta, tmp_path / "old.safetensors")
    assert {k: getattr(read_meta.model, k) for k in BEFORE_FRCNN_RECIPE} == BEFORE_FRCNN_RECIPE
    pool = build_detector(read_meta.model, 3, new.input).roi_heads.box_roi_pool
    assert type(pool) is MultiScaleRoIAlign and pool.sampling_ratio == 2
