"""`ds2d2 predict`: detections of a checkpoint or ONNX export on image files, whole or tiled, with map
coordinates (GeoJSON) for georeferenced ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import RichReporter, handle_errors, stdout_console, write_json_output


def print_predict_summary(result: dict[str, Any]) -> None:
    console = stdout_console()
    table = Table(title=f"predict: {result['out']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("model", f"{result['model']} ({result['model_description']}, input {result['input_size']} px, "
                           f"{result['device']})")
    table.add_row("bands", ", ".join(result["bands"]))
    tiling = (f"{result['tiles']} tiles of {result['slice']} px, overlap {result['overlap']}, "
              f"{'rotated ' if result.get('oriented') else ''}NMS IoU {result['nms_iou']:g}" if result["slice"]
              else "whole images")
    table.add_row("images", f"{result['images']} ({tiling})")
    table.add_row("detections", f"{result['detections']} (score >= {result['score_thr']:g})")
    for name, count in result["per_class"].items():
        if count:
            table.add_row(f"  {name}", str(count))
    table.add_row("time", f"{result['seconds']:.1f} s ({result['images_per_s']:.2f} images/s)")
    table.add_row("predictions", result["predictions"])
    table.add_row("images json", result["images_json"])
    if result["annotated"]:
        shown = result["annotated"][0] + (f" (+{len(result['annotated']) - 1} more)" if len(result["annotated"]) > 1
                                          else "")
        table.add_row("annotated", shown)
    if result["geojson"]:
        shown = result["geojson"][0] + (f" (+{len(result['geojson']) - 1} more)" if len(result["geojson"]) > 1
                                        else "")
        table.add_row("geojson", shown)
    if result.get("task1"):
        table.add_row("task1", f"{result['task1']} (Task1_<class>.txt: the DOTA server's submission files)")
    console.print(table)


@handle_errors
def predict_command(
    model: Path = typer.Argument(..., help="a teacher or student .safetensors checkpoint, or an .onnx export"),
    inputs: List[Path] = typer.Argument(..., help="image files (PNG, JPEG, BMP, TIFF/GeoTIFF) or folders "
                                      "of them (not recursive); each must have the model's bands"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: predictions.json (COCO results; oriented "
                             "models add each rotated box as rbox [cx, cy, w, h, theta], le90), "
                             "images.json (image ids, categories, georeferencing), <stem>.png annotated images, "
                             "<stem>.geojson detections in map coordinates (georeferenced images)"),
    slice_size: Optional[int] = typer.Option(None, "--slice", help="tile large scenes into N px windows "
                                             "(DOTA devkit style; a TIFF is read window by window) and merge "
                                             "with class-wise NMS (rotated NMS for oriented models)",
                                             show_default=False),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="overlap of neighbouring tiles in px "
                                          "(default: 200, or a quarter of a smaller --slice)", show_default=False),
    nms_iou: Optional[float] = typer.Option(None, "--nms-iou", help="IoU above which tile detections of one class "
                                            "are merged (default: 0.5; oriented models 0.3, the DOTA devkit's "
                                            "ResultMerge, as eval --merge-patches)", show_default=False),
    score_thr: Optional[float] = typer.Option(None, "--score-thr", help="keep detections scoring at least this "
                                              "(default: the model's score_thresh)", show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", help="tiles or images per forward pass (checkpoints)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N "
                               "(ONNX models run on the CPU)"),
    no_images: bool = typer.Option(False, "--no-images", help="write only the JSON (and GeoJSON) files, no "
                                   "annotated images"),
    task1: bool = typer.Option(False, "--task1", help="oriented models: also write the DOTA devkit's submission "
                               "files OUT/task1/Task1_<class>.txt (one per class; images named by file stem) for "
                               "the official evaluation server"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the summary as JSON to FILE "
                                            "(`-` for stdout)"),
) -> None:
    """Detect objects in images with a trained checkpoint or an ONNX export.

    Images are read band by band as the model was trained (8-bit RGB, multispectral or SAR
    GeoTIFFs); georeferenced ones also get their detections as map polygons (<stem>.geojson).

    Examples: ds2d2 predict runs/student/model.safetensors scenes/ --out preds --slice 1024 --overlap 200

              ds2d2 predict runs/student/model.onnx P0706.png --out preds --score-thr 0.3

              ds2d2 predict runs/student/model.safetensors scene_utm.tif --out preds --slice 1024

              ds2d2 predict runs/obb/model.safetensors dota/test/images --out preds --slice 1024 --task1
    """
    from ds2d2_cli.predict import predict_paths

    result = predict_paths(model, inputs, out, device=device, slice_size=slice_size, overlap=overlap,
                           nms_iou=nms_iou, score_thresh=score_thr, batch_size=batch_size, draw=not no_images,
                           task1=task1, reporter=RichReporter())
    if not (json_out is not None and str(json_out) == "-"):
        print_predict_summary(result)
    write_json_output(json_out, result)
