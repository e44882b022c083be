"""The shapes world's scorers: its exact detector, glyph reader and quality measure behind the one signature.

How a shapes image is read belongs to the shapes world (:mod:`opdkit.shapes.detect`,
:mod:`opdkit.shapes.quality`), beside the renderer that draws it; this module only puts those
readers behind :data:`opdkit.scoring.scorer.Scorer`, so the ``shapes_*`` rewards and the
``shapes-*`` benchmarks are views of the same three scorers. The shapes modules are imported on
the first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdkit.scoring.scorer import Scores, stack_results, to_uint8_images

if TYPE_CHECKING:
    import torch

__all__ = ["score_shapes_geneval", "score_shapes_ocr", "score_shapes_quality"]


def score_shapes_geneval(images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> Scores:
    """GenEval verdicts from the exact shapes detector: ``{"correct", "strict", "partial"}``, float32 ``(N,)``.

    As :func:`opdkit.shapes.detect.score_geneval`: official verdict, Flow-GRPO's exact-count
    verdict and partial credit (an ``ocr`` record is read instead). The prompts are not read.
    """
    from opdkit.shapes.detect import score_geneval

    return stack_results(score_geneval(to_uint8_images(images), records), ("correct", "strict", "partial"))


def score_shapes_ocr(images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> Scores:
    """flow_grpo's OCR reward of the glyph reader's reading: ``{"score"}`` in [0, 1], float32 ``(N,)``.

    The target is each record's ``text``, else the quoted text of its ``prompt``.
    """
    import torch

    from opdkit.shapes.detect import score_ocr

    return {"score": torch.tensor(score_ocr(to_uint8_images(images), records), dtype=torch.float32)}


def score_shapes_quality(images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> Scores:
    """Task-agnostic image quality: ``{"score"}`` in [0, 1], float32 ``(N,)``; prompts and records are not read."""
    import torch

    from opdkit.shapes.quality import score_quality

    return {"score": torch.tensor(score_quality(to_uint8_images(images)), dtype=torch.float32)}
