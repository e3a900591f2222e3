"""`ds2d2 export`: a teacher or student checkpoint as ONNX, TorchScript or fp16 safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ds2d2_cli.cli.common import handle_errors, stdout_console, write_json_output
from ds2d2_cli.errors import InputError

FORMAT_HELP = ("onnx (full detector incl. resize/normalise and NMS; input one float32 [N, S, S] image of the "
               "checkpoint's N bands, scaled as in training: RGB 0..1; oriented detectors stop before rotated NMS, "
               "which ds2d2 predict applies), "
               "torchscript (torch.jit.script, List[Tensor] in, List[Dict] out) or safetensors (fp16 weights)")


def print_export_summary(result: dict[str, Any]) -> None:
    console = stdout_console()
    table = Table(title=f"export: {result['file']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("file", result["file"])
    table.add_row("format", result["format"] + (f" (opset {result['opset']})" if result.get("opset") else ""))
    table.add_row("size", f"{result['bytes'] / 1e6:.2f} MB (checkpoint {result['source_bytes'] / 1e6:.2f} MB)")
    table.add_row("model", f"{result['stage']}: {result['detector']} {result['backbone']}, "
                           f"input {result['input_size']} px, {len(result['classes'])} classes")
    if result.get("input"):
        table.add_row("input / outputs", f"{result['input']} -> {result['outputs']}")
    figures = result.get("verify")
    if figures:
        status = {"differs": "differs (informational)", "failed": "FAILED"}.get(figures["status"], figures["status"])
        table.add_row("verify", f"{status}: {figures['compared_with']} vs PyTorch on {figures['images']} image(s)")
        if figures.get("nothing_compared"):
            table.add_row("", "neither detected anything above the score threshold, so no box was compared; "
                              "verify with --image SCENE where the model finds objects")
        table.add_row("detections", f"{figures['detections_reference']} PyTorch / {figures['detections_exported']} "
                                    f"exported, {figures['matched']} matched, "
                                    f"{figures['unmatched_near_cutoff']} unpaired at the score cut-off")
        table.add_row("max box diff", f"{figures['max_box_abs_diff']:.3g} px (relative {figures['max_box_rel_diff']:.3g})")
        table.add_row("max score diff", f"{figures['max_score_abs_diff']:.3g} (relative {figures['max_score_rel_diff']:.3g})")
    console.print(table)


@handle_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="a teacher or student .safetensors checkpoint"),
    fmt: str = typer.Option("onnx", "--format", "-f", help=FORMAT_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output file (default: next to CKPT, "
                                       "with .onnx / .torchscript.pt / .fp16.safetensors)", show_default=False),
    verify: bool = typer.Option(False, "--verify", help="run the export and PyTorch on the same image(s) and "
                                "compare detections (fails on a mismatch; fp16: figures only)"),
    images: List[Path] = typer.Option([], "--image", help="image for --verify (repeatable; resized to the input "
                                      "size; default: a synthetic test scene)", show_default=False),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 17-20 (default: 18)", show_default=False),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON to FILE (`-` for stdout)"),
) -> None:
    """Export a trained detector for deployment (ONNX, TorchScript or fp16 safetensors).

    Examples: ds2d2 export runs/student/model.safetensors --verify

              ds2d2 export runs/student/model.safetensors --format torchscript --out student.pt
    """
    from ds2d2_cli.export import DEFAULT_OPSET, check_format, export_checkpoint

    check_format(fmt)
    if opset is not None and fmt != "onnx":
        raise InputError("--opset only applies to --format onnx")
    if images and not verify:
        raise InputError("--image is for --verify")
    result = export_checkpoint(checkpoint, out, fmt, verify=verify, images=images,
                               opset=opset if opset is not None else DEFAULT_OPSET)
    if not (json_out is not None and str(json_out) == "-"):
        print_export_summary(result)
    write_json_output(json_out, result)
