"""`train-teacher` and `eval` end to end on tiny synthetic data, the checkpoint format, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ds2d2_cli.cli.app import app
from ds2d2_cli.config import load_config
from ds2d2_cli.errors import InputError

from conftest import TINY

runner = CliRunner()


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _train(preset: str, data: Path, out: Path, iters: int = 4, extra=()):
    args = ["train-teacher", "--preset", preset, "--data", str(data), "--out", str(out),
            "--max-iters", str(iters), "--device", "cpu", *_sets([*TINY, *extra])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def retina_teacher(tiny_data, module_tmp) -> Path:
    out = module_tmp("runs") / "teacher"
    _train("tiny-synthetic", tiny_data, out)
    return out


def _error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_teacher_run_folder(retina_teacher):
    out = retina_teacher
    for name in ("model.safetensors", "best.safetensors", "metrics.jsonl", "config.json", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # the resume state goes once the run has finished
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [s["iter"] for s in steps] == [1, 2, 3, 4]
    assert {"classification", "bbox_regression", "lr", "images_per_s"} <= steps[0].keys()
    assert steps[0]["loss"] == pytest.approx(steps[0]["classification"] + steps[0]["bbox_regression"], rel=1e-5)
    # eval_every=2: a mid-run evaluation at iteration 2, and the final one (the summary's) at 4
    evals = [line for line in lines if "eval" in line]
    assert [e["iter"] for e in evals] == [2, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"]["fpn_channels"] == 32 and config["teacher_train"]["max_iters"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4 and 0 <= summary["metrics"]["mAP"] <= 1
    assert summary["peak_cuda_memory_mb"] is None  # a CPU run: torch counts CUDA memory only
    assert evals[-1]["eval"] == summary["metrics"]


def test_checkpoint_is_plain_safetensors(retina_teacher):
    path = retina_teacher / "model.safetensors"
    tensors = load_file(str(path))  # any tool can read the weights
    assert any(k.startswith("backbone.fpn") for k in tensors)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "ds2d2-checkpoint" and meta["stage"] == "teacher"
    assert meta["detector"] == "retinanet" and meta["backbone"] == "resnet18" and meta["fpn_channels"] == "32"
    assert json.loads(meta["classes"]) == ["small-vehicle", "large-vehicle", "plane", "storage-tank", "ship"]
    assert meta["input_size"] == "128" and meta["preset"] == "tiny-synthetic"
    assert json.loads(meta["normalisation"])["mean"] == [0.485, 0.456, 0.406]
    assert "mAP" in json.loads(meta["metrics"]) and meta["ds2d2_version"]


def test_eval_checkpoint_json(retina_teacher, tiny_data, tmp_path):
    report = tmp_path / "m.json"
    preds = tmp_path / "p.json"
    result = runner.invoke(app, ["eval", str(retina_teacher / "model.safetensors"), "--device", "cpu",
                                 "--json", str(report), "--predictions-out", str(preds)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())
    for key in ("mAP", "AP50", "AP75", "APs", "APm", "APl"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_class"]) == {"small-vehicle", "large-vehicle", "plane", "storage-tank", "ship"}
    assert metrics["split"] == "val" and metrics["images"] == 2
    # the predictions file re-scores to the same numbers without the model
    again = runner.invoke(app, ["eval", "--predictions", str(preds), "--annotations", str(tiny_data / "val.json"),
                                "--json", "-"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["mAP"] == pytest.approx(metrics["mAP"])


def test_faster_rcnn_teacher_and_scene_eval(tiny_data, tmp_path):
    out = tmp_path / "frcnn"
    _train("tiny-synthetic-frcnn", tiny_data, out, iters=2)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["detector"] == "faster_rcnn"
    result = runner.invoke(app, ["eval", str(out / "model.safetensors"), "--merge-patches", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["merged_patches"] is True


def _coco(tmp_path: Path, boxes_per_image: int) -> Path:
    images = [{"id": i, "file_name": f"{i}.png", "width": 1000, "height": 1000} for i in (1, 2)]
    anns, k = [], 0
    for image_id in (1, 2):
        for j in range(boxes_per_image):
            k += 1
            x, y = 30 * (j % 30), 30 * (j // 30)
            anns.append({"id": k, "image_id": image_id, "category_id": 1 + j % 2, "bbox": [x, y, 20, 20],
                         "area": 400, "iscrowd": 0})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "plane"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_ground_truth_as_predictions_scores_one_even_when_dense(tmp_path):
    gt = _coco(tmp_path, boxes_per_image=150)  # more than pycocotools' default 100 detections/image
    rows = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in json.loads(gt.read_text())["annotations"]]
    preds = tmp_path / "pred.json"
    preds.write_text(json.dumps(rows))
    result = runner.invoke(app, ["eval", "--predictions", str(preds), "--annotations", str(gt), "--json", "-"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["APs"] == pytest.approx(1.0)  # 20x20 boxes are "small" in COCO terms
    assert metrics["per_class"]["plane"] == {"AP50": pytest.approx(1.0), "AP": pytest.approx(1.0)}


def test_metrics_equal_pycocotools_summary(tmp_path):
    """A hand-made case: our numbers are exactly pycocotools' own `stats`."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ds2d2_cli.evaluation import coco_metrics

    gt_path = _coco(tmp_path, boxes_per_image=6)
    gt = json.loads(gt_path.read_text())
    rows = []
    for i, a in enumerate(gt["annotations"]):
        x, y, w, h = a["bbox"]
        shift = [0, 3, 6, 9][i % 4]  # IoU 1.0, 0.74, 0.54, 0.38
        rows.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + shift, y, w, h],
                     "score": 0.9 - 0.05 * (i % 7)})
    rows.append({"image_id": 1, "category_id": 1, "bbox": [500, 500, 40, 40], "score": 0.95})  # false positive
    ours = coco_metrics(gt, rows)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(rows), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = [max(0.0, v) for v in evaluator.stats[:6]]
    assert [ours[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < ours["mAP"] < ours["AP50"] <= 1.0


def test_resume_gives_the_same_weights(tiny_data, tmp_path):
    from ds2d2_cli.progress import NullReporter
    from ds2d2_cli.stages.teacher import train_teacher

    config = load_config("tiny-synthetic", [*TINY, "train.max_iters=4", "train.eval_every=null"])

    class StopAfter(NullReporter):
        def task(self, description, total, completed=0):
            class Task:
                count = completed

                def update(self, advance=1, **fields):
                    Task.count += advance
                    if Task.count == 2:
                        raise KeyboardInterrupt

                def close(self):
                    pass

            return Task()

    train_teacher(config, out=tmp_path / "whole", data_dir=tiny_data, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train_teacher(config, out=tmp_path / "split", data_dir=tiny_data, device="cpu", reporter=StopAfter())
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["iteration"] == 2
    train_teacher(config, out=tmp_path / "split", data_dir=tiny_data, device="cpu", resume=True)
    whole = load_file(str(tmp_path / "whole/model.safetensors"))
    split = load_file(str(tmp_path / "split/model.safetensors"))
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    logged = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [(x["iter"], "eval" in x) for x in logged] == [(1, False), (2, False), (3, False), (4, False), (4, True)]
    assert not (tmp_path / "split/checkpoints").exists()
    with pytest.raises(InputError, match="already finished"):
        train_teacher(config, out=tmp_path / "split", data_dir=tiny_data, device="cpu", resume=True)


def test_run_folder_is_not_overwritten(retina_teacher, tiny_data):
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(retina_teacher), "--max-iters", "1", *_sets(TINY)])
    assert "holds a finished run (model.safetensors); choose another --out" in _error_line(result)


def test_checkpoint_errors(retina_teacher, tiny_data, tmp_path):
    from ds2d2_cli.checkpoint import load_checkpoint

    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint at all")
    assert "not a safetensors file" in _error_line(runner.invoke(app, ["eval", str(text)]))

    cut = tmp_path / "cut.safetensors"
    data = (retina_teacher / "model.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error_line(runner.invoke(app, ["eval", str(cut)]))

    assert "checkpoint not found" in _error_line(runner.invoke(app, ["eval", str(tmp_path / "none.safetensors")]))

    with pytest.raises(InputError, match="this is a teacher checkpoint; expected a student"):
        load_checkpoint(retina_teacher / "model.safetensors", "student", option="--student")

    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    val = json.loads((other / "val.json").read_text())
    val["categories"][0]["name"] = "windmill"
    (other / "val.json").write_text(json.dumps(val))
    line = _error_line(runner.invoke(app, ["eval", str(retina_teacher / "model.safetensors"), "--data", str(other)]))
    assert "do not match" in line and "val.json" in line


def test_offline_pretrained_request_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(tmp_path / "t"), "--max-iters", "1",
                                 *_sets([*TINY, "teacher.pretrained=true"])])
    line = _error_line(result, code=1)
    assert "cannot get ImageNet weights for resnet18" in line and "--backbone-weights" in line
    assert "--set teacher.pretrained=false" in line
    assert not (tmp_path / "t" / "model.safetensors").exists()


def test_local_backbone_weights(tiny_data, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    weights = tmp_path / "r18.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(weights))
    result = _train("tiny-synthetic", tiny_data, tmp_path / "t", iters=1, extra=[f"teacher.backbone_weights={weights}"])
    assert result.exit_code == 0
    bad = tmp_path / "r34.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(bad))
    result = runner.invoke(app, ["train-teacher", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(tmp_path / "t2"), "--max-iters", "1", "--backbone-weights", str(bad),
                                 *_sets(TINY)])
    assert "backbone weights do not fit" in _error_line(result)
    # distill: the same option sets the student's backbone
    result = runner.invoke(app, ["distill", "--method", "none", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(tmp_path / "s"), "--max-iters", "1", "--backbone-weights", str(weights),
                                 *_sets(TINY)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s/config.json").read_text())["student"]["backbone_weights"] == str(weights)
    result = runner.invoke(app, ["distill", "--method", "none", "--preset", "tiny-synthetic", "--data", str(tiny_data),
                                 "--out", str(tmp_path / "s2"), "--max-iters", "1", "--backbone-weights", str(bad),
                                 *_sets(TINY)])
    assert "backbone weights do not fit" in _error_line(result)


def test_decoded_image_cache_gives_the_same_samples(tiny_data, tmp_path):
    import shutil

    from ds2d2_cli.data.dataset import DetectionDataset, load_coco_split
    from ds2d2_cli.errors import InputError

    shutil.copytree(tiny_data, tmp_path / "data")
    split = load_coco_split(tmp_path / "data/train.json")
    plain = DetectionDataset(split, augment=("hflip", "rot90"), seed=1)
    cached = DetectionDataset(split, augment=("hflip", "rot90"), seed=1, cache_images=True)
    items = [(i, epoch) for i in range(len(split.images)) for epoch in (0, 3)]
    expected = {item: plain[item] for item in items}
    for item in items:  # the first epoch fills the cache
        image, target = cached[item]
        assert torch.equal(image, expected[item][0]) and torch.equal(target["boxes"], expected[item][1]["boxes"])
    for image in split.images:  # from now on only the cache can answer
        split.image_path(image).unlink()
    for item in items:
        image, target = cached[item]
        assert torch.equal(image, expected[item][0]) and torch.equal(target["boxes"], expected[item][1]["boxes"])
    with pytest.raises(InputError, match="not found"):
        plain[0]


def test_scene_split_is_not_a_split_to_score(retina_teacher, tiny_data):
    """val_scenes.json holds the whole scenes behind the val patches: scored only via --merge-patches."""
    assert (tiny_data / "val_scenes.json").is_file()
    result = runner.invoke(app, ["eval", str(retina_teacher / "model.safetensors"), "--data", str(tiny_data),
                                 "--split", "val_scenes"])
    assert "val_scenes.json holds the whole scenes behind split 'val'; score them with --split val " \
           "--merge-patches" in _error_line(result)
    result = runner.invoke(app, ["eval", str(retina_teacher / "model.safetensors"), "--data", str(tiny_data),
                                 "--split", "test"])
    assert "no split 'test' here (found: train, val)" in _error_line(result)
