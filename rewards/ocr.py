"""The OCR training reward (Flow-GRPO): 1 - capped edit distance / length of the quoted text, read by an OCR engine.

Shares the engine and metric with the ``ocr`` benchmark through :class:`opdkit.ocr_engines.OcrScorer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdkit.registry import rewards

if TYPE_CHECKING:
    import torch


@rewards.register("ocr")
def ocr(engine: str = "rapidocr", threads: int | None = None) -> Any:
    """OCR reward in [0, 1] (flow_grpo's metric) with the rapidocr PP-OCRv4 engine by default; exact match logged.

    The target is each metadata record's ``text``, else the text inside the prompt's first
    double quotes.

    Returns:
        ``reward(images (B, 3, H, W) in [0, 1], prompts, metadata) -> {"score", "exact"}``.
    """
    from opdkit.ocr_engines import OcrScorer

    scorer = OcrScorer(engine, {"threads": threads} if engine == "rapidocr" else {})

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        from opdkit.detectors import to_uint8_images

        records = [{**(m or {}), "prompt": p} for p, m in zip(prompts, metadata, strict=True)]
        results = scorer(to_uint8_images(images), records)
        return {key: torch.tensor([r[key] for r in results], dtype=torch.float32) for key in ("score", "exact")}

    return reward
