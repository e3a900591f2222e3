"""DOTA Task 1: the devkit's AP (VOC07 11-point and area), matching rules, submission files, patch
merging, `ds2d2 eval --dota-task1`, and the real DOTA sample scored against its own labels.

Every expected value is worked out by hand in the comment beside it. The comparison with the
devkit's own code is benchmarks/check_dota_task1.py (results/dota_task1_vs_devkit.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ds2d2_cli import dota_task1 as t1
from ds2d2_cli.classes import DOTA_V1_0
from ds2d2_cli.cli.app import app
from ds2d2_cli.errors import InputError
from ds2d2_cli.rotated import rbox_to_poly, rotated_nms

runner = CliRunner()


def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def truth(*objects):
    """Task1Truth of (poly, name, difficult) triples."""
    return t1.Task1Truth(np.array([o[0] for o in objects], dtype=np.float64).reshape(-1, 8),
                         tuple(o[1] for o in objects), np.array([bool(o[2]) for o in objects], dtype=bool))


def dets(*rows):
    """Task1Detections of (image, score, poly) rows, in file order."""
    return t1.Task1Detections(tuple(r[0] for r in rows), np.array([r[1] for r in rows], dtype=np.float64),
                              np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 8))


def ap(rows, gt, use_07=True, threshold=0.5, cls="ship"):
    return t1.score_task1({cls: dets(*rows)}, gt, [cls], iou_threshold=threshold, use_07_metric=use_07).per_class[cls]


G0, G1 = rect(0, 0, 10, 10), rect(20, 0, 30, 10)
FAR = rect(100, 100, 110, 110)


# --------------------------------------------------------------------------- voc_ap


def test_voc07_and_area_ap_by_hand():
    # TP, FP, TP against 2 objects: recall .5 .5 1, precision 1 .5 2/3.
    # VOC07: levels 0 .. 0.5 (6 of them) see precision 1, levels 0.6 .. 1 (5) see 2/3: (6 + 10/3) / 11 = 28/33.
    # Area: envelope 1 up to recall .5, then 2/3: .5 * 1 + .5 * 2/3 = 5/6.
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert t1.voc_ap(rec, prec, True) == pytest.approx(28 / 33, abs=1e-15)
    assert t1.voc_ap(rec, prec, False) == pytest.approx(5 / 6, abs=1e-15)
    gt = {"a": truth((G0, "ship", 0), (G1, "ship", 0))}
    rows = [("a", 0.9, G0), ("a", 0.8, FAR), ("a", 0.7, G1)]
    assert ap(rows, gt).ap == pytest.approx(28 / 33, abs=1e-15)
    assert ap(rows, gt, use_07=False).ap == pytest.approx(5 / 6, abs=1e-15)


def test_voc07_levels_are_numpys_arange():
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004: a recall of exactly 3/10 does not reach it,
    # so 3 of 10 objects found with precision 1 score 3/11 (levels 0, 0.1, 0.2), not 4/11.
    assert t1.voc_ap(np.array([0.1, 0.2, 0.3]), np.ones(3), True) == 3 / 11
    objects = [(rect(20 * k, 0, 20 * k + 10, 10), "ship", 0) for k in range(10)]
    rows = [("a", 1 - k / 10, objects[k][0]) for k in range(3)]
    assert ap(rows, {"a": truth(*objects)}).ap == 3 / 11


def test_eleven_elevenths_add_up_as_the_devkit_adds_them():
    # A perfect class: 11 times 1/11 added one after the other is 1.0000000000000002, as in the devkit.
    assert t1.voc_ap(np.array([1.0]), np.array([1.0]), True) == sum([1 / 11] * 11) == 1.0000000000000002


def test_voc_ap_without_detections_is_zero():
    assert t1.voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert t1.voc_ap(np.zeros(0), np.zeros(0), False) == 0.0


# --------------------------------------------------------------------------- matching


def test_difficult_objects_are_neither_hit_nor_miss():
    # The first detection lands on a difficult object: neither TP nor FP, but it stays a row, so
    # precision there is 0 / eps = 0. Recall 0 then 1, precision 0 then 1: AP 1 either way.
    gt = {"a": truth((G0, "ship", 1), (G1, "ship", 0))}
    score = ap([("a", 0.9, G0), ("a", 0.85, G0), ("a", 0.8, G1)], gt)
    assert (score.ap, score.ground_truth, score.difficult) == (pytest.approx(1.0), 1, 1)
    assert (score.true_positives, score.false_positives, score.detections) == (1, 0, 3)
    assert score.precision.tolist() == [0.0, 0.0, 1.0]
    assert ap([("a", 0.9, G0), ("a", 0.8, G1)], gt, use_07=False).ap == 1.0


def test_a_duplicate_is_a_false_positive():
    # Same TP/FP/TP sequence as the first test, the FP being a second hit on G0: 28/33.
    gt = {"a": truth((G0, "ship", 0), (G1, "ship", 0))}
    score = ap([("a", 0.9, G0), ("a", 0.8, G0), ("a", 0.7, G1)], gt)
    assert score.ap == pytest.approx(28 / 33, abs=1e-15)
    assert (score.true_positives, score.false_positives) == (2, 1)


def test_best_object_taken_means_false_positive_not_the_next_best():
    # D overlaps G0 (IoU 90/110) more than G2 (IoU 80/120 = 2/3 > 0.5); G0 is already matched,
    # so D is a false positive (VOC rule: no fall-back to the next object).
    g2 = rect(3, 0, 13, 10)
    gt = {"a": truth((G0, "ship", 0), (g2, "ship", 0))}
    score = ap([("a", 0.9, G0), ("a", 0.8, rect(1, 0, 11, 10))], gt)
    assert (score.true_positives, score.false_positives) == (1, 1)
    # Alone, D takes G0: recall .5 at precision 1 -> 6/11.
    assert ap([("a", 0.8, rect(1, 0, 11, 10))], gt).ap == pytest.approx(6 / 11, abs=1e-15)


def test_equal_confidences_keep_file_order():
    # Same score: file order decides. Hit first: precision 1 then .5 -> AP 1.
    # Miss first: precision 0 then .5 -> .5 at every level (VOC07) and over recall 0..1 (area).
    gt = {"a": truth((G0, "ship", 0))}
    assert ap([("a", 0.5, G0), ("a", 0.5, FAR)], gt).ap == pytest.approx(1.0)
    assert ap([("a", 0.5, FAR), ("a", 0.5, G0)], gt).ap == pytest.approx(0.5)
    assert ap([("a", 0.5, FAR), ("a", 0.5, G0)], gt, use_07=False).ap == 0.5


def test_iou_threshold_is_strict():
    # [0,3]x[0,1] vs [1,4]x[0,1]: intersection 2, union 4, IoU exactly 0.5: not > 0.5, a miss.
    gt = {"a": truth((rect(0, 0, 3, 1), "ship", 0))}
    assert ap([("a", 0.9, rect(1, 0, 4, 1))], gt).ap == 0.0
    assert ap([("a", 0.9, rect(1, 0, 4, 1))], gt, threshold=0.49).ap == pytest.approx(1.0)
    # [0.9, 3.9]: 2.1 / 3.9 = 0.538 > 0.5, a hit.
    assert ap([("a", 0.9, rect(0.9, 0, 3.9, 1))], gt).ap == pytest.approx(1.0)


def test_rotated_polygons_are_compared_as_polygons():
    # A 10 px square and itself turned 45 degrees about its centre overlap in an octagon of
    # 200 (sqrt2 - 1) px^2: IoU sqrt2 / 2 = 0.707, a hit. A 10 x 2 box and itself turned 45 degrees
    # overlap in a rhombus of 4 sqrt2 = 5.7 px^2: IoU 0.165, a miss, though their envelopes overlap.
    square = torch.tensor([[5.0, 5.0, 10.0, 10.0, 0.0]])
    turned = torch.tensor([[5.0, 5.0, 10.0, 10.0, np.pi / 4]])
    gt = {"a": truth((rbox_to_poly(square).reshape(8).tolist(), "ship", 0))}
    assert ap([("a", 0.9, rbox_to_poly(turned).reshape(8).tolist())], gt).ap == pytest.approx(1.0)
    thin = torch.tensor([[5.0, 5.0, 10.0, 2.0, 0.0]])
    thin_turned = torch.tensor([[5.0, 5.0, 10.0, 2.0, np.pi / 4]])
    gt = {"a": truth((rbox_to_poly(thin).reshape(8).tolist(), "ship", 0))}
    assert ap([("a", 0.9, rbox_to_poly(thin_turned).reshape(8).tolist())], gt).ap == 0.0


def test_class_without_detections_and_class_without_objects_count_zero_in_the_mean():
    # ship perfect (1.0000000000000002), plane: objects but no detections (0), harbor: neither (0).
    gt = {"a": truth((G0, "ship", 0), (G1, "plane", 0))}
    score = t1.score_task1({"ship": dets(("a", 0.9, G0))}, gt, ["ship", "plane", "harbor"])
    assert [s.ap for s in score.per_class.values()] == [sum([1 / 11] * 11), 0.0, 0.0]
    assert score.per_class["harbor"].ground_truth == 0
    assert score.mAP == sum([1 / 11] * 11) / 3
    # Detections of a class without objects: all false positives, AP 0 (the devkit's VOC07 0).
    score = t1.score_task1({"harbor": dets(("a", 0.9, G0))}, gt, ["harbor"], use_07_metric=False)
    assert (score.per_class["harbor"].ap, score.per_class["harbor"].false_positives) == (0.0, 1)


def test_image_without_objects_gives_false_positives():
    # The best detection is on image b, which has no objects: FP, then TP on a.
    # Recall 0, 1; precision 0, .5 -> 0.5 (VOC07 and area).
    gt = {"a": truth((G0, "ship", 0)), "b": truth()}
    assert ap([("b", 0.9, G0), ("a", 0.8, G0)], gt).ap == pytest.approx(0.5)
    assert ap([("b", 0.9, G0), ("a", 0.8, G0)], gt, use_07=False).ap == 0.5


def test_detection_on_an_unknown_image_names_file_and_line(tmp_path):
    (tmp_path / "Task1_ship.txt").write_text("a 0.9 " + " ".join(map(str, G0)) + "\n\nzz 0.5 " + " ".join(map(str, G0)))
    read = t1.read_task1_submission(tmp_path, ["ship"])
    with pytest.raises(InputError, match=r"Task1_ship\.txt:3: detection of ship on image 'zz'"):
        t1.score_task1(read, {"a": truth((G0, "ship", 0))}, ["ship"])


# --------------------------------------------------------------------------- files


def test_submission_round_trip_and_format(tmp_path):
    per_image = {
        "P0001": {"polys": np.array([rect(0.1, 2, 3.25, 4), rect(1, 1, 2, 2)]).reshape(2, 4, 2),
                  "scores": torch.tensor([0.9, 1 / 3], dtype=torch.float64), "labels": np.array([1, 0])},
        "P0002": {"polys": np.zeros((0, 8)), "scores": np.zeros(0), "labels": np.zeros(0)},
        "P0003": {"polys": np.array([rect(5, 5, 6, 7)]), "scores": np.array([0.5]), "labels": np.array([1])},
    }
    written = t1.write_task1_submission(tmp_path, per_image, ["plane", "ship", "harbor"])
    assert [p.name for p in written] == ["Task1_plane.txt", "Task1_ship.txt", "Task1_harbor.txt"]
    assert (tmp_path / "Task1_ship.txt").read_text() == (
        "P0001 0.9 0.1 2.0 3.25 2.0 3.25 4.0 0.1 4.0\nP0003 0.5 5.0 5.0 6.0 5.0 6.0 7.0 5.0 7.0\n")
    assert (tmp_path / "Task1_harbor.txt").read_text() == ""  # every class gets its file
    read = t1.read_task1_submission(tmp_path, ["plane", "ship", "harbor"])
    assert read["plane"].images == ("P0001",) and read["plane"].scores.tolist() == [1 / 3]  # full precision
    assert read["plane"].polys.tolist() == [rect(1.0, 1.0, 2.0, 2.0)]
    assert read["ship"].lines.tolist() == [1, 2] and len(read["harbor"]) == 0


@pytest.mark.parametrize("text, message", [
    ("a 0.9 1 2 3 4 5 6 7\n", r"Task1_ship\.txt:1: expected an image name, a confidence and 8 coordinates, got 9"),
    ("a 0.9 1 2 3 4 5 6 7 8\na high 1 2 3 4 5 6 7 8\n", r"Task1_ship\.txt:2: .* must be numbers"),
    ("a nan 1 2 3 4 5 6 7 8\n", r"Task1_ship\.txt:1: .* finite"),
])
def test_bad_detection_lines(tmp_path, text, message):
    (tmp_path / "Task1_ship.txt").write_text(text)
    with pytest.raises(InputError, match=message):
        t1.read_task1_submission(tmp_path, ["ship"])


def test_missing_class_file_is_refused(tmp_path):
    (tmp_path / "Task1_ship.txt").write_text("")
    with pytest.raises(InputError, match=r"no Task1_plane\.txt for class plane .*found Task1_ship\.txt"):
        t1.read_task1_submission(tmp_path, ["ship", "plane"])


def test_ground_truth_folder(tmp_path):
    (tmp_path / "a.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n"
                                    "0 0 10 0 10 10 0 10 ship 0\n"
                                    "20 0 30 0 30 10 20 10 Small_Vehicle 2\n"  # spelling and difficult 2 (ImgSplit)
                                    "0 0 1 0 1 1 0 1 container-crane 0\n"  # not scored: left out, counted
                                    "5 5 6 5 6 6 5 6 ship\n")  # no difficult flag: 0
    (tmp_path / "b.txt").write_text("")  # an empty patch of ImgSplit
    gt = t1.read_task1_ground_truth(tmp_path, DOTA_V1_0)
    assert list(gt.images) == ["a", "b"] and len(gt.images["b"].names) == 0
    assert gt.images["a"].names == ("ship", "small-vehicle", "ship")
    assert gt.images["a"].difficult.tolist() == [False, True, False]
    assert gt.images["a"].polys[1].tolist() == rect(20.0, 0.0, 30.0, 10.0)
    assert gt.ignored_objects == 1 and gt.ignored_example.endswith("a.txt:5")
    (tmp_path / "c.txt").write_text("0 0 10 0 10 10 0 10\n")
    with pytest.raises(InputError, match=r"c\.txt:1: expected 8 coordinates"):
        t1.read_task1_ground_truth(tmp_path, DOTA_V1_0)


# --------------------------------------------------------------------------- NMS and merging


def greedy_reference(polys, scores, threshold):
    """The devkit's loop, pair by pair (test only)."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        best, order = order[0], order[1:]
        keep.append(best)
        if order:
            iou = t1._polygon_iou(np.repeat(polys[[best]], len(order), 0), polys[order])
            order = [j for j, v in zip(order, iou) if v <= threshold]
    return keep


def test_polygon_nms_is_the_greedy_loop_and_rotated_nms():
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(60, 2, generator=g) * 60, torch.rand(60, 2, generator=g) * 20 + 4,
                       (torch.rand(60, 1, generator=g) - 0.5) * np.pi], 1).double()
    scores = torch.rand(60, generator=g).double()
    polys = rbox_to_poly(boxes).reshape(-1, 8).numpy()
    for threshold in (0.1, 0.3, 0.5):
        kept = t1.polygon_nms(polys, scores.numpy(), threshold)
        assert kept.tolist() == greedy_reference(polys, scores.numpy(), threshold)
        assert kept.tolist() == rotated_nms(boxes, scores, threshold).tolist()
    assert 0 < len(t1.polygon_nms(polys, scores.numpy(), 0.3)) < 60


def test_polygon_nms_groups_and_ties():
    polys = np.array([rect(0, 0, 10, 10)] * 3)
    # Equal scores: the earlier one is kept; another group never suppresses.
    assert t1.polygon_nms(polys, np.array([0.5, 0.5, 0.5]), 0.3, groups=np.array([0, 0, 1])).tolist() == [0, 2]
    assert t1.polygon_nms(np.zeros((0, 8)), np.zeros(0), 0.3).tolist() == []


def test_patch_names():
    assert t1.parse_patch_name("P0706__1__0___158") == ("P0706", 1.0, 0, 158)
    assert t1.parse_patch_name("P0706__0.5__824___0") == ("P0706", 0.5, 824, 0)
    assert t1.parse_patch_name("my__scene__1__10___20") == ("my__scene", 1.0, 10, 20)  # read from the end
    for bad in ("P0706", "P0706__1__0__158", "P0706__x__0___1", "__1__0___1", "P0706__1__-1___1"):
        assert t1.parse_patch_name(bad) is None


def test_merge_scene_detections():
    # Scene S seen by patch (0, 0) at scale 1 and by patch (100, 0): the object at scene x 100..110
    # is in both; the weaker copy (IoU with the stronger one 9/11 > 0.3) goes. At scale 0.5 a patch
    # box (10, 20)+(0..10) is scene ((0..10) + (10, 20)) / 0.5. Scene T comes first in the file.
    patches = dets(("T__1__0___0", 0.4, rect(0, 0, 5, 5)),
                   ("S__1__0___0", 0.6, rect(100, 0, 110, 10)),
                   ("S__1__100___0", 0.9, rect(1, 0, 11, 10)),
                   ("S__0.5__10___20", 0.7, rect(0, 0, 10, 10)))
    merged = t1.merge_scene_detections({"ship": patches, "plane": t1.Task1Detections.empty()})
    ship = merged["ship"]
    assert ship.images == ("T", "S", "S")
    assert ship.scores.tolist() == [0.4, 0.9, 0.7]
    assert ship.polys.tolist() == [rect(0, 0, 5, 5), rect(101, 0, 111, 10), rect(20, 40, 40, 60)]
    assert len(merged["plane"]) == 0
    # At a threshold above 9/11 both copies stay.
    assert len(t1.merge_scene_detections({"ship": patches}, 0.85)["ship"]) == 4
    with pytest.raises(InputError, match="not a patch name"):
        t1.merge_scene_detections({"ship": dets(("P0706", 0.5, G0))})


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def tiny_submission(tmp_path):
    labels, results = tmp_path / "labelTxt", tmp_path / "results"
    labels.mkdir()
    (labels / "a.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n" + " ".join(map(str, G0)) + " ship 0\n"
                                  + " ".join(map(str, G1)) + " ship 0\n" + " ".join(map(str, FAR)) + " plane 1\n")
    (labels / "b.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n")
    t1.write_task1_files(results, {"ship": dets(("a", 0.9, G0), ("b", 0.8, G0), ("a", 0.7, G1)),
                                   "plane": dets(("a", 0.5, FAR))})
    return results, labels


def test_cli_scores_submission_files(tiny_submission, tmp_path):
    results, labels = tiny_submission
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", "--dota-task1", str(results), "--dota-labels", str(labels),
                                 "--classes", "[ship,plane]", "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    # ship: TP, FP (image b), TP -> 28/33; plane: only a difficult object -> no ground truth, AP 0.
    assert metrics["per_class"]["ship"]["AP"] == pytest.approx(28 / 33, abs=1e-15)
    assert metrics["per_class"]["plane"] == {"AP": 0.0, "ground_truth": 0, "difficult": 1, "detections": 1,
                                             "true_positives": 0, "false_positives": 0}
    assert metrics["mAP"] == pytest.approx(14 / 33, abs=1e-15)
    assert metrics["images"] == 2 and metrics["detections"] == 4
    assert "ship" in result.output and "84.8" in result.output and "no (non-difficult) objects" in result.output
    assert "--classes [a,b,...]" in result.output
    # The default class list is DOTA v1.0: 15 classes, 13 files missing -> one line.
    result = runner.invoke(app, ["eval", "--dota-task1", str(results), "--dota-labels", str(labels)])
    assert result.exit_code == 2 and "no Task1_baseball-diamond.txt" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("extra, message", [
    (["model.safetensors"], "drop a checkpoint"),
    (["--device", "cpu"], "drop --device"),
    (["--predictions", "r.json", "--annotations", "a.json"], "drop --predictions, --annotations"),
    (["--predictions-out", "merged"], "needs --merge-patches"),
])
def test_cli_refuses_model_options(tiny_submission, extra, message):
    results, labels = tiny_submission
    result = runner.invoke(app, ["eval", "--dota-task1", str(results), "--dota-labels", str(labels), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_option_pairs(tiny_submission):
    results, labels = tiny_submission
    result = runner.invoke(app, ["eval", "--dota-task1", str(results)])
    assert result.exit_code == 2 and "go together" in result.output
    result = runner.invoke(app, ["eval", "--classes", "dota-v1.0"])
    assert result.exit_code == 2 and "--classes goes with --dota-task1" in result.output


def test_cli_bad_line_is_one_line(tiny_submission):
    results, labels = tiny_submission
    (results / "Task1_plane.txt").write_text("a 0.5 1 2 3\n")
    result = runner.invoke(app, ["eval", "--dota-task1", str(results), "--dota-labels", str(labels),
                                 "--classes", "ship,plane"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {results / 'Task1_plane.txt'}:1: expected an image name, a confidence and 8 coordinates, got 5 "
        "fields"]


def test_cli_merges_patches(tmp_path):
    labels, patches, merged = tmp_path / "labelTxt", tmp_path / "patches", tmp_path / "merged"
    labels.mkdir()
    (labels / "S.txt").write_text(" ".join(map(str, rect(101, 0, 111, 10))) + " ship 0\n")
    t1.write_task1_files(patches, {"ship": dets(("S__1__0___0", 0.6, rect(100, 0, 110, 10)),
                                                ("S__1__100___0", 0.9, rect(1, 0, 11, 10)))})
    result = runner.invoke(app, ["eval", "--dota-task1", str(patches), "--dota-labels", str(labels), "--classes",
                                 "[ship]", "--merge-patches", "--predictions-out", str(merged), "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["per_class"]["ship"]["detections"] == 1 and metrics["mAP"] == pytest.approx(1.0)
    assert (merged / "Task1_ship.txt").read_text() == "S 0.9 101.0 0.0 111.0 0.0 111.0 10.0 101.0 10.0\n"


# --------------------------------------------------------------------------- the real DOTA sample


def dota_sample() -> Path:
    from test_prepare_cli import _sample  # the one locator of the real DOTA sample, or a skip

    return _sample() / "train" / "labelTxt"


SAMPLE_CLASSES = ["harbor", "large-vehicle", "ship", "small-vehicle"]  # the classes P0706 and P1888 hold


def test_real_sample_scored_against_itself_and_perturbed(tmp_path):
    gt = t1.read_task1_ground_truth(dota_sample(), DOTA_V1_0)
    per_image = {image: {"polys": tr.polys, "scores": 1 - np.arange(len(tr.names)) / 1000,
                         "labels": np.array([DOTA_V1_0.index(n) for n in tr.names])} for image, tr in gt.images.items()}
    t1.write_task1_submission(tmp_path / "own", per_image, DOTA_V1_0)
    own = t1.score_task1(t1.read_task1_submission(tmp_path / "own", DOTA_V1_0), gt.images, SAMPLE_CLASSES)
    one = sum([1 / 11] * 11)  # 1.0000000000000002, as the devkit adds it up
    assert [s.ap for s in own.per_class.values()] == [one] * 4 and own.mAP == pytest.approx(1.0)
    assert {c: (s.ground_truth, s.difficult) for c, s in own.per_class.items()} == {
        "harbor": (5, 0), "large-vehicle": (50, 0), "ship": (525, 6), "small-vehicle": (14, 0)}
    assert own.per_class["ship"].false_positives == 0  # the 6 difficult ships are neither

    # Perturbed, class by class (scores distinct, descending along the lists):
    # harbor: as labelled -> 1 (`one`).
    # large-vehicle: each hit preceded by a false alarm 5000 px away; precision is 0 at the first
    #   row and 1/2 at every hit, so every VOC07 level sees 1/2: 11 * (0.5 / 11) added up.
    # ship: as labelled, difficult ones included -> `one`.
    # small-vehicle: only the first 7 of 14 found: recall 1/14 .. 7/14 = 0.5 at precision 1; the
    #   levels 0, 0.1, ..., 0.5 (0.5 is exact in np.arange) are reached: 6 / 11 added up.
    rows = {c: [] for c in SAMPLE_CLASSES}
    for image, tr in gt.images.items():
        for poly, name in zip(tr.polys, tr.names):
            rows[name].append((image, poly))
    perturbed = {}
    for name, items in rows.items():
        if name == "large-vehicle":
            items = [x for image, poly in items for x in ((image, poly + 5000.0), (image, poly))]
        elif name == "small-vehicle":
            items = items[:7]
        perturbed[name] = t1.Task1Detections(tuple(i for i, _ in items), 1 - np.arange(len(items)) / 1e4,
                                             np.array([p for _, p in items]))
    score = t1.score_task1(perturbed, gt.images, SAMPLE_CLASSES)
    expected = {"harbor": one, "large-vehicle": sum([0.5 / 11] * 11), "ship": one,
                "small-vehicle": sum([1 / 11] * 6)}
    assert {c: s.ap for c, s in score.per_class.items()} == expected
    assert score.mAP == (((0.0 + one) + expected["large-vehicle"]) + one + expected["small-vehicle"]) / 4
    # With the whole DOTA v1.0 list, 11 classes without objects count 0, as in the devkit: 4 / 15 of it.
    full = t1.score_task1(perturbed, gt.images, DOTA_V1_0)
    assert full.mAP == pytest.approx(score.mAP * 4 / 15, abs=1e-15)


def test_real_sample_cli(tmp_path):
    labels = dota_sample()
    gt = t1.read_task1_ground_truth(labels, DOTA_V1_0)
    by_class = {c: t1.Task1Detections.empty() for c in DOTA_V1_0}
    for image, tr in gt.images.items():
        for c in set(tr.names):
            mask = np.array([n == c for n in tr.names])
            by_class[c] = t1.Task1Detections(by_class[c].images + (image,) * int(mask.sum()),
                                             np.concatenate([by_class[c].scores, np.linspace(1, 0.5, mask.sum())]),
                                             np.concatenate([by_class[c].polys, tr.polys[mask]]))
    t1.write_task1_files(tmp_path, by_class)
    result = runner.invoke(app, ["eval", "--dota-task1", str(tmp_path), "--dota-labels", str(labels), "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["mAP"] == pytest.approx(4 / 15) and metrics["images"] == 2 and metrics["ignored_objects"] == 0
