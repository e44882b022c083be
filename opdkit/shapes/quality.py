"""Task-agnostic image quality of the shapes world (plays PickScore's role), and degradations.

``quality_score`` ignores the prompt and rewards what a clean render has: every pixel exactly a
palette colour or the black background (pure fills, a uniform background, sharp edges: a
blurred edge is a blend, hence impure), no isolated speckle, and some content. A clean render
scores 1.0; pixel noise, speckle and blur lower it, monotonically in their strength. Because it
never looks at the prompt it can be hacked: an image of one big clean square is perfect
quality for any prompt, which is how a quality reward exposes reward hacking when it is
optimised alone.

The degradation helpers (:func:`gaussian_noise`, :func:`speckle`, :func:`blur`) are the ones the
accuracy-vs-noise table in ``docs/results/shapes.md`` uses (:func:`noise_sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from opdkit.shapes.vocab import palette_sq_distances

PURITY_SCALE: float = 20.0
"""RGB distance (0-255 units) at which a pixel's purity falls to 1/e: ~0.08 of the range. At 48
the four-shape world's base scored 0.919, leaving a quality teacher nothing to gain; at 20 a base
that draws the right shapes with slightly off colours scores ~0.78, a clean render still 1."""
SPECKLE_SCALE: float = 0.02
"""Fraction of isolated pixels at which the speckle factor falls to 1/e."""
CONTENT_FRACTION: float = 0.02
"""Ink fraction from which an image counts as having content (a small single object has ~6 %)."""
EMPTY_FACTOR: float = 0.75
"""Quality factor of an image with no ink at all (content between scales linearly up to 1)."""


def quality_terms(image: np.ndarray) -> dict[str, float]:
    """The factors of :func:`quality_score` for one image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``purity`` (mean over pixels of ``exp(-(d / PURITY_SCALE)^2)``, ``d`` the RGB distance
        to the nearest palette colour or the background), ``speckle`` (fraction of pixels
        whose label differs from all four neighbours'), ``ink`` (fraction of ink pixels),
        ``content`` (factor in [EMPTY_FACTOR, 1]).
    """
    from opdkit.shapes.detect import label_pixels

    d2 = palette_sq_distances(image).min(-1)
    purity = float(np.exp(-d2 / (PURITY_SCALE * PURITY_SCALE)).mean())
    labels = label_pixels(image)
    padded = np.pad(labels, 1, mode="edge")  # the border's outside copies the border: not speckle
    centre = padded[1:-1, 1:-1]
    isolated = ((centre != padded[:-2, 1:-1]) & (centre != padded[2:, 1:-1])
                & (centre != padded[1:-1, :-2]) & (centre != padded[1:-1, 2:]))
    speckle_fraction = float(isolated.mean())
    ink = float((labels != 0).mean())
    content = EMPTY_FACTOR + (1.0 - EMPTY_FACTOR) * min(ink / CONTENT_FRACTION, 1.0)
    return {"purity": purity, "speckle": speckle_fraction, "ink": ink, "content": content}


def quality_score(image: np.ndarray) -> float:
    """Quality in [0, 1] of one image: ``purity * exp(-speckle / SPECKLE_SCALE) * content``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        1.0 for a clean render with content; lower for noise, speckle, blur or an empty image.
    """
    t = quality_terms(image)
    return float(t["purity"] * np.exp(-t["speckle"] / SPECKLE_SCALE) * t["content"])


def score_quality(images: np.ndarray | Sequence[np.ndarray]) -> list[float]:
    """:func:`quality_score` of each image of a ``(B, H, W, 3)`` uint8 batch."""
    return [quality_score(image) for image in images]


# ------------------------------------------------------------------------------------------
# Degradations (for tests and the accuracy-vs-noise table)
# ------------------------------------------------------------------------------------------

_CUBE_CORNERS = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.uint8)


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise of std ``sigma`` (fraction of 255) per channel, clip, round to uint8."""
    noisy = images.astype(np.float32) + rng.normal(0.0, sigma * 255.0, images.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def speckle(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Colour salt-and-pepper: each pixel, with probability ``fraction``, becomes a random RGB
    cube corner (black, the 6 palette colours or off-palette cyan)."""
    out = images.copy()
    hit = rng.random(images.shape[:-1]) < fraction
    out[hit] = _CUBE_CORNERS[rng.integers(0, len(_CUBE_CORNERS), int(hit.sum()))]
    return out


def blur(images: np.ndarray) -> np.ndarray:
    """Separable ``[1, 2, 1] / 4`` blur (3x3 binomial, edge-replicated) of ``(..., H, W, 3)`` uint8."""
    x = images.astype(np.float32)
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
    p = np.pad(x, pad, mode="edge")
    rows = 0.25 * p[..., :-2, :, :] + 0.5 * p[..., 1:-1, :, :] + 0.25 * p[..., 2:, :, :]
    out = 0.25 * rows[..., :-2, :] + 0.5 * rows[..., 1:-1, :] + 0.25 * rows[..., 2:, :]
    return np.clip(out, 0, 255).round().astype(np.uint8)


def noise_sweep(n_per_tag: int = 50, seed: int = 0) -> list[dict[str, Any]]:
    """Detector / reader accuracy and quality under each degradation of the docs table.

    Renders ``n_per_tag`` random records per tag (with replacement), degrades them and scores
    them with :func:`opdkit.shapes.detect.score_geneval` (official verdict; ``ocr`` exact read).

    Returns:
        One row per condition: ``{"condition", <tag>: accuracy..., "geneval": mean of the six
        GenEval tags, "quality": mean quality_score}``.
    """
    from opdkit.shapes.detect import score_geneval
    from opdkit.shapes.prompts import ALL_TAGS, GENEVAL_TAGS, generate_prompts
    from opdkit.shapes.render import render_batch

    records = generate_prompts(n_per_tag, seed, unique=False)
    clean = render_batch(records, seed)
    rng = np.random.default_rng(seed)
    conditions: list[tuple[str, np.ndarray]] = [("clean", clean)]
    conditions += [(f"gaussian sigma={s}", gaussian_noise(clean, s, rng)) for s in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)]
    conditions += [(f"speckle p={p}", speckle(clean, p, rng)) for p in (0.02, 0.05, 0.1, 0.2)]
    conditions += [("blur", blur(clean)), ("blur + gaussian 0.1", gaussian_noise(blur(clean), 0.1, rng)),
                   ("blur + gaussian 0.1 + speckle 0.05", speckle(gaussian_noise(blur(clean), 0.1, rng), 0.05, rng))]
    rows: list[dict[str, Any]] = []
    for name, images in conditions:
        results = score_geneval(images, records)
        row: dict[str, Any] = {"condition": name}
        for tag in ALL_TAGS:
            hits = [r["correct"] for r, rec in zip(results, records, strict=True) if rec["tag"] == tag]
            row[tag] = float(np.mean(hits))
        row["geneval"] = float(np.mean([row[t] for t in GENEVAL_TAGS]))
        row["quality"] = float(np.mean(score_quality(images)))
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "condition"]
    lines = ["| condition | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['condition']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in rows]
    return "\n".join(lines)


__all__ = [
    "blur",
    "gaussian_noise",
    "noise_sweep",
    "quality_score",
    "quality_terms",
    "score_quality",
    "speckle",
]

if __name__ == "__main__":  # python -m opdkit.shapes.quality [n_per_tag]: print the docs table
    import sys

    print(_markdown(noise_sweep(int(sys.argv[1]) if len(sys.argv) > 1 else 50)))
