"""Exact detector of the shapes world, its palette colour classifier, and batch scorers.

Pipeline for one ``(H, W, 3)`` uint8 image (all steps numpy / scipy.ndimage):

1. Pixel labels: each pixel is read as a blend of one palette colour with the black
   background; ink when it covers at least half of that colour (:func:`label_pixels`), so
   noisy pixels keep their colour and blurred edges their object.
2. Per colour, a 3x3 majority filter (a pixel is "seed" when >= 5 of its 9 neighbours carry
   the colour): removes isolated speckle and thin noise, fills pinholes. Generated images are
   speckled; without this a fill-ratio classifier breaks (measured: docs/results/shapes.md).
3. Each seed component (4-connected) becomes an object mask: the raw colour pixels within one
   pixel of the seed, holes filled. This restores the corners the majority filter shaved
   (triangle apex, cross arm ends) so a clean object's mask is exact.
4. Components smaller than :data:`MIN_AREA` px (at 32 px) are dropped.
5. Shape: the mask is compared with each shape rasterised (by the renderer's own
   :func:`~opdkit.shapes.render.shape_mask`) into a box that starts as the mask's bounding
   box and whose sides move in or out by 1 px while the best IoU improves (stray edge pixels
   inflate boxes, eroded edges shrink them); best IoU wins.
6. Score in [0, 1]: softmax confidence over the shape IoUs (sharpness :data:`IOU_SHARPNESS`)
   times a fit term (best IoU between :data:`FIT_LOW` and :data:`FIT_HIGH`), an aspect term
   (shapes are drawn in square boxes) and a size term. A clean render scores ~0.99, a ragged
   blob that fits two shapes about equally scores below 0.9 (fails GenEval's counting
   threshold) and junk below 0.3 (fails the general threshold).

Detections are GenEval-style :class:`opdkit.scoring.geneval.Detection`: box ``(x1, y1, x2, y2)``
in pixels, end-exclusive (``x2 - x1`` = width), image y down; ``mask`` the ``(H, W)`` bool
object mask; ``color`` the palette colour name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from opdkit.scoring.geneval import Detection, Detections, GenEvalConfig, judge, judge_exact, partial_credit
from opdkit.shapes.vocab import (
    COLOR_NAMES,
    DEFAULT_SIZE,
    LABEL_NAMES,
    PALETTE_RGB,
    SHAPES,
)

MIN_COVERAGE: float = 0.5
"""A pixel is ink when it is at least this fraction of the way from black to its nearest
palette colour (see :func:`label_pixels`); below, it is background."""

DIM_PENALTY: float = 0.5
"""Weight of the prior that an ink pixel is near full coverage (see :func:`label_pixels`)."""

MAX_COLOR_DIST: float = 200.0
"""RGB distance (0-255 units) from the best palette blend beyond which an ink pixel stays
unlabelled. Palette colours are >= 255 apart, so 200 keeps noisy pixels but rejects
off-palette ones (cyan is 208 from its best blend, a dim white, and 255 from green or blue)."""

MIN_AREA: int = 12
"""Smallest object kept, in pixels at 32 px (scaled by area). The smallest rendered object
(an 8 px triangle) covers ~36 px; speckle clusters surviving the majority filter are smaller."""

IOU_SHARPNESS: float = 40.0
"""Softmax sharpness over shape IoUs: an IoU lead of 0.1 gives ~0.98 confidence (two-way). Eight
shapes put more near rivals beside the best one (arch and circle beside square) than four did,
so the lead a clean object needs for GenEval's 0.9 counting threshold must be smaller."""

FIT_LOW, FIT_HIGH = 0.55, 0.85
"""Best-IoU range over which the fit term rises from 0 to 1."""

UNLABELLED: int = -1


# ------------------------------------------------------------------------------------------
# Pixel labels and masks
# ------------------------------------------------------------------------------------------


def label_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel label: 0 background, ``k >= 1`` palette colour ``COLOR_NAMES[k - 1]``, -1 none.

    A pixel ``p`` is read as a blend ``alpha * c`` of a palette colour ``c`` with the black
    background:

    - coverage ``alpha = p.c / |c|^2`` (least squares). Ink when the chosen colour's coverage
      is at least :data:`MIN_COVERAGE`, else background. Blurred edges thus keep their
      object's colour: a 56 % covered white pixel is grey (143, 143, 143), 195 from white,
      which a plain nearest-colour-with-distance-cut rule loses.
    - colour: the ``c`` minimising ``|p - a c|^2 + (DIM_PENALTY (1 - a))^2 |c|^2`` with
      ``a = clip(alpha, MIN_COVERAGE, 1)``: the best blend, with a prior towards full
      coverage. Without the prior, dim versions of other colours soak up the noise on
      saturated ones (red plus noise reads as a dim yellow); a plain nearest colour instead
      mislabels noisy blurred edges. Measured: this rule keeps GenEval accuracy at 1.00 under
      blur (plain nearest colour: counting 0.74) and >= 0.97 under Gaussian sigma 0.25.
    - unlabelled when the best blend is still more than :data:`MAX_COLOR_DIST` away
      (off-palette colours such as cyan).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W)`` int8.
    """
    pixels = np.asarray(image, dtype=np.float32)
    colours = PALETTE_RGB[1:]  # (6, 3)
    sq_norm = (colours**2).sum(-1)  # (6,)
    dots = pixels @ colours.T  # (H, W, 6)
    coverage = dots / sq_norm
    alpha = np.clip(coverage, MIN_COVERAGE, 1.0)
    residual = (pixels**2).sum(-1, keepdims=True) - 2.0 * alpha * dots + alpha**2 * sq_norm
    cost = residual + (DIM_PENALTY * (1.0 - alpha)) ** 2 * sq_norm
    best = cost.argmin(-1)[..., None]
    labels = (best[..., 0] + 1).astype(np.int8)
    labels[np.take_along_axis(residual, best, -1)[..., 0] > MAX_COLOR_DIST * MAX_COLOR_DIST] = UNLABELLED
    labels[np.take_along_axis(coverage, best, -1)[..., 0] < MIN_COVERAGE] = 0
    return labels


def _box_sum3(masks: np.ndarray) -> np.ndarray:
    """3x3 neighbourhood counts of ``(..., H, W)`` bool masks: int16.

    The image is extended by replicating its edge pixels, so an object touching the border keeps
    full counts there (zero padding would shave it under the majority filter).
    """
    pad = [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)]
    padded = np.pad(masks.astype(np.int16), pad, mode="edge")
    rows = padded[..., :-2, :] + padded[..., 1:-1, :] + padded[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def _dilate3(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of a 2-D bool mask."""
    return _box_sum3(mask) > 0


@lru_cache(maxsize=4096)
def _template_stack(width: int, height: int) -> np.ndarray:
    """``(len(SHAPES), height, width)`` bool: every shape rasterised into a ``width`` x ``height`` box."""
    from opdkit.shapes.render import shape_mask

    stack = np.stack([shape_mask(s, width, height) for s in SHAPES])
    stack.setflags(write=False)
    return stack


def _fit_shape(mask: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fit every shape's template to ``mask`` by moving the sides of ``box``.

    Greedy search: starting from ``box`` (the mask's bounding box), repeatedly move the one
    side (in or out by 1 px) that most improves the best IoU, until nothing improves. Moving
    in drops stray pixels stuck to an edge; moving out recovers an eroded edge.

    Args:
        mask: ``(h, w)`` bool object mask (a crop of the image with some margin).
        box: ``(x1, y1, x2, y2)`` start box within ``mask``, end-exclusive.

    Returns:
        ``(ious, box)``: ``(len(SHAPES),)`` best IoU per shape (order :data:`SHAPES`) over every box
        tried, and the box of the overall best fit.
    """
    h, w = mask.shape
    area = int(mask.sum())
    per_shape = np.zeros(len(SHAPES))
    cache: dict[tuple[int, int, int, int], float] = {}

    def evaluate(b: tuple[int, int, int, int]) -> float:
        if b not in cache:
            x1, y1, x2, y2 = b
            templates = _template_stack(x2 - x1, y2 - y1)
            inter = (templates & mask[y1:y2, x1:x2]).sum((1, 2))
            ious = inter / (area + templates.sum((1, 2)) - inter)
            np.maximum(per_shape, ious, out=per_shape)
            cache[b] = float(ious.max())
        return cache[b]

    current, score = box, evaluate(box)
    for _ in range(2 * (h + w)):  # bound: each step changes one side by 1 px
        moves = []
        for side in range(4):
            for step in (-1, 1):
                b = list(current)
                b[side] += step
                if 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h and min(b[2] - b[0], b[3] - b[1]) >= 2:
                    moves.append(tuple(b))
        best_move = max(moves, key=evaluate, default=None)
        if best_move is None or evaluate(best_move) <= score + 1e-9:
            break
        current, score = best_move, evaluate(best_move)
    return per_shape, current


def _confidence(ious: np.ndarray, width: int, height: int, area: int, min_area: float) -> tuple[int, float]:
    """Shape index and score in [0, 1] from the shape IoUs and the fitted box geometry."""
    k = int(ious.argmax())
    logits = IOU_SHARPNESS * (ious - ious[k])
    p = 1.0 / float(np.exp(logits).sum())
    fit = min(max((float(ious[k]) - FIT_LOW) / (FIT_HIGH - FIT_LOW), 0.0), 1.0)
    aspect = min(width, height) / max(width, height)
    aspect_term = min(max((aspect - 0.5) / 0.3, 0.0), 1.0)  # >= 0.8 (e.g. 8x10) is fine
    size_term = min(max((area - min_area) / min_area, 0.0), 1.0)  # full credit from 2x MIN_AREA
    return k, p * fit * aspect_term * size_term


def detect(image: np.ndarray) -> Detections:
    """GenEval-style detections of one shapes-world image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``{shape: [Detection, ...]}`` with every class of :data:`SHAPES` as a key (possibly an
        empty list), detections sorted by descending score. Boxes are pixels, end-exclusive.
    """
    from scipy import ndimage

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect expects an (H, W, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    min_area = MIN_AREA * (h * w) / (DEFAULT_SIZE * DEFAULT_SIZE)
    labels = label_pixels(image)
    raw = labels[None, :, :] == np.arange(1, len(COLOR_NAMES) + 1, dtype=np.int8)[:, None, None]  # (6, H, W)
    seeds = _box_sum3(raw) >= 5
    result: Detections = {s: [] for s in SHAPES}
    for c, colour in enumerate(COLOR_NAMES):
        if not seeds[c].any():
            continue
        comp, _ = ndimage.label(seeds[c])
        for sl_index, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None:
                continue
            # Work in the component's box grown by 2 px (dilation + its raw neighbours).
            y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, h)
            x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, w)
            seed = comp[y0:y1, x0:x1] == sl_index
            mask = ndimage.binary_fill_holes(raw[c, y0:y1, x0:x1] & _dilate3(seed))
            area = int(mask.sum())
            if area < min_area:
                continue
            rows = np.flatnonzero(mask.any(1))
            cols = np.flatnonzero(mask.any(0))
            start = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            ious, (bx0, by0, bx1, by1) = _fit_shape(mask, start)
            fx0, fy0, fx1, fy1 = x0 + bx0, y0 + by0, x0 + bx1, y0 + by1
            k, score = _confidence(ious, fx1 - fx0, fy1 - fy0, area, min_area)
            full = np.zeros((h, w), dtype=bool)
            full[y0:y1, x0:x1] = mask
            result[SHAPES[k]].append(Detection(box=(fx0, fy0, fx1, fy1), score=score, mask=full, color=colour))
    for dets in result.values():
        dets.sort(key=lambda d: -d.score)
    return result


def classify_color(image: np.ndarray, det: Detection) -> str:
    """Palette colour of a detection: the majority palette label of its mask (or box) pixels.

    Plays the role of GenEval's CLIP colour classifier. Background and unlabelled pixels do
    not vote; a region with no palette pixel at all is called ``"black"`` (the background).
    """
    labels = label_pixels(image)
    if det.mask is not None:
        votes = labels[np.asarray(det.mask, dtype=bool)]
    else:
        x1, y1, x2, y2 = (round(v) for v in det.box)
        votes = labels[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)].ravel()
    votes = votes[votes > 0]
    if votes.size == 0:
        return "black"
    return LABEL_NAMES[int(np.bincount(votes, minlength=len(LABEL_NAMES)).argmax())]


# ------------------------------------------------------------------------------------------
# Batch scorers (what the reward and benchmark plug-ins call)
# ------------------------------------------------------------------------------------------


def _as_batch(images: np.ndarray | Sequence[np.ndarray], n: int) -> Sequence[np.ndarray]:
    if len(images) != n:
        raise ValueError(f"got {len(images)} images for {n} records")
    return images


def score_geneval(images: np.ndarray | Sequence[np.ndarray], records: Sequence[Mapping[str, Any]],
                  config: GenEvalConfig = GenEvalConfig()) -> list[dict[str, Any]]:
    """GenEval verdicts of a batch of shapes-world images.

    Args:
        images: ``(B, H, W, 3)`` uint8 (or a sequence of ``(H, W, 3)``).
        records: ``B`` prompt records (GenEval schema; ``ocr`` records are read instead, see below).
        config: GenEval thresholds (upstream defaults).

    Returns:
        One dict per image: ``correct`` (official GenEval verdict, 0.0/1.0), ``strict``
        (Flow-GRPO's exact-count verdict, 0.0/1.0), ``partial`` (Flow-GRPO's partial credit:
        at most 1, negative when there are too many objects, as upstream), ``reason`` (why
        not correct, ``"ok"`` otherwise). For an ``ocr`` record the sign is read:
        ``correct``/``strict`` = exact reading, ``partial`` = Flow-GRPO's OCR reward.
    """
    from opdkit.scoring.ocr import normalize_ocr_text, ocr_reward
    from opdkit.shapes.glyphs import read_text

    out: list[dict[str, Any]] = []
    for image, record in zip(_as_batch(images, len(records)), records, strict=True):
        if record.get("tag") == "ocr":
            text = read_text(image)
            exact = float(normalize_ocr_text(text) == normalize_ocr_text(str(record["text"])))
            out.append({"correct": exact, "strict": exact, "partial": ocr_reward(text, str(record["text"])),
                        "reason": "ok" if exact else f"read {text!r}, expected {record['text']!r}"})
            continue
        dets = detect(image)
        verdict = judge(record, dets, image=image, classify_color=classify_color, config=config)
        strict = judge_exact(record, dets, image=image, classify_color=classify_color, config=config)
        partial = partial_credit(record, dets, image=image, classify_color=classify_color, config=config)
        out.append({"correct": float(verdict.correct), "strict": float(strict.correct), "partial": float(partial),
                    "reason": verdict.reason})
    return out


def score_ocr(images: np.ndarray | Sequence[np.ndarray], records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Flow-GRPO's OCR reward of each image's reading against its record's target.

    The target is ``record["text"]``, or the quoted text of ``record["prompt"]`` when absent.
    Returns one float in [0, 1] per image.
    """
    from opdkit.scoring.ocr import ocr_reward, ocr_target
    from opdkit.shapes.glyphs import read_text

    scores: list[float] = []
    for image, record in zip(_as_batch(images, len(records)), records, strict=True):
        target = str(record["text"]) if "text" in record else ocr_target(str(record["prompt"]))
        scores.append(float(ocr_reward(read_text(image), target)))
    return scores


__all__ = [
    "MAX_COLOR_DIST",
    "MIN_AREA",
    "MIN_COVERAGE",
    "classify_color",
    "detect",
    "label_pixels",
    "score_geneval",
    "score_ocr",
]
