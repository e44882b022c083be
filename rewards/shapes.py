"""Rewards of the shapes world, computed by its exact detector, glyph reader and quality measure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdkit.registry import rewards

if TYPE_CHECKING:
    import torch

RewardOutput = dict[str, "torch.Tensor"]


def to_uint8_hwc(images: torch.Tensor) -> Any:
    """(B, 3, H, W) float in [0, 1] -> numpy (B, H, W, 3) uint8, the detectors' input."""
    import torch

    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@rewards.register("shapes_geneval")
def shapes_geneval(strict: bool = False) -> Any:
    """GenEval on shapes: flow_grpo partial credit (or the strict verdict if ``strict``); both logged."""
    import torch

    from opdkit.shapes.detect import score_geneval

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        results = score_geneval(to_uint8_hwc(images), metadata)
        partial = torch.tensor([r["partial"] for r in results], dtype=torch.float32)
        correct = torch.tensor([float(r["correct"]) for r in results], dtype=torch.float32)
        return {"score": correct if strict else partial, "partial": partial, "strict": correct}

    return reward


@rewards.register("shapes_ocr")
def shapes_ocr() -> Any:
    """OCR on shapes: glyph reader + flow_grpo's OCR reward (1 - capped edit distance / length)."""
    import torch

    from opdkit.shapes.detect import score_ocr

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return {"score": torch.tensor(score_ocr(to_uint8_hwc(images), metadata), dtype=torch.float32)}

    return reward


@rewards.register("shapes_quality")
def shapes_quality() -> Any:
    """Task-agnostic quality in [0, 1] (clean background, pure fills, sharp edges): plays PickScore."""
    import torch

    from opdkit.shapes.quality import score_quality

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return {"score": torch.tensor(score_quality(to_uint8_hwc(images)), dtype=torch.float32)}

    return reward
