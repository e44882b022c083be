"""Preference and quality rewards: PickScore, CLIPScore, LAION Aesthetic, HPSv2.1, ImageReward.

Each reward is the benchmark's scorer of the same name (:mod:`opdkit.scoring.preference.builders`,
weights from a local path or a hub id, see :mod:`opdkit.scoring.weights`) with ``score`` = ``scale``
x the model's raw output, which is logged beside it. A reward takes its builder's parameters
(weights, ``device``: ``auto`` is the current CUDA device, else CPU; ``dtype``: ``float32``,
``float16``, ``bfloat16``; ``batch_size``: images per forward pass) plus ``scale``. Heavy imports
happen when the scorer is built (``opdkit list`` imports no torch).
"""

from __future__ import annotations

from typing import Any

from opdkit.registry import rewards, with_params_of
from opdkit.scoring.preference import CLIPSCORE_SCALE, PICKSCORE_REWARD_SCALE
from opdkit.scoring.preference.builders import (
    build_aesthetic,
    build_clipscore,
    build_hpsv2,
    build_imagereward,
    build_pickscore,
)
from opdkit.scoring.scorer import Scorer, WithScore


@rewards.register("pickscore")
@with_params_of(build_pickscore)
def pickscore(scale: float = PICKSCORE_REWARD_SCALE, **model: Any) -> Scorer:
    """PickScore_v1: exp(logit_scale) * cos(image, text), times ``scale`` (1/26, as flow_grpo)."""
    return WithScore(build_pickscore(**model), "logit", scale, keep={"pickscore": "logit"})


@rewards.register("clipscore")
@with_params_of(build_clipscore)
def clipscore(scale: float = CLIPSCORE_SCALE, **model: Any) -> Scorer:
    """CLIP ViT-L/14 image-text agreement: logits_per_image / 100."""
    return WithScore(build_clipscore(**model), "logit", scale, keep={"clip_logit": "logit"})


@rewards.register("aesthetic")
@with_params_of(build_aesthetic)
def aesthetic(scale: float = 1.0, **model: Any) -> Scorer:
    """LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) on CLIP ViT-L/14, ~1-10."""
    return WithScore(build_aesthetic(**model), "aesthetic", scale, keep={"aesthetic": "aesthetic"})


@rewards.register("hpsv2")
@with_params_of(build_hpsv2)
def hpsv2(scale: float = 1.0, **model: Any) -> Scorer:
    """HPSv2.1 (``version`` v2.1 by default): the raw cosine of the HPS-tuned ViT-H/14."""
    return WithScore(build_hpsv2(**model), "cosine", scale, keep={"hps_cosine": "cosine"})


@rewards.register("imagereward")
@with_params_of(build_imagereward)
def imagereward(scale: float = 1.0, **model: Any) -> Scorer:
    """ImageReward-v1.0 with its fixed output normalisation (mean 0.1672, std 1.0333)."""
    return WithScore(build_imagereward(**model), "imagereward", scale, keep={"imagereward": "imagereward"})
