"""Scoring rules shared by rewards and benchmarks (GenEval verdicts, the OCR metric).

Part of the engine's base: pure Python/numpy, no model, no torch, so a reward plug-in and a
benchmark plug-in can both import it without importing each other.
"""

from __future__ import annotations

from opdkit.scoring.geneval import (
    GENEVAL_COLORS,
    GENEVAL_TAGS,
    RELATIONS,
    ColorClassifier,
    Detection,
    Detections,
    GenEvalConfig,
    Verdict,
    filter_detections,
    judge,
    judge_exact,
    partial_credit,
    relative_position,
    summarize,
)
from opdkit.scoring.ocr import levenshtein, normalize_ocr_text, ocr_reward, ocr_target

__all__ = [
    "GENEVAL_COLORS",
    "GENEVAL_TAGS",
    "RELATIONS",
    "ColorClassifier",
    "Detection",
    "Detections",
    "GenEvalConfig",
    "Verdict",
    "filter_detections",
    "judge",
    "judge_exact",
    "levenshtein",
    "normalize_ocr_text",
    "ocr_reward",
    "ocr_target",
    "partial_credit",
    "relative_position",
    "summarize",
]
