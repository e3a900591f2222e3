"""One tiling, three doors: patches/s and peak memory of `prepare-data dota`, `voc` and `yolo` on the same scenes.

Synthetic DOTA-like scenes are generated once, then written as a VOC folder (LabelImg's
layout, boxes as the polygons' envelopes) and as an Ultralytics YOLO dataset (polygon
lines), the images linked, not copied. Each door cuts them with the same `--split` and
`--gap` in a fresh process (so its peak resident memory is its own), the three doors
interleaved over the repeats; the figure is the median. Every door goes through the one
tiling module, so their patches/s should agree within 10%.

Memory is bounded by one scene, not the dataset: each door also runs on twice as many
scenes, and its peak memory (the process's VmHWM, imports included: `imports_mb` is what
the process held before the command ran) should not grow with them.

    python benchmarks/bench_prepare.py --quick
    python benchmarks/run_all.py --only prepare
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ds2d2_cli.classes import SYNTHETIC  # noqa: E402
from ds2d2_cli.data.synthetic import generate_synthetic  # noqa: E402

DOORS = ("dota", "voc", "yolo")

# One door in a fresh process: wall time and peak resident memory of the whole command.
_CHILD = """
import json, sys, time
from pathlib import Path
from typer.testing import CliRunner
from ds2d2_cli.cli.app import app
def high_water_mb():  # this process's own peak (ru_maxrss would carry the parent's over fork and exec)
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
before = high_water_mb()
args = json.loads(sys.argv[1])
start = time.perf_counter()
result = CliRunner().invoke(app, args)
seconds = time.perf_counter() - start
assert result.exit_code == 0, result.output
print(json.dumps({"seconds": seconds, "peak_mb": high_water_mb(), "imports_mb": before}))
"""


def _objects(label: Path) -> list[tuple[list[float], str]]:
    rows = []
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 9 and ":" not in parts[0]:
            rows.append(([float(v) for v in parts[:8]], parts[8]))
    return rows


def write_doors(scenes: Path, root: Path) -> dict[str, list[str]]:
    """The DOTA scenes under `scenes/train` as VOC and YOLO too; {door: its prepare-data arguments}.

    Every door reads the train split alone (the generator always holds one scene back in val/).
    """
    from PIL import Image

    voc, yolo = root / "voc" / "train", root / "yolo"
    for folder in (voc, yolo / "images" / "train", yolo / "labels" / "train"):
        folder.mkdir(parents=True, exist_ok=True)
    for image in sorted((scenes / "train" / "images").iterdir()):
        width, height = Image.open(image).size
        objects = _objects(scenes / "train" / "labelTxt" / f"{image.stem}.txt")
        for target in (voc, yolo / "images" / "train"):
            (target / image.name).symlink_to(image.resolve())
        xml = "".join(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{min(p[0::2]):g}</xmin>"
                      f"<ymin>{min(p[1::2]):g}</ymin><xmax>{max(p[0::2]):g}</xmax><ymax>{max(p[1::2]):g}</ymax>"
                      "</bndbox></object>" for p, name in objects)
        (voc / f"{image.stem}.xml").write_text(f"<annotation><filename>{image.name}</filename><size><width>{width}"
                                               f"</width><height>{height}</height><depth>3</depth></size>{xml}"
                                               "</annotation>")
        (yolo / "labels" / "train" / f"{image.stem}.txt").write_text("".join(
            f"{SYNTHETIC.index(name)} " + " ".join(f"{v / (width if i % 2 == 0 else height):.8f}"
                                                   for i, v in enumerate(p)) + "\n" for p, name in objects))
    (yolo / "data.yaml").write_text(f"path: {yolo}\ntrain: images/train\nnames: {list(SYNTHETIC)}\n")
    return {"dota": ["dota", str(scenes / "train")], "voc": ["voc", str(root / "voc")], "yolo": ["yolo", str(yolo / "data.yaml")]}


def _one(door_args: list[str], out: Path, size: int, gap: int) -> dict:
    args = ["prepare-data", *door_args, "--out", str(out), "--split", str(size), "--gap", str(gap),
            "--classes", "synthetic"]
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["patches"] = len(json.loads((out / "train.json").read_text())["images"])
    return figures


def run(quick: bool = False, device: str = "cpu") -> dict:
    del device  # CPU work: decoding, cropping, PNG encoding
    scene_size, count, size, gap, repeats = (1024, 4, 256, 64, 3) if quick else (2048, 8, 512, 128, 3)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        doors_by_count = {}
        for n in (count, 2 * count):
            generate_synthetic(root / f"scenes-{n}", images=n, size=scene_size, seed=0, val_fraction=0.0)
            doors_by_count[n] = write_doors(root / f"scenes-{n}", root / f"doors-{n}")
        runs: dict[tuple[str, int], list[dict]] = {}
        for repeat in range(repeats):
            for n in (count, 2 * count):
                # interleaved, and each door first in turn: a slow moment or a cold cache hits every door alike
                for door in DOORS[repeat % 3:] + DOORS[:repeat % 3]:
                    out = root / f"out-{door}-{n}-{repeat}"
                    runs.setdefault((door, n), []).append(_one(doors_by_count[n][door], out, size, gap))
        for door in DOORS:
            small, large = runs[(door, count)], runs[(door, 2 * count)]
            rate = statistics.median(r["patches"] / r["seconds"] for r in small)
            cases.append({
                "door": door, "scenes": count, "scene_size": scene_size, "split": size, "gap": gap,
                "patches": small[0]["patches"], "patches_per_s": round(rate, 2),
                "peak_mb": round(statistics.median(r["peak_mb"] for r in small), 1),
                "peak_mb_twice_the_scenes": round(statistics.median(r["peak_mb"] for r in large), 1),
                "imports_mb": round(statistics.median(r["imports_mb"] for r in small), 1),
                "repeats": repeats,
            })
    fastest = max(c["patches_per_s"] for c in cases)
    for case in cases:
        case["relative_to_fastest"] = round(case["patches_per_s"] / fastest, 3)
        case["summary"] = (f"{case['door']:>4}: {case['patches']} patches, {case['patches_per_s']:.1f} patches/s "
                           f"({case['relative_to_fastest']:.2f} of the fastest), peak {case['peak_mb']:.0f} MB "
                           f"({case['peak_mb_twice_the_scenes']:.0f} MB with {2 * count} scenes)")
    spread = 1 - min(c["relative_to_fastest"] for c in cases)
    return {"cases": cases, "spread": round(spread, 3), "within_10_percent": spread <= 0.10}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 scenes of 1024 px (a smoke run)")
    args = parser.parse_args(argv)
    results = run(args.quick)
    for case in results["cases"]:
        print(case["summary"])
    print(f"spread {results['spread']:.1%} (within 10%: {results['within_10_percent']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
