"""Oriented evaluation inside training and `ds2d2 eval`: DOTA Task 1 scores of result rows that
carry `rbox` (evaluation.oriented_metrics), patch rows merged into their scenes
(evaluation.merge_patch_results for oriented rows), the rows themselves (detections_to_coco),
`compare` and `study` with the size metrics Task 1 does not define, and the whole oriented
pipeline from the CLI (slow).

Every expected AP is worked out by hand in the comment beside it (VOC07 11-point AP: the mean
over recall levels 0, 0.1, ..., 1.0 of the best precision at that recall or more).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.compare import compare_runs
from ds2d2_cli.data.dataset import CocoSplit
from ds2d2_cli.errors import InputError
from ds2d2_cli.evaluation import detections_to_coco, merge_patch_results, oriented_metrics, rbox_row
from ds2d2_cli.rotated import rbox_to_poly, rotated_iou_pairs
from ds2d2_cli.study import analyse, ap_points, markdown

from test_own_data import _run, stage_options, train_every_stage

runner = CliRunner()

# --------------------------------------------------------------------------- oriented_metrics by hand

A1 = [50.0, 50.0, 40.0, 20.0, 0.0]  # class a, image 1
A2 = [150.0, 50.0, 40.0, 20.0, 0.0]  # class a, image 1, difficult
A3 = [60.0, 60.0, 40.0, 20.0, 0.3]  # class a, image 2, turned 0.3 rad
A4 = [150.0, 150.0, 30.0, 10.0, 0.0]  # class a, image 2, a cut piece kept as crowd
B1 = [50.0, 150.0, 30.0, 30.0, 0.0]  # class b, image 1
B2 = [150.0, 60.0, 24.0, 24.0, 0.0]  # class b, image 2


def _corners(rbox):
    return [round(v, 6) for v in rbox_to_poly(torch.tensor(rbox, dtype=torch.float64)).reshape(-1).tolist()]


def _ann(ann_id, image_id, category_id, rbox, *, outline=True, difficult=0, iscrowd=0):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "rbox": rbox, "iscrowd": iscrowd,
           "difficult": difficult}
    if outline:  # the polygon is what the devkit scores; without one, the rbox's corners
        ann["segmentation"] = [_corners(rbox)]
    return ann


def _gt(extra_categories=()):
    return {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, *extra_categories],
        "annotations": [_ann(1, 1, 1, A1), _ann(2, 1, 1, A2, difficult=1), _ann(3, 2, 1, A3, outline=False),
                        _ann(4, 2, 1, A4, iscrowd=1), _ann(5, 1, 2, B1), _ann(6, 2, 2, B2, outline=False)],
    }


def _row(image_id, category_id, rbox, score):
    return {"image_id": image_id, "category_id": category_id, "rbox": list(rbox), "score": score}


def _along(rbox, shift):
    """`rbox` moved `shift` pixels along its own w side: IoU (w - shift) / (w + shift) with it."""
    cx, cy, w, h, t = rbox
    return [cx + shift * math.cos(t), cy + shift * math.sin(t), w, h, t]


HALF = _along(A3, 8.0)  # IoU 32 / 48 = 2/3 with A3: a hit at 0.50..0.65, a miss at 0.70..0.95

RESULTS = [
    # class a (npos 2: A1, A3; A2 difficult and A4 crowd are ignored)
    _row(1, 1, A1, 0.9),  # perfect: TP at every threshold
    _row(1, 1, A1, 0.8),  # duplicate of A1: FP
    _row(1, 1, A2, 0.7),  # on the difficult object: neither TP nor FP
    _row(2, 1, HALF, 0.6),  # IoU 2/3 with A3
    _row(2, 1, A4, 0.5),  # on the crowd piece: neither
    # class b (npos 2)
    _row(2, 2, B2, 0.95),  # perfect: TP
    _row(1, 2, B2, 0.85),  # B2's place, but on image 1 (where B1 is elsewhere): FP
]


def test_half_detection_overlaps_two_thirds():
    iou = rotated_iou_pairs(torch.tensor([A3], dtype=torch.float64), torch.tensor([HALF], dtype=torch.float64))
    assert float(iou) == pytest.approx(2 / 3, abs=1e-12)


def test_oriented_metrics_by_hand():
    m = oriented_metrics(_gt(), RESULTS)
    # class a at IoU 0.5..0.65: TP, FP, -, TP, -: cumulative tp 1 1 1 2 2, fp 0 1 1 1 1
    #   recall .5 .5 .5 1 1, precision 1 .5 .5 2/3 2/3 -> levels 0..0.5 take 1, 0.6..1.0 take 2/3
    #   AP = (6 + 5 * 2/3) / 11 = 28/33
    # class a at IoU 0.70..0.95: TP, FP, -, FP, -: recall stays .5 -> (6 * 1) / 11 = 18/33
    # class b at every IoU: TP, FP: recall .5 .5, precision 1 .5 -> 6/11 = 18/33
    ap_a = {0.5: 28 / 33, 0.75: 18 / 33}
    assert m["metric"] == "dota-task1"
    assert m["AP50"] == pytest.approx((28 / 33 + 18 / 33) / 2, abs=1e-12)  # 23/33
    assert m["AP75"] == pytest.approx((18 / 33 + 18 / 33) / 2, abs=1e-12)  # 6/11
    # mAP: class a averages (4 * 28/33 + 6 * 18/33) / 10 = 2/3 over the ten thresholds, b 6/11
    assert m["mAP"] == pytest.approx((2 / 3 + 6 / 11) / 2, abs=1e-12)  # 20/33
    assert m["per_class"]["a"] == {"AP50": pytest.approx(ap_a[0.5], abs=1e-12), "AP": pytest.approx(2 / 3, abs=1e-12)}
    assert m["per_class"]["b"] == {"AP50": pytest.approx(6 / 11, abs=1e-12), "AP": pytest.approx(6 / 11, abs=1e-12)}
    assert m["APs"] is None and m["APm"] is None and m["APl"] is None  # COCO's size bins: not Task 1's
    assert m["detections"] == len(RESULTS)


def test_difficult_flag_two_and_crowd_both_ignored():
    """The devkit reads any non-zero difficult flag (ImgSplit writes 2 for small cut pieces) as difficult."""
    gt = _gt()
    gt["annotations"][1]["difficult"] = 2
    assert oriented_metrics(gt, RESULTS)["AP50"] == pytest.approx(23 / 33, abs=1e-12)
    # counted as plain objects, A2 and A4 are hit by their detections: class a at IoU 0.5,
    # TP FP TP TP TP of npos 4 -> recall .25 .25 .5 .75 1, precision 1 .5 2/3 3/4 4/5
    plain = _gt()
    for ann in plain["annotations"]:
        ann["difficult"], ann["iscrowd"] = 0, 0
    # levels 0..0.2 -> 1 (3), 0.3..0.5 -> 4/5 (3), 0.6..0.7 -> 4/5 (2), 0.8..1.0 -> 4/5 (3): (3 + 8 * 4/5) / 11
    assert oriented_metrics(plain, RESULTS)["per_class"]["a"]["AP50"] == pytest.approx((3 + 8 * 0.8) / 11, abs=1e-12)


def test_a_class_without_objects_scores_zero_and_counts_in_the_mean():
    """As the devkit's main(): every listed class is scored; no ground truth -> AP 0 (VOC07)."""
    gt = _gt(extra_categories=[{"id": 3, "name": "c"}])
    for rows in (RESULTS, [*RESULTS, _row(1, 3, A1, 0.99)]):
        m = oriented_metrics(gt, rows)
        assert m["per_class"]["c"] == {"AP50": 0.0, "AP": 0.0}
        assert m["AP50"] == pytest.approx((28 / 33 + 18 / 33 + 0.0) / 3, abs=1e-12)


def test_no_detections_and_images_without_objects():
    gt = _gt()
    gt["images"].append({"id": 3, "width": 200, "height": 200})  # an empty patch
    m = oriented_metrics(gt, [])
    assert m["AP50"] == 0.0 and m["mAP"] == 0.0 and m["detections"] == 0
    # a false alarm on the empty image costs precision as anywhere else: class b TP, FP(3), FP(1)
    m = oriented_metrics(gt, [*RESULTS, _row(3, 2, B2, 0.9)])
    # b: recall .5 .5 .5, precision 1 .5 1/3 -> 6/11 still (levels above .5 unreached)
    assert m["per_class"]["b"]["AP50"] == pytest.approx(6 / 11, abs=1e-12)


def test_an_outline_is_required():
    gt = _gt()
    del gt["annotations"][2]["rbox"]  # no polygon and no rbox: data prepared without --boxes obb
    with pytest.raises(InputError, match="annotation 3 has neither a 4-corner polygon nor an rbox"):
        oriented_metrics(gt, RESULTS)


def test_unknown_category_is_refused_like_coco():
    with pytest.raises(InputError, match=r"category ids \[7\]"):
        oriented_metrics(_gt(), [*RESULTS, _row(1, 7, A1, 0.5)])


def test_eval_predictions_file_of_oriented_rows_is_task1(tmp_path):
    """`eval --predictions` of the rows `eval --predictions-out` wrote for an oriented model: Task 1, as `eval CKPT`."""
    annotations, predictions = tmp_path / "gt.json", tmp_path / "rows.json"
    annotations.write_text(json.dumps(_gt()))
    rows = [{**r, "bbox": [0.0, 0.0, 1.0, 1.0]} for r in RESULTS]
    predictions.write_text(json.dumps(rows))
    result = runner.invoke(app, ["eval", "--predictions", str(predictions), "--annotations", str(annotations),
                                 "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["metric"] == "dota-task1" and metrics["AP50"] == pytest.approx(23 / 33, abs=1e-12)
    del rows[3]["rbox"]
    predictions.write_text(json.dumps(rows))
    result = runner.invoke(app, ["eval", "--predictions", str(predictions), "--annotations", str(annotations)])
    assert result.exit_code != 0 and "result 3 has no rbox" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- rows and merging


def test_detections_to_coco_rows_carry_rbox():
    rboxes = torch.tensor([[10.123, 20.456, 8.0, 4.0, 0.1234567], [30.0, 30.0, 6.0, 6.0, -0.5]])
    detections = {"boxes": torch.tensor([[5.0, 17.0, 15.0, 24.0], [26.0, 26.0, 34.0, 34.0]]), "rboxes": rboxes,
                  "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([2, 0])}  # 0: background slot
    [row] = detections_to_coco(7, detections)
    assert row == {"image_id": 7, "category_id": 2, "bbox": [5.0, 17.0, 10.0, 7.0], "score": 0.9,
                   "rbox": [10.12, 20.46, 8.0, 4.0, 0.123457]}
    assert rbox_row([1.234, 2.345, 3.456, 4.567, 0.1234567]) == [1.23, 2.35, 3.46, 4.57, 0.123457]
    # an axis-aligned detector's rows have no rbox
    del detections["rboxes"]
    assert "rbox" not in detections_to_coco(7, detections)[0]


def _split(tmp_path: Path) -> CocoSplit:
    """Patches of two scenes: scene 1 cut at scale 1 (windows (0, 0) and (96, 0)) and at 0.5
    (window (32, 0) of the half-size copy); scene 2 once at scale 1."""
    images = [
        {"id": 1, "scene_id": 1, "window": [0, 0], "scale": 1.0},
        {"id": 2, "scene_id": 1, "window": [96, 0], "scale": 1.0},
        {"id": 3, "scene_id": 1, "window": [32, 0], "scale": 0.5},
        {"id": 4, "scene_id": 2, "window": [0, 0], "scale": 1.0},
    ]
    return CocoSplit(tmp_path / "val.json", [{**i, "width": 128, "height": 128} for i in images], {},
                     [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], {})


def test_merge_oriented_patches_in_scene_pixels(tmp_path):
    x = [110.0, 50.0, 30.0, 10.0, 0.3]  # an object of scene 1 that both scale-1 windows see
    rows = [
        _row(2, 1, [14.0, 50.0, 30.0, 10.0, 0.3], 0.8),  # x from window (96, 0): a duplicate of the next
        _row(1, 1, x, 0.9),  # x from window (0, 0): kept
        _row(3, 1, [110 * 0.5 - 32, 25.0, 15.0, 5.0, 0.3], 0.6),  # x again from the half-size copy: dropped
        _row(3, 1, [60.0, 40.0, 10.0, 6.0, -0.2], 0.7),  # y: ((60 + 32) / 0.5, 40 / 0.5), sides doubled
        _row(2, 2, [14.0, 50.0, 30.0, 10.0, 0.3], 0.5),  # x's place but class b: kept (NMS class by class)
        _row(4, 1, x, 0.4),  # x's place but scene 2: kept (NMS scene by scene)
        _row(1, 1, _along(x, 20.0), 0.3),  # IoU 10 / 50 = 0.2 <= 0.3 (the devkit's merge threshold): kept
    ]
    merged = merge_patch_results(_split(tmp_path), rows)
    got = sorted((r["image_id"], r["category_id"], r["score"], r["rbox"]) for r in merged)
    assert got == sorted([
        (1, 1, 0.9, x),
        (1, 1, 0.7, [184.0, 80.0, 20.0, 12.0, -0.2]),
        (1, 2, 0.5, x),
        (2, 1, 0.4, x),
        (1, 1, 0.3, [round(v, 2) for v in _along(x, 20.0)[:4]] + [0.3]),
    ])
    for row in merged:  # bbox: the rbox's envelope, in scene pixels
        xs, ys = zip(*rbox_to_poly(torch.tensor(row["rbox"], dtype=torch.float64)).tolist())
        assert row["bbox"] == pytest.approx([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], abs=0.011)


def test_merged_rows_score_against_scene_polygons(tmp_path):
    """Merged rows carry scene ids and scene pixels: scored against the `*_scenes.json` objects."""
    x = [110.0, 50.0, 30.0, 10.0, 0.3]
    rows = [_row(2, 1, [14.0, 50.0, 30.0, 10.0, 0.3], 0.8), _row(1, 1, x, 0.9),
            _row(3, 1, [60.0, 40.0, 10.0, 6.0, -0.2], 0.7)]
    scenes = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
              "annotations": [_ann(1, 1, 1, x), _ann(2, 1, 1, [184.0, 80.0, 20.0, 12.0, -0.2], outline=False),
                              _ann(3, 2, 2, [50.0, 50.0, 20.0, 10.0, 0.0])]}
    m = oriented_metrics(scenes, merge_patch_results(_split(tmp_path), rows))
    # a: two hits of two objects (the duplicate merged away) -> AP 1 at every threshold; b: no hit -> 0
    assert m["per_class"]["a"] == {"AP50": pytest.approx(1.0), "AP": pytest.approx(1.0)}
    assert m["AP50"] == pytest.approx(0.5) and m["mAP"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- compare and study with None


def _task1_eval(path: Path, ap50: float, merged: bool = True) -> Path:
    """What `ds2d2 eval CKPT --json FILE` writes for an oriented model."""
    path.write_text(json.dumps({
        "metric": "dota-task1", "mAP": ap50 / 2, "AP50": ap50, "AP75": ap50 / 3, "APs": None, "APm": None,
        "APl": None, "per_class": {"ship": {"AP50": ap50, "AP": ap50 / 2}}, "detections": 3,
        "images_per_s": 10.0, "images": 4, "stage": "student", "split": "val", "merged_patches": merged}))
    return path


def test_compare_shows_undefined_size_metrics_as_dashes(tmp_path):
    a, b = _task1_eval(tmp_path / "a.json", 0.25), _task1_eval(tmp_path / "b.json", 0.5)
    comparison = compare_runs([a, b])
    row = comparison["runs"][1]
    assert row["metrics"]["APs"] is None and row["deltas"]["APs"] is None
    assert row["deltas"]["AP50"] == 25.0 and comparison["warnings"] == []
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "50.0" in result.stdout and " - " in result.stdout
    assert (tmp_path / "cmp" / "compare.json").is_file()


def test_compare_warns_when_task1_meets_coco_scores(tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"mAP": 0.1, "AP50": 0.2, "AP75": 0.1, "APs": 0.0, "APm": 0.1, "APl": 0.2,
                                "per_class": {"ship": {"AP50": 0.2, "AP": 0.1}}, "split": "val",
                                "merged_patches": True}))
    warnings = compare_runs([coco, _task1_eval(tmp_path / "obb.json", 0.5)])["warnings"]
    assert warnings == ["the runs mix metrics (coco: coco; dota-task1: obb): the numbers are not like for like"]


def test_study_table_with_undefined_size_metrics():
    metrics = {"metric": "dota-task1", "mAP": 0.1, "AP50": 0.2, "AP75": 0.05, "APs": None, "APm": None, "APl": None}
    points = {k: ap_points(metrics.get(k)) for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")}
    assert points == {"mAP": 10.0, "AP50": 20.0, "AP75": 5.0, "APs": None, "APm": None, "APl": None}
    outcomes = [{"method": m, "seed": s, "status": "finished", "seconds_per_iteration": 1.0,
                 "metrics": {**points, "AP50": 20.0 + s + 2 * (m == "ds2d2")}}
                for m in ("none", "ds2d2") for s in (0, 1)]
    record = analyse(outcomes, ["none", "ds2d2"], [0, 1])
    assert record["table"]["ds2d2"]["mean"]["APs"] is None and record["table"]["ds2d2"]["gain"]["AP50"]["mean"] == 2.0
    record = {**record, "eval_split": "val", "teacher_metrics": {"all": points}}
    text = markdown(record)
    assert "| teacher | 10.00 | 20.00 | 5.00 | - | - | - |" in text
    assert "| DS2D2 | 10.00 ± 0.00 | 22.50 ± 0.71 | 5.00 ± 0.00 | - | - | - |" in text

    from ds2d2_cli.cli.study import print_study

    print_study(record)  # the terminal table: "-" for the undefined columns, no crash


# --------------------------------------------------------------------------- the whole pipeline


# MMRotate's test score threshold: an oriented model two iterations old scores about 0.01
# everywhere, and rotated NMS of every anchor above tiny-synthetic's 0.01 costs seconds per patch
# on a slow CPU; the rows of a real model are checked below with fewer candidates instead.
OBB_FAST = ["--set", "teacher.score_thresh=0.05", "--set", "student.score_thresh=0.05"]


@pytest.mark.slow
def test_oriented_pipeline_from_the_cli(tmp_path):
    """prepare-data (obb, two scales, crowd pieces) -> teacher -> amplifier -> distill (ds2d2, cwd) ->
    eval --merge-patches: DOTA Task 1 scores of scenes, every stage on the oriented RetinaNet."""
    scenes, data, runs = tmp_path / "scenes", tmp_path / "data", tmp_path / "runs"
    _run(["prepare-data", "synthetic", "--out", scenes, "--images", "4", "--size", "224"])
    _run(["prepare-data", "dota", scenes, "--split", "128", "--gap", "32", "--scales", "1,0.5", "--partial", "crowd",
          "--classes", "synthetic", "--boxes", "obb", "--out", data])
    patches = json.loads((data / "val.json").read_text())
    assert patches["info"]["ds2d2"]["boxes"] == "obb" and {i["scale"] for i in patches["images"]} == {1.0, 0.5}
    assert all(len(a["rbox"]) == 5 for a in patches["annotations"])

    teacher, student = train_every_stage(data, runs, "tiny-synthetic-obb", OBB_FAST)
    _run(["distill", *stage_options(data, "tiny-synthetic-obb"), *OBB_FAST, "--teacher", teacher, "--method", "cwd",
          "--out", runs / "cwd"])
    for stage in ("teacher", "amplifier", "student", "cwd"):
        summary = json.loads((runs / stage / "summary.json").read_text())
        assert summary["metrics"]["metric"] == "dota-task1", stage

    metrics = json.loads(_run(["eval", student, "--merge-patches", "--device", "cpu", "--json", "-"]))
    assert metrics["metric"] == "dota-task1" and metrics["merged_patches"] is True
    assert 0.0 <= metrics["AP50"] <= 1.0 and 0.0 <= metrics["mAP"] <= 1.0
    assert metrics["APs"] is None and set(metrics["per_class"]) == {c["name"] for c in patches["categories"]}

    # The student's own rows, merged across windows and scales and scored against the scenes:
    # every (anchor, class) of the 20 best anchors per level goes to NMS (score threshold 0).
    from ds2d2_cli.checkpoint import load_checkpoint
    from ds2d2_cli.data.dataset import load_coco_split
    from ds2d2_cli.evaluation import evaluate_on_split
    from ds2d2_cli.models.detectors import model_from_checkpoint

    checkpoint = load_checkpoint(student)
    model = model_from_checkpoint(checkpoint, torch.device("cpu"))
    model.score_thresh, model.nms_pre = 0.0, 20
    metrics, rows = evaluate_on_split(model, load_coco_split(data / "val.json"), torch.device("cpu"),
                                      input_cfg=checkpoint.meta.input, merge_patches=True)
    scenes_doc = json.loads((data / "val_scenes.json").read_text())
    assert rows and {r["image_id"] for r in rows} <= {i["id"] for i in scenes_doc["images"]}
    assert all(len(r["rbox"]) == 5 for r in rows) and metrics["detections"] == len(rows)
    assert metrics["metric"] == "dota-task1" and 0.0 <= metrics["AP50"] <= 1.0
