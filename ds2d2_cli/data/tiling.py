"""Large scenes in fixed-size windows and back: the DOTA devkit's `ImgSplit` grid and the merge of window detections.

One definition of the window grid for `prepare-data dota` (patches) and `predict --slice`
(tiles): windows step by `size - gap`; the last window in each direction is moved back to
end at the scene border; a side no longer than a window gets the single origin 0 (the
window is padded with zeros past the border). Detections made window by window are merged
back into scene detections with class-wise NMS (`merge_order`), so an object seen by two
overlapping windows is reported once.
"""

from __future__ import annotations

import torch

from ds2d2_cli.errors import InputError


def check_window(size: int, gap: int, size_option: str = "--split", gap_option: str = "--gap") -> None:
    """A positive window size and 0 <= gap < size, or an InputError naming the options as the command spells them."""
    if size <= 0:
        raise InputError(f"{size_option} must be a positive number of pixels (got {size})")
    if gap < 0 or gap >= size:
        raise InputError(f"{gap_option} must be at least 0 and smaller than {size_option} "
                         f"(got {_pair(gap_option, gap, size_option, size)})")


def _pair(gap_option: str, gap: int, size_option: str, size: int) -> str:
    # the two commands have always worded this differently: "got 32, split 32" / "got overlap 128, slice 128"
    if gap_option == "--gap":
        return f"{gap}, split {size}"
    return f"{gap_option.lstrip('-')} {gap}, {size_option.lstrip('-')} {size}"


def window_starts(length: int, size: int, gap: int) -> list[int]:
    """Window origins along one axis, exactly as the DOTA devkit's ImgSplit loop.

    Step `size - gap`; the window that would reach the border is moved back to end at
    it (`length - size`); a length <= size gives the single origin 0.
    """
    if size <= 0 or gap < 0 or gap >= size:
        raise InputError(f"need 0 <= gap < split size (got split {size}, gap {gap})")
    step = size - gap
    starts: list[int] = []
    pos = 0
    while pos < length:
        if pos + size >= length:
            pos = max(length - size, 0)
        starts.append(pos)
        if pos + size >= length:
            break
        pos += step
    return starts or [0]


def window_origins(width: int, height: int, size: int, gap: int) -> list[tuple[int, int]]:
    """(left, top) of every window of a `width x height` scene, left-major like the devkit (prepare-data)."""
    tops = window_starts(height, size, gap)
    return [(left, top) for left in window_starts(width, size, gap) for top in tops]


def slice_windows(width: int, height: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(x0, y0) of every `size` x `size` window of a `width` x `height` scene, row by row (predict).

    Windows step by `size - overlap`; the last one in each direction is moved back to end at
    the border (x0 = width - size); a side no longer than `size` gets the single origin 0.
    """
    check_window(size, overlap, "--slice", "--overlap")
    xs = window_starts(width, size, overlap)
    return [(x0, y0) for y0 in window_starts(height, size, overlap) for x0 in xs]


def merge_order(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float,
                scenes: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the window detections kept in their scene, best score first: class-wise NMS.

    `boxes` are x1, y1, x2, y2 in scene pixels; detections of different classes (and, with
    `scenes`, of different scenes) never suppress each other.
    """
    from torchvision.ops import batched_nms

    groups = labels.to(torch.int64) if scenes is None else scenes.to(torch.int64) * 10_000 + labels.to(torch.int64)
    return batched_nms(boxes.float(), scores.float(), groups, iou)
