"""What a person looks at after the ``predict`` command: an overlay per image and the review page of a folder.

* :func:`overlay`: the X-ray with the probability map laid over it translucently (transparent where the model sees
  nothing, warmer and more opaque as the probability rises), the mask's outline in bright green, and a caption bar
  with the verdict, the image-level probability and the area;
* :func:`write_review_page`: ``index.html``, one row per image with its overlay's thumbnail, positives first and
  by probability, out-of-scope images and unreadable files marked; plain HTML and CSS, no script, so that it opens
  from the disk in any browser.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np

from pneumoseg.io import write_text

OVERLAY_MAX_SIDE = 1024
"""Overlays are at most this many pixels a side (a 3000 px radiograph's overlay would be 27 MB of pixels)."""
HEAT_OPACITY = 0.55
"""The probability map's opacity where the probability is 1 (proportional below it)."""
OUTLINE_RGB = (0, 255, 0)
CAPTION_RGB = {True: (255, 80, 80), False: (255, 255, 255)}


def overlay(image: np.ndarray, probs: np.ndarray, mask: np.ndarray, caption: str, positive: bool) -> np.ndarray:
    """The RGB overlay of one prediction, at most :data:`OVERLAY_MAX_SIDE` a side.

    Args:
        image: the uint8 H x W grey X-ray.
        probs: the float H x W probabilities in 0..1, at the image's size.
        mask: the bool H x W mask after post-processing.
        caption: the text of the caption bar (ASCII).
        positive: whether the mask is not empty (the caption is red then).
    """
    scale = min(1.0, OVERLAY_MAX_SIDE / max(image.shape))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    grey = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1 else image
    probs = np.clip(cv2.resize(probs, size, interpolation=cv2.INTER_AREA) if scale < 1 else probs, 0, 1)
    small_mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) if scale < 1 else mask
    heat = cv2.applyColorMap(cv2.convertScaleAbs(probs, alpha=255), cv2.COLORMAP_INFERNO)
    # OpenCV's per-pixel weighted sum: several times faster than the same blend in numpy's float arithmetic
    opacity = (probs * HEAT_OPACITY).astype(np.float32)
    blended = cv2.blendLinear(
        cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), opacity, 1 - opacity
    )
    contours, _ = cv2.findContours(
        np.ascontiguousarray(small_mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(blended, contours, -1, OUTLINE_RGB, thickness=max(1, max(size) // 300), lineType=cv2.LINE_AA)
    return _with_caption(blended, caption, CAPTION_RGB[positive])


def _with_caption(rgb: np.ndarray, caption: str, colour: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` with a black bar on top holding ``caption``, its text scaled to the image's width."""
    scale = max(0.35, rgb.shape[1] / 900)
    (width, height), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if width > rgb.shape[1] - 8:  # long captions shrink to fit the width
        scale *= (rgb.shape[1] - 8) / width
        (width, height), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    bar = np.zeros((height + baseline + 8, rgb.shape[1], 3), np.uint8)
    cv2.putText(
        bar,
        caption,
        (4, height + 4),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        colour,
        thickness=max(1, round(scale * 1.5)),
        lineType=cv2.LINE_AA,
    )
    return np.concatenate([bar, rgb])


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; text-align: left; vertical-align: middle; }
th { background: #eee; position: sticky; top: 0; }
img.thumb { width: 200px; height: auto; display: block; background: #000; }
tr.positive td.verdict { color: #b00; font-weight: bold; }
tr.out-of-scope { background: #fff4d6; }
tr.error { background: #fde2e2; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.source, td.note { max-width: 22em; word-break: break-all; font-size: 0.9em; }
"""


def review_order(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """The page's order: predicted positives, then predicted negatives, each by image-level probability (highest
    first), then images not predicted (out of scope), by source path."""

    def key(row: Mapping[str, str]) -> tuple:
        predicted = row["EncodedPixels"] != ""
        probability = float(row["probability"]) if row["probability"] else 0.0
        return (not predicted, row["has_pneumothorax"] != "true", -probability, row["source"])

    return sorted(rows, key=key)


def write_review_page(
    path: Path, rows: Iterable[Mapping[str, str]], errors: Iterable[Mapping[str, str]], title: str
) -> None:
    """Write ``index.html`` (atomically) for the predictions of a folder.

    Args:
        path: the page, in the output folder (the overlays' links are relative to it).
        rows: the rows of ``predictions.csv`` as strings (see :mod:`pneumoseg.inference.folder`), with an
            ``overlay`` key: the overlay's path relative to the page ("" for an image not predicted).
        errors: the rows of ``errors.csv`` (source, error), listed at the end.
        title: the page's heading (the model, say).
    """
    ordered = review_order(rows)
    errors = list(errors)
    positives = sum(row["has_pneumothorax"] == "true" for row in ordered)
    out_of_scope = sum(row["in_scope"] != "true" for row in ordered)
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        (
            f"<p>{len(ordered)} images: {positives} with a pneumothorax predicted, {out_of_scope} out of scope, "
            f"{len(errors)} unreadable. Positives first, then by probability.</p>"
        ),
        (
            "<table><thead><tr><th>overlay</th><th>image</th><th>verdict</th><th>probability</th>"
            "<th>gate</th><th>area (mm&sup2;)</th><th>note</th></tr></thead><tbody>"
        ),
    ]
    lines += [_image_row(row) for row in ordered]
    lines += [
        (
            f'<tr class="error"><td></td><td class="source">{html.escape(row["source"])}</td><td>unreadable</td>'
            f'<td></td><td></td><td></td><td class="note">{html.escape(row["error"])}</td></tr>'
        )
        for row in errors
    ]
    lines.append("</tbody></table></body></html>")
    write_text(path, "\n".join(lines) + "\n")


def _image_row(row: Mapping[str, str]) -> str:
    """One image's row of the review page."""
    predicted = row["EncodedPixels"] != ""
    positive = row["has_pneumothorax"] == "true"
    if not predicted:
        verdict, css = "out of scope, not predicted", "out-of-scope"
    else:
        verdict = "pneumothorax" if positive else "none"
        css = ("positive" if positive else "negative") + ("" if row["in_scope"] == "true" else " out-of-scope")
    link = quote(row["overlay"])
    thumb = (
        (
            f'<a href="{link}"><img class="thumb" src="{link}" loading="lazy" alt="overlay of '
            f'{html.escape(row["source"])}"></a>'
        )
        if row["overlay"]
        else ""
    )
    area = row["area_mm2"] or (f"{row['area_pixels']} px" if row["area_pixels"] else "")
    cells = [
        thumb,
        html.escape(row["source"]),
        verdict,
        row["probability"],
        row["gate_probability"],
        area,
        html.escape(row["note"]),
    ]
    classes = ["", "source", "verdict", "number", "number", "number", "note"]
    return (
        f'<tr class="{css}">' + "".join(f'<td class="{cls}">{cell}</td>' for cls, cell in zip(classes, cells)) + "</tr>"
    )
