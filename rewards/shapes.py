"""Rewards of the shapes world, computed by its exact detector, glyph reader and quality measure.

The same scorers as the ``shapes-*`` benchmarks (:mod:`opdkit.scoring.shapes`).
"""

from __future__ import annotations

from opdkit.registry import rewards
from opdkit.scoring.scorer import Scorer, WithScore
from opdkit.scoring.shapes import score_shapes_geneval, score_shapes_ocr, score_shapes_quality


@rewards.register("shapes_geneval")
def shapes_geneval(strict: bool = False) -> Scorer:
    """GenEval on shapes: flow_grpo partial credit (or the strict verdict if ``strict``); both logged."""
    # "strict" here logs the official verdict, which is what `strict: true` trains on
    key = "correct" if strict else "partial"
    return WithScore(score_shapes_geneval, key, keep={"partial": "partial", "strict": "correct"})


@rewards.register("shapes_ocr")
def shapes_ocr() -> Scorer:
    """OCR on shapes: glyph reader + flow_grpo's OCR reward (1 - capped edit distance / length)."""
    return score_shapes_ocr


@rewards.register("shapes_quality")
def shapes_quality() -> Scorer:
    """Task-agnostic quality in [0, 1] (clean background, pure fills, sharp edges): plays PickScore."""
    return score_shapes_quality
