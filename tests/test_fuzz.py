"""Property-based tests: whatever the input, the parsers, the window computation and the COCO
writer either work or fail with the library's clean error (InputError / Ds2d2Error), never
with an unhandled exception."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from ds2d2_cli.classes import DIOR, DOTA_V1_0
from ds2d2_cli.data.coco import ingest_coco
from ds2d2_cli.data.dior import parse_voc_xml
from ds2d2_cli.data.dota import parse_dota_labels, prepare_dota, window_origins, window_starts
from ds2d2_cli.data.validate import BadItem
from ds2d2_cli.errors import Ds2d2Error, InputError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(folder: str, name: str, content: str | bytes) -> Path:
    path = Path(folder) / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


# --------------------------------------------------------------------------- DOTA labels

number = st.one_of(
    st.integers(-100, 2000).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr),
    st.floats(-50, 300).map(lambda v: f"{v:.1f}"),
    st.sampled_from(["1e400", "-0", "0x10", "1_0", "٣", "NaN", "inf", "", "1.2.3"]),
)
class_name = st.one_of(st.sampled_from(list(DOTA_V1_0) + ["Small-Vehicle", "plane ", "spaceship", "ship\u00a0"]),
                       st.text(max_size=8))
object_line = st.builds(
    lambda coords, name, flag: " ".join([*coords, name, *flag]),
    st.lists(number, min_size=6, max_size=10), class_name,
    st.lists(st.sampled_from(["0", "1", "2", "x", "nan", "inf", "-1", "1e9"]), max_size=2),
)
header_line = st.sampled_from(["imagesource:GoogleEarth", "gsd:0.1", "gsd:null", "gsd:inf", "GSD : 1e999",
                               "imagesource:", "gsd:", "imagesource"])
label_text = st.lists(st.one_of(object_line, header_line, st.text(max_size=40), st.just("")), max_size=12).map(
    "\n".join)


@FAST
@given(label_text)
def test_parse_dota_labels_parses_or_fails_cleanly(text):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, "P0001.txt", text)
        try:
            labels = parse_dota_labels(path, DOTA_V1_0, "dota-v1.0")
        except InputError as exc:
            assert "P0001.txt" in str(exc) and "\n" not in str(exc)
        else:
            for obj in labels.objects:
                assert obj.name in DOTA_V1_0 and obj.difficult in (0, 1) and obj.line >= 1
                assert obj.poly.ndim == 2 and obj.poly.shape[1] == 2 and np.all(np.isfinite(obj.poly))
        # with --skip-bad's handler nothing is raised but for the file as a whole
        skipped: list[BadItem] = []
        try:
            labels = parse_dota_labels(path, DOTA_V1_0, "dota-v1.0", on_bad=skipped.append)
        except BadItem as exc:
            assert exc.reason in ("empty label file", "unreadable label file")
        else:
            assert all(isinstance(s, BadItem) and s.line for s in skipped)
            lines = {o.line for o in labels.objects} | {s.line for s in skipped}
            assert len(lines) == len(labels.objects) + len(skipped)  # each line is kept or skipped, once


# --------------------------------------------------------------------------- DIOR XML

xml_value = st.one_of(st.integers(-10, 900).map(str), st.floats(width=32).map(repr), st.text(max_size=6),
                      st.sampled_from(["", " 12 ", "1e3", "NaN", "800.5", "&amp;", "<", "]]>"]))
xml_object = st.builds(
    lambda name, vals, difficult: (
        f"<object><name>{name}</name>{difficult}<bndbox><xmin>{vals[0]}</xmin><ymin>{vals[1]}</ymin>"
        f"<xmax>{vals[2]}</xmax><ymax>{vals[3]}</ymax></bndbox></object>"),
    st.one_of(st.sampled_from(list(DIOR) + ["Expressway-Service-area", "golf-field"]), st.text(max_size=8)),
    st.lists(xml_value, min_size=4, max_size=4),
    st.one_of(st.just(""), xml_value.map(lambda v: f"<difficult>{v}</difficult>")),
)
xml_doc = st.builds(
    lambda w, h, objects: (f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
                           + "".join(objects) + "</annotation>"),
    xml_value, xml_value, st.lists(xml_object, max_size=4),
)


@st.composite
def mutated_xml(draw) -> str:
    text = draw(xml_doc)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "swap"]))
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(["<", ">", "</size>", "<object>", "&", "\x00", "é", "<x/>"])) + text[i:]
        else:
            text = text[:i] + text[j:] + text[i:j]
    return text


@FAST
@given(mutated_xml())
def test_parse_voc_xml_parses_or_fails_cleanly(text):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, "00042.xml", text)
        try:
            info = parse_voc_xml(path)
        except InputError as exc:
            assert "00042.xml" in str(exc) and "\n" not in str(exc)
        else:
            assert info["width"] > 0 and info["height"] > 0
            for obj in info["objects"]:
                x0, y0, x1, y1 = obj["box"]
                assert obj["name"] in DIOR and obj["difficult"] in (0, 1)
                assert all(np.isfinite(v) for v in obj["box"]) and x1 >= x0 and y1 >= y0
        skipped: list[BadItem] = []
        try:
            info = parse_voc_xml(path, on_bad=skipped.append)
        except BadItem:
            return  # the file as a whole
        elements = len(list(ET.parse(path).getroot().iter("object")))
        assert len(info["objects"]) + len(skipped) == elements  # each object is kept or skipped, once


@FAST
@pytest.mark.parametrize("name, parse", [("P0002.txt", lambda path: parse_dota_labels(path, DOTA_V1_0)),
                                         ("00043.xml", lambda path: parse_voc_xml(path))], ids=["dota", "dior"])
@given(data=st.binary(max_size=300))
def test_parsers_on_arbitrary_bytes(name, parse, data):
    """Any bytes as a DOTA label file or a DIOR XML: parsed, or a clean InputError."""
    with tempfile.TemporaryDirectory() as folder:
        with contextlib.suppress(InputError):
            parse(_write(folder, name, data))


# --------------------------------------------------------------------------- windows


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 30000), st.integers(1, 4096), st.data())
def test_windows_cover_the_image_in_bounds(length, size, data):
    gap = data.draw(st.integers(0, size - 1))
    starts = window_starts(length, size, gap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if length <= size:
        assert starts == [0]  # one (padded) window
    else:
        assert starts[-1] + size == length  # the last window ends at the border
        assert all(0 <= s and s + size <= length for s in starts)  # inside the image
    ends = [s + size for s in starts]
    assert all(nxt <= end for nxt, end in zip(starts[1:], ends))  # no hole between windows
    assert all(nxt - s <= size - gap for s, nxt in zip(starts, starts[1:]))  # overlap at least the gap
    assert min(ends[-1], length) == length  # covers the far border


@settings(max_examples=100, deadline=None)
@given(st.integers(-5, 5000), st.integers(-5, 600), st.integers(-5, 600), st.integers(-5, 600))
def test_window_origins_bad_arguments_fail_cleanly(width, height, size, gap):
    try:
        origins = window_origins(max(width, 1), max(height, 1), size, gap)
    except InputError:
        assert size <= 0 or gap < 0 or gap >= size
    else:
        assert len(origins) == len(set(origins)) >= 1


# --------------------------------------------------------------------------- DOTA end to end


@pytest.fixture(scope="module")
def scene_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (90, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


@SLOW
@given(label=label_text, skip_bad=st.booleans())
def test_prepare_dota_any_labels(scene_png, label, skip_bad):
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "train"
        (src / "images").mkdir(parents=True)
        (src / "labelTxt").mkdir()
        (src / "images" / "P1.png").write_bytes(scene_png)
        (src / "labelTxt" / "P1.txt").write_text(label, encoding="utf-8", errors="surrogatepass")
        out = Path(folder) / "out"
        try:
            summary = prepare_dota(src, out, size=32, gap=8, skip_bad=skip_bad)
        except Ds2d2Error as exc:
            event("clean error")
            assert "\n" not in str(exc)
            assert not list(out.rglob("*.json")) and not list(out.rglob("*.png")) if out.exists() else True
        else:
            event("written" + (", with items left out" if summary.problems.skipped else ""))
            data = json.loads((out / "train.json").read_text())
            for ann in data["annotations"]:
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 32 + 1e-6 and y + h <= 32 + 1e-6
            assert summary.splits["train"].scenes == 1


# --------------------------------------------------------------------------- COCO writer


@pytest.fixture(scope="module")
def coco_images(module_tmp) -> Path:
    folder = module_tmp("coco_images")
    Image.new("RGB", (40, 30)).save(folder / "a.png")
    Image.new("RGB", (25, 50)).save(folder / "b.jpg")
    (folder / "junk.png").write_bytes(b"not an image")
    return folder


coord = st.one_of(st.integers(-60, 80), st.floats(-60, 80, allow_nan=False), st.sampled_from(
    [float("nan"), float("inf"), -0.0, 1e308, "3", None, True]))
ident = st.one_of(st.integers(0, 6), st.sampled_from(["1", None, 1.0, False, [1]]))
annotation = st.fixed_dictionaries(
    {"id": ident, "image_id": ident, "category_id": ident,
     "bbox": st.one_of(st.lists(coord, min_size=4, max_size=4), st.lists(coord, max_size=6), st.just("box"))},
    optional={"area": coord, "iscrowd": st.sampled_from([0, 1, "yes", None]),
              "segmentation": st.one_of(st.lists(st.lists(coord, max_size=8), max_size=2),
                                        st.just({"counts": "x", "size": [1, 1]}))})
plausible_coco = st.fixed_dictionaries({  # well-formed ids and files, random boxes: mostly written
    "images": st.sampled_from([[{"id": 1, "file_name": "a.png"}],
                               [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                                {"id": 5, "file_name": "b.jpg"}]]),
    "categories": st.lists(st.sampled_from(["car", "plane", "ship"]), min_size=1, max_size=3, unique=True).map(
        lambda names: [{"id": i, "name": n} for i, n in enumerate(names, start=1)]),
    "annotations": st.lists(st.fixed_dictionaries(
        {"id": st.integers(1, 30), "image_id": st.sampled_from([1, 5]), "category_id": st.integers(1, 3),
         "bbox": st.lists(st.one_of(st.integers(-3, 45), st.floats(-3, 45)), min_size=4, max_size=4)},
        optional={"area": coord, "segmentation": st.lists(st.lists(st.integers(0, 40), min_size=6, max_size=8),
                                                          max_size=2)}), max_size=10),
})
random_coco = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries(
        {"id": ident, "file_name": st.sampled_from(["a.png", "b.jpg", "junk.png", "missing.png", "", 3])},
        optional={"width": st.sampled_from([40, 25, 41, "40", None]), "height": st.sampled_from([30, 50, 0])}),
        min_size=1, max_size=4),
    "categories": st.lists(st.fixed_dictionaries(
        {"id": ident, "name": st.one_of(st.sampled_from(["car", "plane", "ship"]), st.text(max_size=4))}),
        max_size=3),
    "annotations": st.lists(annotation, max_size=8),
})
coco_doc = st.one_of(plausible_coco, random_coco)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=coco_doc, skip_bad=st.booleans())
def test_coco_writer_output_loads_or_fails_cleanly(coco_images, doc, skip_bad):
    from pycocotools.coco import COCO

    with tempfile.TemporaryDirectory() as folder:
        ann = Path(folder) / "in.json"
        ann.write_text(json.dumps(doc), encoding="utf-8")
        out = Path(folder) / "out"
        try:
            summary = ingest_coco(ann, coco_images, out, skip_bad=skip_bad)
        except InputError as exc:
            event("clean error")
            assert "\n" not in str(exc)
            assert not (out / "in.json").exists()
            return
        event("written")
        text = (out / "in.json").read_text()
        assert "NaN" not in text and "Infinity" not in text  # strict JSON
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(out / "in.json"))
        data = json.loads(text)
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        assert [img["id"] for img in data["images"]] == list(range(1, len(sizes) + 1))
        assert [c["id"] for c in data["categories"]] == list(range(1, len(data["categories"]) + 1))
        assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert w > 0 and h > 0 and 0 <= x and 0 <= y and x + w <= width + 1e-6 and y + h <= height + 1e-6
            assert 1 <= a["category_id"] <= len(data["categories"]) and a["area"] > 0
        assert len(coco.getAnnIds()) == summary.objects
        # nothing silent: every annotation of the input is written, or listed as left out (alone or with its image)
        left_out = len([e for e in summary.problems.skipped if e["item"] == "annotation"])
        with_images = sum(int(e["problem"].split("(its ")[1].split(" ")[0]) for e in summary.problems.skipped
                          if e["item"] == "image" and "(its " in e["problem"])
        assert summary.objects + left_out + with_images >= len(doc["annotations"])
