"""The OCR scorer: an ``ocr_engine`` plug-in's reading scored by flow_grpo's metric, for rewards and benchmarks.

The ``ocr`` benchmark and the ``ocr`` reward both make it with :func:`ocr_scorer`, so they read
and score alike. Apart from the engines (:mod:`opdkit.scoring.ocr_engines`: which program reads)
and the metric (:mod:`opdkit.scoring.ocr`: pure Python), because it joins the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from opdkit.registry import ocr_engines
from opdkit.scoring.ocr import ocr_reward, ocr_target
from opdkit.scoring.ocr_engines import OcrEngine, check_engine
from opdkit.scoring.scorer import Scores, stack_results, to_uint8_images

if TYPE_CHECKING:
    import torch

__all__ = ["OcrScorer", "ocr_scorer"]


class OcrScorer:
    """flow_grpo's OCR metric on what an engine reads; the engine is built on first use.

    Args:
        engine: an ``ocr_engine`` plug-in: ``rapidocr``, another registered name,
            ``module.path:function`` or ``./file.py:function``.
        engine_params: keyword arguments of the engine builder.
    """

    def __init__(self, engine: str = "rapidocr", engine_params: Mapping[str, Any] | None = None) -> None:
        check_engine(engine)
        self.engine_name = engine
        self.engine_params = dict(engine_params or {})
        self._read: OcrEngine | None = None

    @property
    def engine(self) -> str:
        """Engine name for result files."""
        return "rapidocr (PP-OCRv4 onnx)" if self.engine_name == "rapidocr" else self.engine_name

    def read(self, image: np.ndarray) -> str:
        """The text the engine reads in one ``(H, W, 3)`` uint8 RGB image."""
        if self._read is None:
            self._read = ocr_engines.build(self.engine_name, self.engine_params)
        return self._read(image)

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> Scores:
        """The scorer: ``{"score": reward in [0, 1], "exact": 1.0 if the whole target was read}``, float32 ``(N,)``.

        The target is ``record["text"]``, else the text inside the prompt's first double quotes.
        """
        if len(images) != len(records):
            raise ValueError(f"got {len(images)} images for {len(records)} records")
        results = []
        for image, prompt, record in zip(to_uint8_images(images), prompts, records, strict=True):
            record = record or {}
            target = str(record["text"]) if "text" in record else ocr_target(str(prompt))
            score = ocr_reward(self.read(image), target)
            results.append({"score": float(score), "exact": float(score == 1.0)})
        return stack_results(results, ("score", "exact"))


def ocr_scorer(engine: str = "rapidocr", threads: int | None = None) -> OcrScorer:
    """An :class:`OcrScorer`; ``threads`` (onnxruntime threads) goes to the built-in ``rapidocr`` only."""
    return OcrScorer(engine, {"threads": threads} if engine == "rapidocr" else {})
