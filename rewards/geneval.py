"""The GenEval training reward (Flow-GRPO): partial credit from detections, official and strict verdicts logged.

The same scorer as the ``geneval`` benchmark (:func:`opdkit.scoring.geneval_scorer.geneval_scorer`),
ranked by another of its measurements. The prompt records must carry GenEval metadata (``tag``,
``include``, ``exclude``), e.g. a prompts dataset read from GenEval-style JSONL.
"""

from __future__ import annotations

from typing import Any

from opdkit.registry import rewards, with_params_of
from opdkit.scoring.geneval_scorer import geneval_scorer
from opdkit.scoring.scorer import Scorer, WithScore


@rewards.register("geneval")
@with_params_of(geneval_scorer)
def geneval(strict: bool = False, clamp: bool = False, **scorer: Any) -> Scorer:
    """GenEval reward: Flow-GRPO partial credit (or the strict verdict if ``strict``); official/strict logged.

    Args:
        strict: reward = Flow-GRPO's exact-count verdict (0/1) instead of partial credit.
        clamp: clamp partial credit at 0 (upstream lets too many objects go negative).
        scorer: the detector and colour parameters of :func:`~opdkit.scoring.geneval_scorer.geneval_scorer`
            (``detector``, ``detector_model``, ``mmdet_config``, ``mmdet_checkpoint``, ``color``,
            ``clip_model``, ``device``), as the ``geneval`` benchmark.

    Returns:
        ``reward(images (B, 3, H, W) in [0, 1], prompts, metadata) -> {"score", "partial",
        "strict", "correct"}``, each a float tensor (B,).
    """
    key = "strict" if strict else "partial"
    return WithScore(geneval_scorer(**scorer), key, keep=("partial", "strict", "correct"), floor=0.0 if clamp else None)
