"""Preference and quality rewards: PickScore, CLIPScore, LAION Aesthetic, HPSv2.1, ImageReward.

Each builder loads its model once (weights from a local path or a hub id; see
:mod:`opdkit.scoring.weights`) and returns ``(images (B, 3, H, W) in [0, 1], prompts, metadata)
-> {"score": (B,), ...}``. ``score`` is the training reward; the raw model output is logged
beside it. Heavy imports happen inside the builders (``opdkit list`` imports no torch).

Common parameters: ``device`` (``auto``: the current CUDA device, else CPU), ``dtype``
(``float32``, ``float16``, ``bfloat16``) and ``batch_size`` (images per forward pass).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdkit.registry import rewards
from opdkit.scoring.preference import (
    BERT_BASE_UNCASED,
    CLIPSCORE_SCALE,
    IMAGEREWARD_CHECKPOINT,
    LAION_VIT_H14,
    OPENAI_VIT_L14,
    PICKSCORE_MODEL,
    PICKSCORE_REWARD_SCALE,
)

if TYPE_CHECKING:
    import torch

RewardFn = Any  # (images, prompts, metadata) -> dict[str, torch.Tensor]


def _reward(scorer: Any, key: str, scale: float, raw_name: str) -> RewardFn:
    """Wrap a scorer: ``score = scale * scorer[key]``; the raw value is logged as ``raw_name``."""

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raw = scorer(images, list(prompts))[key]
        return {"score": raw * scale, raw_name: raw}

    reward.engine = scorer.engine  # type: ignore[attr-defined]
    return reward


@rewards.register("pickscore")
def pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str = LAION_VIT_H14,
    scale: float = PICKSCORE_REWARD_SCALE,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> RewardFn:
    """PickScore_v1: exp(logit_scale) * cos(image, text), times ``scale`` (1/26, as flow_grpo)."""
    from opdkit.scoring.preference.scorers import build_pickscore

    return _reward(build_pickscore(model, processor, device, dtype, batch_size), "logit", scale, "pickscore")


@rewards.register("clipscore")
def clipscore(
    model: str = OPENAI_VIT_L14,
    processor: str | None = None,
    scale: float = CLIPSCORE_SCALE,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> RewardFn:
    """CLIP ViT-L/14 image-text agreement: logits_per_image / 100."""
    from opdkit.scoring.preference.scorers import build_clipscore

    return _reward(build_clipscore(model, processor, device, dtype, batch_size), "logit", scale, "clip_logit")


@rewards.register("aesthetic")
def aesthetic(
    predictor: str | None = None,
    clip: str = OPENAI_VIT_L14,
    processor: str | None = None,
    scale: float = 1.0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> RewardFn:
    """LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) on CLIP ViT-L/14, ~1-10."""
    from opdkit.scoring.preference.scorers import build_aesthetic

    return _reward(build_aesthetic(predictor, clip, processor, device, dtype, batch_size), "aesthetic", scale, "aesthetic")


@rewards.register("hpsv2")
def hpsv2(
    checkpoint: str | None = None,
    version: str = "v2.1",
    tokenizer: str = LAION_VIT_H14,
    backend: str = "opdkit",
    scale: float = 1.0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> RewardFn:
    """HPSv2.1 (``version`` v2.1 by default): the raw cosine of the HPS-tuned ViT-H/14."""
    from opdkit.scoring.preference.scorers import build_hpsv2

    scorer = build_hpsv2(checkpoint, version, tokenizer, backend, device, dtype, batch_size)
    return _reward(scorer, "cosine", scale, "hps_cosine")


@rewards.register("imagereward")
def imagereward(
    checkpoint: str = IMAGEREWARD_CHECKPOINT,
    tokenizer: str = BERT_BASE_UNCASED,
    backend: str = "opdkit",
    med_config: str | None = None,
    scale: float = 1.0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> RewardFn:
    """ImageReward-v1.0 with its fixed output normalisation (mean 0.1672, std 1.0333)."""
    from opdkit.scoring.preference.scorers import build_imagereward

    scorer = build_imagereward(checkpoint, tokenizer, backend, med_config, device, dtype, batch_size)
    return _reward(scorer, "imagereward", scale, "imagereward")
