"""Scoring: every rule and model that turns a generated image into numbers, for rewards and benchmarks alike.

Split by concept, so a reward and a benchmark of the same task share one scorer and a model can be
swapped without touching a rule:

- :mod:`~opdkit.scoring.scorer`: the one scorer signature
  ``(images (N, 3, H, W) in [0, 1], prompts, records) -> {name: Tensor (N,)}`` and its adapters;
- :mod:`~opdkit.scoring.geneval`: GenEval's rules (official verdict, Flow-GRPO's strict verdict and
  partial credit), pure numpy;
- :mod:`~opdkit.scoring.detectors`, :mod:`~opdkit.scoring.colors`: the ``detector`` and
  ``color_classifier`` plug-in kinds (Mask2Former, mmdet; CLIP);
- :mod:`~opdkit.scoring.geneval_scorer`: detector + colour classifier + rules;
- :mod:`~opdkit.scoring.ocr`: flow_grpo's OCR metric, pure Python;
  :mod:`~opdkit.scoring.ocr_engines`: the ``ocr_engine`` plug-in kind (rapidocr);
  :mod:`~opdkit.scoring.ocr_scorer`: engine + metric;
- :mod:`~opdkit.scoring.preference`: PickScore, CLIPScore, Aesthetic, HPSv2.1, ImageReward;
- :mod:`~opdkit.scoring.shapes`: the shapes world's readers behind the scorer signature;
- :mod:`~opdkit.scoring.weights`: where every model's weights come from.

Importing this package (and the rules it re-exports below) loads no model and no torch; the model
modules import torch, transformers and the optional engines inside their builders.
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
