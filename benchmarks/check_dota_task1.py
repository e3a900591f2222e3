"""ds2d2's DOTA Task 1 score and patch merging against the DOTA devkit's own code, by hand (not in CI).

Runs the devkit's `dota_evaluation_task1.py` (`voc_eval`) and `ResultMerge.py` (`mergebypoly`)
straight from its git mirror, on the real DOTA sample's labels and detections made from them
with noise (whole scenes; patches; patch detections merged back into scenes), and writes both
sides' per-class AP and their largest difference to benchmarks/results/dota_task1_vs_devkit.json.
Nothing of the devkit is copied into this repository: its files are read with `git show` into a
temporary folder. Its `polyiou` (a
SWIG module) is built there from the mirror's own `polyiou.cpp` with a small C entry point
when a C++ compiler is at hand, and is otherwise stood in for by shapely (exact for these
simple polygons); the JSON says which.

Detections (seeded, so the run repeats): per ground-truth object, jittered corners (some
well inside the 0.5 IoU, some around it), a few dropped, a few doubled, some given another
class; plus false alarms of several sizes, and detections of a class the labels lack.
Confidences are all different: among equal ones the devkit's order is numpy's unstable sort's.

The devkit needs numpy's old `np.bool` alias (gone in numpy 1.24); it is set here, in this
process only. Usage: python benchmarks/check_dota_task1.py [--devkit DIR] [--sample DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ds2d2_cli import dota_task1  # noqa: E402
from ds2d2_cli.classes import DOTA_V1_0  # noqa: E402

DEVKIT = Path(os.environ.get("DS2D2_DOTA_DEVKIT", "/work/.mirror/CAPTAIN-WHU+DOTA_devkit/repo"))
SAMPLE = Path(os.environ.get("DS2D2_DOTA_SAMPLE", "/work/shared/data/dota-devkit-example")) / "train"
OUT = ROOT / "benchmarks" / "results" / "dota_task1_vs_devkit.json"
SEED = 22
PATCH, GAP = 256, 64  # the merge check cuts each scene into these windows
ENTRY = 'extern "C" double iou_poly_c(const double* p, const double* q) {\n' \
        "    return iou_poly(std::vector<double>(p, p + 8), std::vector<double>(q, q + 8));\n}\n"


def git_show(repo: Path, name: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{name}"], check=True, capture_output=True,
                          text=True).stdout


def polyiou_module(repo: Path, work: Path) -> tuple[types.ModuleType, str]:
    """The devkit's polyiou: its polyiou.cpp compiled here, or a shapely stand-in without a compiler."""
    module = types.ModuleType("polyiou")
    module.VectorDouble = lambda values: [float(v) for v in values]
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler:
        source = work / "polyiou_c.cpp"
        source.write_text(git_show(repo, "polyiou.cpp") + "\n" + ENTRY)
        library = work / "libpolyiou.so"
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        lib = ctypes.CDLL(str(library))
        lib.iou_poly_c.restype = ctypes.c_double
        lib.iou_poly_c.argtypes = [ctypes.POINTER(ctypes.c_double)] * 2

        def iou_poly(p, q):
            return lib.iou_poly_c((ctypes.c_double * 8)(*p), (ctypes.c_double * 8)(*q))

        module.iou_poly = iou_poly
        return module, f"the mirror's polyiou.cpp, compiled with {Path(compiler).name} -O2 (ctypes)"
    from shapely.geometry import Polygon

    def iou_poly_shapely(p, q):
        a, b = Polygon(np.reshape(p, (4, 2))), Polygon(np.reshape(q, (4, 2)))
        inter = a.intersection(b).area
        return inter / (a.area + b.area - inter)

    module.iou_poly = iou_poly_shapely
    return module, "shapely stand-in (no C++ compiler found)"


def load_devkit(repo: Path, work: Path) -> tuple[types.ModuleType, types.ModuleType, str]:
    work.mkdir(parents=True, exist_ok=True)
    for name in ("dota_evaluation_task1.py", "ResultMerge.py", "dota_utils.py"):
        (work / name).write_text(git_show(repo, name))
    polyiou, how = polyiou_module(repo, work)
    sys.modules["polyiou"] = polyiou
    if not hasattr(np, "bool"):
        np.bool = bool  # the devkit's `astype(np.bool)`; numpy >= 1.24 dropped the alias
    sys.path.insert(0, str(work))
    try:
        evaluation = importlib.import_module("dota_evaluation_task1")
        merge = importlib.import_module("ResultMerge")
    finally:
        sys.path.remove(str(work))
    return evaluation, merge, how


# --------------------------------------------------------------------------- detections


def perturbed_detections(truth: dict[str, dota_task1.Task1Truth], rng: np.random.Generator
                         ) -> dict[str, list[tuple[str, np.ndarray]]]:
    """class -> [(image, polygon (8,))] made from the ground truth with noise (confidences come later)."""
    present = sorted({n for t in truth.values() for n in t.names})
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for image, t in truth.items():
        extent = t.polys.reshape(-1, 2).max(0) if len(t.polys) else np.array([1000.0, 1000.0])
        for poly, name in zip(t.polys, t.names):
            if rng.random() < 0.1:
                continue  # missed
            size = np.ptp(poly.reshape(4, 2), axis=0).max()
            spread = rng.choice([0.02, 0.1, 0.25])  # well matched, around the threshold, mostly off
            for _copy in range(2 if rng.random() < 0.1 else 1):  # some doubled
                label = name if rng.random() > 0.05 else str(rng.choice(present))
                shaken = poly + rng.normal(0.0, spread * size, 8)
                out.setdefault(label, []).append((image, shaken))
        for _alarm in range(40):
            centre = rng.uniform([0, 0], extent)
            w, h = rng.uniform(8, 80, 2)
            theta = rng.uniform(-np.pi / 2, np.pi / 2)
            u, v = np.array([np.cos(theta), np.sin(theta)]) * w / 2, np.array([-np.sin(theta), np.cos(theta)]) * h / 2
            corners = np.stack([centre - u - v, centre + u - v, centre + u + v, centre - u + v]).reshape(8)
            label = str(rng.choice(present + ["plane"]))  # plane: a class without ground truth here
            out.setdefault(label, []).append((image, corners))
    return out


def as_task1(rows: list[tuple[str, np.ndarray]], scores: np.ndarray) -> dota_task1.Task1Detections:
    return dota_task1.Task1Detections(tuple(r[0] for r in rows), scores, np.array([r[1] for r in rows]))


def cut_into_patches(by_class: dict[str, dota_task1.Task1Detections], extents: dict[str, np.ndarray],
                     rng: np.random.Generator) -> dict[str, dota_task1.Task1Detections]:
    """Scene detections seen from overlapping windows: each window wholly holding a detection
    reports it, slightly shaken and with its own confidence (as a detector run per patch would)."""
    from ds2d2_cli.data.tiling import window_origins

    out = {}
    for name, dets in by_class.items():
        images, scores, polys = [], [], []
        for image, poly in zip(dets.images, dets.polys):
            w, h = extents[image]
            for left, top in window_origins(int(w), int(h), PATCH, GAP):
                xs, ys = poly[0::2], poly[1::2]
                if xs.min() >= left and ys.min() >= top and xs.max() <= left + PATCH and ys.max() <= top + PATCH:
                    images.append(f"{image}__1__{left}___{top}")
                    scores.append(rng.random())
                    polys.append(poly - np.tile([left, top], 4) + rng.normal(0.0, 0.5, 8))
        out[name] = dota_task1.Task1Detections(tuple(images), np.array(scores), np.array(polys).reshape(-1, 8))
    return out


def patch_labels(truth: dict[str, dota_task1.Task1Truth], extents: dict[str, np.ndarray], folder: Path) -> list[str]:
    """labelTxt files of the windows, in ImgSplit's form (no header, patch pixels, empty files for
    empty windows): objects wholly inside keep their flag, objects cut by the border get
    difficult 2 (as ImgSplit marks small remnants; here they keep their whole outline)."""
    from ds2d2_cli.data.tiling import window_origins

    folder.mkdir(parents=True)
    names = []
    for image, t in truth.items():
        w, h = extents[image]
        for left, top in window_origins(int(w), int(h), PATCH, GAP):
            lines = []
            for poly, name, difficult in zip(t.polys, t.names, t.difficult):
                xs, ys = poly[0::2], poly[1::2]
                if xs.max() <= left or ys.max() <= top or xs.min() >= left + PATCH or ys.min() >= top + PATCH:
                    continue
                inside = xs.min() >= left and ys.min() >= top and xs.max() <= left + PATCH and ys.max() <= top + PATCH
                flag = str(int(difficult)) if inside else "2"
                coords = " ".join(map(str, (poly - np.tile([left, top], 4)).tolist()))
                lines.append(f"{coords} {name} {flag}\n")
            names.append(f"{image}__1__{left}___{top}")
            (folder / f"{names[-1]}.txt").write_text("".join(lines))
    return names


# --------------------------------------------------------------------------- the devkit's side


def devkit_scores(evaluation: types.ModuleType, results: Path, labels: Path, images: list[str],
                  classes: list[str], use_07_metric: bool) -> dict[str, float]:
    imageset = results.parent / f"{results.name}_imageset.txt"  # not in results: mergebypoly reads all there
    imageset.write_text("".join(f"{i}\n" for i in images))
    out = {}
    for name in classes:
        with redirect_stdout(io.StringIO()), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            _, _, ap = evaluation.voc_eval(str(results / "Task1_{:s}.txt"), str(labels / "{:s}.txt"), str(imageset),
                                           name, ovthresh=0.5, use_07_metric=use_07_metric)
        out[name] = float(ap)
    return out


def compare(ours: dict[str, float], theirs: dict[str, float]) -> dict:
    diffs = [abs(ours[k] - theirs[k]) for k in ours if np.isfinite(theirs[k])]
    finite = {k: (v if np.isfinite(v) else None) for k, v in theirs.items()}  # JSON has no NaN
    return {"ours": ours, "devkit": finite, "max_abs_difference": max(diffs) if diffs else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devkit", type=Path, default=DEVKIT, help="git mirror of CAPTAIN-WHU/DOTA_devkit")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="a DOTA split folder with labelTxt/")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not (args.devkit / "HEAD").exists() and not (args.devkit / ".git").exists():
        print(f"skipped: no DOTA devkit git mirror at {args.devkit} (set DS2D2_DOTA_DEVKIT or --devkit)")
        return 0
    labels = args.sample / "labelTxt"
    if not labels.is_dir():
        print(f"skipped: no DOTA sample labels at {labels} (set DS2D2_DOTA_SAMPLE or --sample)")
        return 0
    commit = subprocess.run(["git", "-C", str(args.devkit), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="dota_task1_check_") as tmp:
        work = Path(tmp)
        evaluation, merge, polyiou_how = load_devkit(args.devkit, work / "devkit")
        truth = dota_task1.read_task1_ground_truth(labels, DOTA_V1_0).images
        rows = perturbed_detections(truth, rng)
        classes = [c for c in DOTA_V1_0 if c in rows]  # the devkit cannot read an empty Task1 file
        total = sum(len(r) for r in rows.values())
        scores = rng.permutation(total) / total + 0.5 / total  # all different
        by_class, start = {}, 0
        for name in classes:
            by_class[name] = as_task1(rows[name], scores[start:start + len(rows[name])])
            start += len(rows[name])
        scenes = work / "scenes"
        dota_task1.write_task1_files(scenes, by_class)
        ours_read = dota_task1.read_task1_submission(scenes, classes)
        images = sorted(truth)
        report: dict = {
            "devkit": {"repository": "CAPTAIN-WHU/DOTA_devkit", "commit": commit,
                       "files": ["dota_evaluation_task1.py (voc_eval)", "ResultMerge.py (mergebypoly)"],
                       "polyiou": polyiou_how},
            "inputs": {
                "labels": "DOTA devkit example, train/labelTxt (P0706, P1888)",
                "objects (difficult included)": {c: int(sum(t.names.count(c) for t in truth.values())) for c in sorted(
                    {n for t in truth.values() for n in t.names})},
                "detections": {c: len(by_class[c]) for c in classes},
                "how": "per object: 10% missed, corners jittered by N(0, s * size) with s in {0.02, 0.1, 0.25}, "
                       "10% doubled, 5% given another class; 40 random rotated false alarms per scene; 'plane' "
                       "has detections but no ground truth; confidences all different; seed 22",
            },
            "environment": {"python": sys.version.split()[0], "numpy": np.__version__,
                            "torch": importlib.import_module("torch").__version__},
            "scenes": {},
        }
        for use_07 in (True, False):
            theirs = devkit_scores(evaluation, scenes, labels, images, classes, use_07)
            score = dota_task1.score_task1(ours_read, truth, classes, use_07_metric=use_07)
            ours = {c: s.ap for c, s in score.per_class.items()}
            key = "voc07" if use_07 else "area"
            report["scenes"][key] = compare(ours, theirs)
            if not use_07:
                report["scenes"][key]["note"] = ("plane has no ground truth: the devkit's area AP is NaN there "
                                                 "(ours 0), left out of the difference")
        # the merge: patch files -> devkit mergebypoly vs merge_scene_detections, then both scored
        extents = {i: truth[i].polys.reshape(-1, 2).max(0) + 1 for i in images}
        patch_dets = cut_into_patches(by_class, extents, rng)
        patches, merged_devkit = work / "patches", work / "merged_devkit"
        dota_task1.write_task1_files(patches, patch_dets)
        patch_names = patch_labels(truth, extents, work / "patch_labels")
        # plus a window of a scene without objects (an empty label file) holding three false alarms
        patch_names.append("EMPTY__1__0___0")
        (work / "patch_labels" / "EMPTY__1__0___0.txt").write_text("")
        scored = dict(patch_dets)
        ship = patch_dets["ship"]
        scored["ship"] = dota_task1.Task1Detections(
            ship.images + ("EMPTY__1__0___0",) * 3, np.concatenate([ship.scores, rng.random(3)]),
            np.concatenate([ship.polys, rng.uniform(0, PATCH, (3, 8))]))
        dota_task1.write_task1_files(work / "patches_scored", scored)
        patch_truth = dota_task1.read_task1_ground_truth(work / "patch_labels", DOTA_V1_0).images
        theirs = devkit_scores(evaluation, work / "patches_scored", work / "patch_labels", sorted(patch_names),
                               classes, True)
        score = dota_task1.score_task1(dota_task1.read_task1_submission(work / "patches_scored", classes),
                                       patch_truth, classes)
        report["patches"] = {
            "how": f"{len(patch_names)} windows of {PATCH} px (gap {GAP}, the devkit's grid); labels written as "
                   "ImgSplit writes them (no header, empty files for empty windows), objects cut by the border "
                   "marked difficult 2, plus an empty label file of a window without objects; detections: each scene "
                   "detection in every window holding it whole, shaken by N(0, 0.5 px), fresh confidences, "
                   "and 3 random ship false alarms on the empty window",
            "empty_label_files": sum(1 for n in patch_names if not patch_truth[n].names),
            "voc07": compare({c: s.ap for c, s in score.per_class.items()}, theirs),
        }
        merged_devkit.mkdir()
        with redirect_stdout(io.StringIO()):
            merge.mergebypoly(str(patches), str(merged_devkit))
        ours_merged = dota_task1.merge_scene_detections(dota_task1.read_task1_submission(patches, classes))
        merged_ours = work / "merged_ours"
        dota_task1.write_task1_files(merged_ours, ours_merged)
        same_files = {c: (merged_devkit / f"Task1_{c}.txt").read_text() == (merged_ours / f"Task1_{c}.txt").read_text()
                      for c in classes}
        kept_devkit = {c: len((merged_devkit / f"Task1_{c}.txt").read_text().splitlines()) for c in classes}
        theirs = devkit_scores(evaluation, merged_devkit, labels, images, classes, True)
        ours = {c: s.ap for c, s in dota_task1.score_task1(ours_merged, truth, classes).per_class.items()}
        report["merged_patches"] = {
            "how": f"each scene detection reported by every {PATCH} px window (gap {GAP}, the devkit's window grid) "
                   "holding it whole, corners shaken by N(0, 0.5 px), fresh confidences; merged at IoU "
                   f"{dota_task1.MERGE_IOU_THRESHOLD} (ResultMerge.py's nms_thresh)",
            "patch_detections": {c: len(patch_dets[c]) for c in classes},
            "kept": {"devkit": kept_devkit, "ours": {c: len(ours_merged[c]) for c in classes}},
            "merged_files_identical": same_files,
            "voc07": compare(ours, theirs),
        }
    diffs = [report["scenes"]["voc07"]["max_abs_difference"], report["scenes"]["area"]["max_abs_difference"],
             report["patches"]["voc07"]["max_abs_difference"], report["merged_patches"]["voc07"]["max_abs_difference"]]
    report["max_abs_difference"] = max(diffs)
    identical = all(report["merged_patches"]["merged_files_identical"].values())
    report["agrees_to_1e-12"] = bool(max(diffs) <= 1e-12 and identical)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"max_abs_difference": report["max_abs_difference"],
                      "merged_files_identical": report["merged_patches"]["merged_files_identical"],
                      "agrees": report["agrees_to_1e-12"]}, indent=2))
    print(f"written {args.out}")
    return 0 if report["agrees_to_1e-12"] else 1


if __name__ == "__main__":
    sys.exit(main())
