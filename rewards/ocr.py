"""The OCR training reward (Flow-GRPO): 1 - capped edit distance / length of the quoted text, read by an OCR engine.

The same scorer as the ``ocr`` benchmark (:func:`opdkit.scoring.ocr_scorer.ocr_scorer`).
"""

from __future__ import annotations

from opdkit.registry import rewards
from opdkit.scoring.scorer import Scorer


@rewards.register("ocr")
def ocr(engine: str = "rapidocr", threads: int | None = None) -> Scorer:
    """OCR reward in [0, 1] (flow_grpo's metric) with the rapidocr PP-OCRv4 engine by default; exact match logged.

    The target is each metadata record's ``text``, else the text inside the prompt's first
    double quotes. ``engine``: an ``ocr_engine`` plug-in; ``threads``: rapidocr's onnxruntime threads.

    Returns:
        ``reward(images (B, 3, H, W) in [0, 1], prompts, metadata) -> {"score", "exact"}``.
    """
    from opdkit.scoring.ocr_scorer import ocr_scorer

    return ocr_scorer(engine, threads)
