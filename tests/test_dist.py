"""DIST (Huang et al. 2022): hand-computed relations, which axis each relation reads, the
detector wiring (the student's own head outputs against the teacher's on the same anchors
or RoIs), the config and a CLI run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import ds2d2_cli
from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config
from ds2d2_cli.distill.dist import dist_loss, dist_relation_loss, dist_relations, dist_scores_loss
from ds2d2_cli.distill.registry import METHODS, REFERENCE_SETTINGS
from ds2d2_cli.errors import Ds2d2Error

from conftest import TINY
from test_distill_stages import tiny_batch

runner = CliRunner()

# Two samples, three classes; every row sums to 1, so each row's mean is 1/3.
P = torch.tensor([[1 / 6, 1 / 3, 1 / 2], [1 / 2, 1 / 3, 1 / 6]], dtype=torch.float64)  # student
Q = torch.tensor([[1 / 2, 1 / 3, 1 / 6], [1 / 2, 1 / 6, 1 / 3]], dtype=torch.float64)  # teacher
# inter, per row across the classes (centred rows):
#   row 1: P (-1/6, 0, 1/6), Q (1/6, 0, -1/6): rho = -1
#   row 2: P (1/6, 0, -1/6), Q (1/6, -1/6, 0): rho = (1/36) / (sqrt(2)/6 * sqrt(2)/6) = 1/2
#   inter = 1 - (-1 + 1/2) / 2 = 5/4
# intra, per class across the two samples (a 2-vector correlates +-1, or 0 when constant):
#   class 0: P rises, Q constant -> 0;  class 1: P constant -> 0;  class 2: P falls, Q rises -> -1
#   intra = 1 - (0 + 0 - 1) / 3 = 4/3
INTER, INTRA = 5 / 4, 4 / 3


def test_hand_values_of_both_relations_and_the_loss():
    inter, intra = dist_relations(P, Q)
    assert inter.item() == pytest.approx(INTER, rel=1e-6)
    assert intra.item() == pytest.approx(INTRA, rel=1e-6)
    assert dist_relation_loss(P, Q).item() == pytest.approx(INTER + INTRA, rel=1e-6)
    assert dist_relation_loss(P, Q, beta=2.0, gamma=0.5).item() == pytest.approx(2 * INTER + INTRA / 2, rel=1e-6)
    # the logits form: softmax(log p) = p for rows summing to 1
    assert dist_loss(P.log(), Q.log()).item() == pytest.approx(INTER + INTRA, rel=1e-6)
    assert ds2d2_cli.dist_loss(P.log(), Q.log(), beta=0.0, gamma=1.0).item() == pytest.approx(INTRA, rel=1e-6)
    assert ds2d2_cli.dist_relation_loss is dist_relation_loss
    # the same relations: nothing to learn
    same = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], dtype=torch.float64)
    assert dist_relation_loss(same, same).item() == pytest.approx(0.0, abs=1e-5)  # eps 1e-8 / |centred|^2
    # ... except that a class constant over the batch correlates 0 even with itself (the
    # authors' eps-guarded cosine): Q's class 0 adds 1/3 to intra
    assert dist_relations(Q, Q)[1].item() == pytest.approx(1 / 3, rel=1e-5)


def test_a_positive_affine_change_of_the_probabilities_changes_nothing():
    for a, b in ((3.0, 0.0), (0.5, 0.2), (7.0, -1.0)):
        assert dist_relation_loss(a * P + b, Q).item() == pytest.approx(INTER + INTRA, rel=1e-6)
        assert dist_relation_loss(P, a * Q + b).item() == pytest.approx(INTER + INTRA, rel=1e-6)
    # a negative scale flips every correlation: rho -> -rho
    inter, intra = dist_relations(-P, Q)
    assert inter.item() == pytest.approx(1 - (1 - 1 / 2) / 2, rel=1e-6)
    assert intra.item() == pytest.approx(1 - 1 / 3, rel=1e-6)


def test_inter_reads_each_sample_across_classes_and_intra_each_class_across_samples():
    torch.manual_seed(0)
    teacher = torch.randn(6, 5, dtype=torch.float64).softmax(dim=1)
    # each sample's scores an affine copy of the teacher's (its own scale and shift):
    # every per-sample correlation is 1, the per-class ones are not
    rows = torch.tensor([1.0, 0.2, 3.0, 0.7, 1.5, 0.1], dtype=torch.float64)[:, None]
    per_sample = rows * teacher + (1 - rows) / 5  # still sums to 1 per row
    inter, intra = dist_relations(per_sample, teacher)
    assert inter.item() == pytest.approx(0.0, abs=1e-5) and intra.item() > 0.05
    # each class an affine copy across the batch: intra 0, inter not
    cols = torch.tensor([0.3, 2.0, 1.0, 5.0, 0.6], dtype=torch.float64)
    per_class = cols * teacher + torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05], dtype=torch.float64)
    inter, intra = dist_relations(per_class, teacher)
    assert intra.item() == pytest.approx(0.0, abs=1e-5) and inter.item() > 0.05


def test_temperature_softens_the_scores_and_scales_the_loss_by_its_square():
    torch.manual_seed(1)
    s, t = torch.randn(8, 6, dtype=torch.float64), 3 * torch.randn(8, 6, dtype=torch.float64)
    for tau in (2.0, 4.0):
        expected = tau ** 2 * dist_relation_loss((s / tau).softmax(1), (t / tau).softmax(1))
        assert dist_loss(s, t, tau=tau).item() == pytest.approx(expected.item(), rel=1e-9)
        assert dist_loss(s, t, tau=tau).item() == pytest.approx(tau ** 2 * dist_loss(s / tau, t / tau).item(), rel=1e-9)
    with pytest.raises(ValueError, match="positive"):
        dist_loss(s, t, tau=0.0)


def test_scores_form_sums_matrices_with_the_head_activation():
    torch.manual_seed(2)
    s = [torch.randn(7, 4), torch.randn(3, 4)]
    t = [torch.randn(7, 4), torch.randn(3, 4)]
    softmax = dist_scores_loss(s[:1], t[:1], activation="softmax", tau=2.0)
    assert softmax.item() == pytest.approx(dist_loss(s[0], t[0], tau=2.0).item(), rel=1e-6)
    sigmoid = dist_scores_loss(s, t, activation="sigmoid")
    by_hand = sum(dist_relation_loss(a.sigmoid(), b.sigmoid()) for a, b in zip(s, t))
    assert sigmoid.item() == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(Ds2d2Error, match="one shape"):
        dist_scores_loss([torch.randn(7, 4)], [torch.randn(7, 5)], activation="sigmoid")
    with pytest.raises(Ds2d2Error, match="number"):
        dist_scores_loss(s, t[:1], activation="sigmoid")


def test_gradients_reach_the_student_never_the_teacher_and_degenerate_rows_stay_finite():
    torch.manual_seed(3)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    loss = dist_loss(s, t, tau=2.0)
    loss.backward()
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0 and t.grad is None
    # one sample (intra has nothing to correlate) and equal logits (a constant row): no NaN
    one = torch.zeros(1, 3, requires_grad=True)
    loss = dist_loss(one, torch.tensor([[1.0, 2.0, 3.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and torch.isfinite(one.grad).all()


# ----------------------------------------------------------------------------- detectors


def _task(preset: str, *overrides: str):
    """A DistillTask with method dist on tiny models, and one batch."""
    from ds2d2_cli.models.detectors import build_detector
    from ds2d2_cli.stages.distill import DistillTask

    config = load_config(preset, [*TINY, "distill.method=dist", *overrides])
    torch.manual_seed(0)
    student = build_detector(config.student, 5, config.input)
    teacher = build_detector(config.teacher, 5, config.input)
    images, targets = tiny_batch()
    return config, student, teacher, images, targets, DistillTask


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-frcnn"])
def test_the_dist_term_trains_the_students_class_scores_and_leaves_the_teacher_alone(preset):
    config, student, teacher, images, targets, DistillTask = _task(preset)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = DistillTask(student, teacher, config)
    task.train_mode()
    assert [t.name for t in task.terms] == ["dist"] and task.module.adapter is None  # no feature bridge
    terms = task.losses(images, targets)
    assert torch.isfinite(terms["dist"]) and terms["dist"] > 0
    weight = config.distill.weights.dist
    assert weight == REFERENCE_SETTINGS[config.student.detector]["weights"]["dist"]
    classifier = (student.head.classification_head.cls_logits if preset == "tiny-synthetic"
                  else student.roi_heads.box_predictor.cls_score)
    grads = torch.autograd.grad(terms["dist"], list(classifier.parameters()), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-frcnn", "tiny-synthetic-obb"])
def test_a_teacher_equal_to_the_student_gives_the_same_scores_row_for_row(preset):
    """With the student's weights the teacher reads the same anchors / RoIs: its matrices equal
    the student's, row for row, and the relations correlate perfectly; a shuffled pairing does not."""
    from ds2d2_cli.models.families import family_of

    same = ("student.fpn_channels=32", "student.norm=frozen_bn", "teacher.norm=frozen_bn")
    config, student, teacher, images, targets, _ = _task(preset, *same)
    family = family_of(student)
    if family.oriented:  # the horizontal boxes as rotated boxes
        for target in targets:
            boxes = target["boxes"]
            target["rboxes"] = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2],
                                          torch.zeros(len(boxes), 1)], 1)
    if not preset.endswith("frcnn"):  # class scores that vary well above the authors' eps
        with torch.no_grad():
            student.head.classification_head.cls_logits.weight.normal_(0.0, 1.0)
    teacher.load_state_dict(student.state_dict())
    student.train()
    batch, targets = student.transform(images, targets)
    step = family.detection_step(student, batch, targets, student.backbone(batch.tensors))
    with torch.no_grad():
        scores = family.prediction_pair(step, teacher.eval(), teacher.backbone(batch.tensors))
    assert len(scores.student) == (1 if preset.endswith("frcnn") else 5)
    for s, t in zip(scores.student, scores.teacher):
        assert torch.allclose(s, t, atol=1e-5)
    # the finest levels (P7 of a 128 px input is one row per image, too few to correlate)
    student_scores, teacher_scores = scores.student[:3], scores.teacher[:3]
    aligned = dist_scores_loss(student_scores, teacher_scores, activation=scores.activation)
    assert aligned.item() == pytest.approx(0.0, abs=1e-4)
    shuffled = dist_scores_loss(student_scores, [t.flip(0) for t in teacher_scores], activation=scores.activation)
    assert shuffled.item() > 0.1


def test_retinanet_matrices_are_maskds_per_level_location_rows():
    """MasKD hooks `retina_cls` (one `[N, A*K, H, W]` output per level) and reshapes it to
    `[N*H*W, A*K]` (rows in another order, which no relation sees); slot 0 (no class) is ours only."""
    from ds2d2_cli.models.families import family_of
    from ds2d2_cli.models.families.retinanet import dense_class_scores

    config, student, teacher, images, targets, _ = _task("tiny-synthetic")
    student.train()
    teacher.eval()
    batch, targets = student.transform(images, targets)
    features = student.backbone(batch.tensors)
    step = family_of(student).detection_step(student, batch, targets, features)
    with torch.no_grad():
        teacher_features = teacher.backbone(batch.tensors)
    scores = dense_class_scores(step, teacher.head.classification_head, teacher_features)
    assert len(scores.student) == len(features) == 5 and scores.activation == "sigmoid"

    def maskd(head, levels):
        out = []
        for level in levels.values():
            raw = head.cls_logits(head.conv(level))  # [N, A*K, H, W]
            n, _, h, w = raw.shape
            raw = raw.view(n, 9, -1, h, w)[:, :, 1:].reshape(n, -1, h, w)  # drop slot 0 of each anchor
            out.append(raw.transpose(1, 3).reshape(-1, raw.shape[1]))
        return out

    with torch.no_grad():
        s_ref = maskd(student.head.classification_head, features)
        t_ref = maskd(teacher.head.classification_head, teacher_features)
    for ours, theirs in zip(scores.student, s_ref):
        assert ours.shape == theirs.shape  # [N*H*W, 9 anchors x 5 classes]
    ours = dist_scores_loss(scores.student, scores.teacher, activation="sigmoid")
    reference = sum(dist_relation_loss(s.sigmoid(), t.sigmoid()) for s, t in zip(s_ref, t_ref))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_faster_rcnn_step_spelled_out_is_the_roi_heads_forward():
    """The detection step runs RoIHeads' training forward call by call (to keep its RoIs and
    logits for DIST): the same RoI draw and the same losses as calling the module."""
    from ds2d2_cli.models.families import family_of

    _, student, teacher, images, targets, _ = _task("tiny-synthetic-frcnn")
    student.train()
    batch, targets = student.transform(images, targets)
    features = student.backbone(batch.tensors)
    torch.manual_seed(5)
    proposals, rpn_losses = student.rpn(batch, features, targets)
    _, roi_losses = student.roi_heads(features, proposals, batch.image_sizes, targets)
    torch.manual_seed(5)
    step = family_of(student).detection_step(student, batch, targets, features)
    assert list(step.terms) == [*rpn_losses, *roi_losses]
    for name, value in {**rpn_losses, **roi_losses}.items():
        assert torch.equal(step.terms[name], value), name
    rois, logits = step.cache["sampled_rois"], step.cache["roi_logits"]
    assert sum(len(r) for r in rois) == logits.shape[0] and logits.shape[1] == 6  # 5 classes + background
    scores = family_of(student).prediction_pair(step, teacher.eval(), teacher.backbone(batch.tensors))
    assert scores.activation == "softmax" and scores.teacher[0].shape == logits.shape
    assert not scores.teacher[0].requires_grad


# ----------------------------------------------------------------------------- config, CLI


def test_config_fills_the_reference_and_refuses_a_bad_temperature():
    for preset, family in (("tiny-synthetic", "retinanet"), ("tiny-synthetic-frcnn", "faster_rcnn"),
                           ("tiny-synthetic-obb", "retinanet_obb")):
        config = load_config(preset)
        assert config.distill.dist.model_dump() == REFERENCE_SETTINGS[family]["dist"] == \
            {"beta": 1.0, "gamma": 1.0, "tau": 1.0}
        assert config.distill.weights.dist == 1.0
    config = load_config("tiny-synthetic", ["distill.dist.tau=4", "distill.weights.dist=2"])
    assert config.distill.dist.tau == 4 and config.distill.dist.beta == 1.0 and config.distill.weights.dist == 2
    from ds2d2_cli.errors import InputError

    with pytest.raises(InputError, match="distill.dist.tau"):
        load_config("tiny-synthetic", ["distill.dist.tau=0"])
    from ds2d2_cli.study import method_settings, study_methods

    assert "dist" in METHODS and "dist" in study_methods() and method_settings("dist") == {"method": "dist"}


@pytest.mark.parametrize("preset", ["tiny-synthetic", "tiny-synthetic-frcnn"])
def test_ds2d2_dist_is_ds2d2s_streams_plus_the_dist_term_each_unchanged(preset):
    import copy

    config, student, teacher, images, targets, DistillTask = _task(preset)

    def losses(method: str) -> dict[str, torch.Tensor]:
        settings = config.model_copy(update={"distill": config.distill.model_copy(update={"method": method})})
        torch.manual_seed(1)  # the adapter's initialisation
        task = DistillTask(copy.deepcopy(student), teacher, settings)
        task.train_mode()
        torch.manual_seed(2)  # Faster R-CNN's RoI draws
        return task.losses(images, targets)

    assert METHODS["ds2d2-dist"].terms == (*METHODS["ds2d2"].terms, "dist")
    assert METHODS["ds2d2-dist"].needs_amplifier and METHODS["ds2d2"].needs_amplifier
    assert not METHODS["dist"].needs_amplifier and not METHODS["cwd"].needs_amplifier
    both, ds2d2, dist = losses("ds2d2-dist"), losses("ds2d2"), losses("dist")
    assert set(both) == set(ds2d2) | set(dist) and "dist" in both and "explicit_low" in both
    for name, value in {**dist, **ds2d2}.items():
        torch.testing.assert_close(both[name], value, rtol=1e-5, atol=1e-7, msg=name)
    from ds2d2_cli.study import LABELS, method_settings, study_methods

    assert "ds2d2-dist" in study_methods() and method_settings("ds2d2-dist") == {"method": "ds2d2-dist"}
    assert LABELS["ds2d2-dist"] == "DS2D2 + DIST"


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "cwd", "--streams", "explicit-low"], "--streams picks among ds2d2's streams"),
    (["--method", "ds2d2-dist", "--streams", "explicit-low"], "--streams picks among ds2d2's streams"),
    (["--method", "dist", "--no-disw"], "--no-disw unweights"),
    (["--streams", "implicit-full", "--no-disw"], "--no-disw unweights"),
    (["--method", "fgd", "--wavelet", "db2"], "--wavelet splits"),
])
def test_stream_flags_a_run_would_not_use_are_refused(tmp_path, args, message):
    out = tmp_path / "student"
    result = runner.invoke(app, ["distill", "--preset", "tiny-synthetic", "--teacher", str(tmp_path / "t.safetensors"),
                                 "--out", str(out), "--device", "cpu", *args], terminal_width=300)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in " ".join(result.output.split()) and not out.exists()


def _run(args, code=0):
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def test_distill_help_lists_dist():
    result = runner.invoke(app, ["distill", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "dist" in result.output.split("--method", 1)[1][:300]


def test_a_dist_student_distills_on_the_cli(tiny_data, tmp_path):
    common = ["--preset", "tiny-synthetic-frcnn", "--data", str(tiny_data), "--max-iters", "2",
              *[a for item in TINY for a in ("--set", item)]]
    _run(["train-teacher", *common, "--out", str(tmp_path / "teacher")])
    out = tmp_path / "dist"
    _run(["distill", *common, "--teacher", str(tmp_path / "teacher/model.safetensors"), "--method", "dist",
          "--out", str(out)])
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps and all(math.isfinite(step["dist"]) and step["dist"] > 0 for step in steps)
    assert json.loads((out / "summary.json").read_text())["method"] == "dist"
    config = json.loads((out / "config.json").read_text())
    assert config["distill"]["dist"] == {"beta": 1.0, "gamma": 1.0, "tau": 1.0}
    assert not (out / "distill_parts.safetensors").exists()  # DIST trains nothing beside the student
