"""The GenEval scorer: a detector and a colour classifier joined to the rules, for rewards and benchmarks.

:class:`GenEvalScorer` runs a ``detector`` plug-in (:mod:`opdkit.scoring.detectors`), asks a
``color_classifier`` plug-in (:mod:`opdkit.scoring.colors`) about colours, and applies
:func:`~opdkit.scoring.geneval.judge` (official), :func:`~opdkit.scoring.geneval.judge_exact`
(Flow-GRPO's strict) and :func:`~opdkit.scoring.geneval.partial_credit`. The ``geneval``
benchmark and the ``geneval`` reward both make it with :func:`geneval_scorer`, from the same
parameters, so they cannot drift apart. A module of its own: the rules stay free of models, and
the two plug-in kinds it joins are swapped independently of each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from opdkit.errors import OpdkitError
from opdkit.registry import color_classifiers, detectors
from opdkit.scoring.colors import DEFAULT_CLIP
from opdkit.scoring.detectors import DEFAULT_MASK2FORMER, MMDET_CHECKPOINT_URL, MMDET_CONFIG, Detector
from opdkit.scoring.geneval import (
    ColorClassifier,
    Detection,
    Detections,
    GenEvalConfig,
    judge,
    judge_exact,
    partial_credit,
)
from opdkit.scoring.scorer import Scores, stack_results, to_uint8_images
from opdkit.scoring.weights import resolve_pretrained

if TYPE_CHECKING:
    import torch

__all__ = ["GenEvalScorer", "geneval_scorer"]


class GenEvalScorer:
    """Detections -> official verdict, strict verdict and partial credit, for batches of images.

    Weights are checked when the scorer is made (so a missing model fails before any image is
    generated) and loaded on first use.

    Args:
        detector: a ``detector`` plug-in: ``mask2former`` (default), ``mmdet``, another registered
            name, ``module.path:function`` or ``./file.py:function``.
        detector_params: keyword arguments of the detector builder.
        color: a ``color_classifier`` plug-in: ``clip`` (default), another registered name,
            ``module.path:function`` or ``./file.py:function``.
        color_params: keyword arguments of the colour classifier builder.
        config: GenEval thresholds (upstream defaults: 0.3 / 0.9 counting / 16 / NMS off / 0.1).
    """

    def __init__(
        self,
        detector: str = "mask2former",
        detector_params: Mapping[str, Any] | None = None,
        color: str = "clip",
        color_params: Mapping[str, Any] | None = None,
        config: GenEvalConfig = GenEvalConfig(),
    ) -> None:
        self.detector_name = detector
        self.detector_params = dict(detector_params or {})
        self.color_name = color
        self.color_params = dict(color_params or {})
        self.config = config
        self.chunk = 8  # images detected and judged together
        self._detect: Detector | None = None
        self._classify: ColorClassifier | None = None
        # Fail early, load late: a missing weight directory is reported before generation.
        if detector == "mask2former":
            resolve_pretrained(str(self.detector_params.get("model", DEFAULT_MASK2FORMER)), "the Mask2Former detector", "detector_model")
        elif detector == "mmdet":
            import importlib.util

            if importlib.util.find_spec("mmdet") is None:
                raise OpdkitError(
                    "detector 'mmdet' needs mmdetection 3.3 with mmcv 2.1.0 built from source; see docs/geneval.md, "
                    "or use the default detector=mask2former"
                )
            ckpt = self.detector_params.get("checkpoint")
            if ckpt is None or not Path(str(ckpt)).expanduser().is_file():
                raise OpdkitError(f"detector 'mmdet' needs --param mmdet_checkpoint=PATH: download {MMDET_CHECKPOINT_URL}")
        if color == "clip":
            resolve_pretrained(str(self.color_params.get("model", DEFAULT_CLIP)), "the CLIP colour classifier", "clip_model")

    @property
    def engine(self) -> str:
        """Human-readable name of the detector and colour models, for result files."""

        def short(spec: Any, default: str) -> str:
            text = str(spec or default)
            return Path(text).name if Path(text).expanduser().exists() else text

        if self.detector_name == "mask2former":
            det = f"mask2former ({short(self.detector_params.get('model'), DEFAULT_MASK2FORMER)})"
        elif self.detector_name == "mmdet":
            det = f"mmdet ({Path(str(self.detector_params.get('config') or MMDET_CONFIG)).stem})"
        else:
            det = self.detector_name
        col = f"clip ({short(self.color_params.get('model'), DEFAULT_CLIP)})" if self.color_name == "clip" else self.color_name
        return f"{det} + {col}"

    def _classifier(self) -> ColorClassifier:
        if self._classify is None:
            self._classify = color_classifiers.build(self.color_name, self.color_params)
        return self._classify

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Run the detector: one ``class -> detections`` dict per ``(H, W, 3)`` uint8 image."""
        if self._detect is None:
            self._detect = detectors.build(self.detector_name, self.detector_params)
        return self._detect(images)

    def judge_detections(
        self, image: np.ndarray, detections: Detections, record: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Verdicts of one image from its detections (no detector call).

        Returns:
            ``{"correct": 0/1 official verdict, "strict": 0/1 Flow-GRPO exact-count verdict,
            "partial": Flow-GRPO partial credit (<= 1, may be negative), "reason": str}``.
        """
        colour_cache: dict[tuple[Any, ...], str] = {}

        def cached_colour(img: np.ndarray, det: Detection, name: str) -> str:
            # the three rules each ask for the same colours: classify every object once
            key = (name, det.box, det.score)
            if key not in colour_cache:
                colour_cache[key] = self._classifier()(img, det, name)
            return colour_cache[key]

        # Only detections above the lowest threshold can matter; dropping the rest early keeps
        # their masks out of memory during judging.
        floor = min(self.config.threshold, self.config.counting_threshold)
        kept = {name: [d for d in dets if d.score > floor] for name, dets in detections.items()}
        verdict = judge(record, kept, image=image, classify_color=cached_colour, config=self.config)
        strict = judge_exact(record, kept, image=image, classify_color=cached_colour, config=self.config)
        partial = partial_credit(record, kept, image=image, classify_color=cached_colour, config=self.config)
        return {
            "correct": float(verdict.correct),
            "strict": float(strict.correct),
            "partial": float(partial),
            "reason": verdict.reason,
        }

    def judge_batch(self, images: np.ndarray | Sequence[np.ndarray], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Verdicts of a batch: ``images`` ``(B, H, W, 3)`` uint8 RGB, ``records`` GenEval metadata.

        Returns:
            One dict per image, as :meth:`judge_detections`.
        """
        if len(images) != len(records):
            raise ValueError(f"got {len(images)} images for {len(records)} records")
        out: list[dict[str, Any]] = []
        # a few images at a time: each carries up to 100 full-size masks until it is judged
        for start in range(0, len(images), self.chunk):
            chunk = list(images[start : start + self.chunk])
            found = self.detect(chunk)
            out += [
                self.judge_detections(im, dets, rec)
                for im, dets, rec in zip(chunk, found, records[start : start + self.chunk], strict=True)
            ]
        return out

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> Scores:
        """The scorer: ``{"correct", "strict", "partial"}``, each float32 ``(N,)``, for images in [0, 1].

        ``records`` carry the GenEval metadata (``tag``, ``include``, ``exclude``); the prompts are
        not read (the metadata says what the image must show).
        """
        return stack_results(self.judge_batch(to_uint8_images(images), records), ("correct", "strict", "partial"))


def geneval_scorer(
    detector: str = "mask2former",
    detector_model: str | None = None,
    mmdet_config: str | None = None,
    mmdet_checkpoint: str | None = None,
    color: str = "clip",
    clip_model: str | None = None,
    device: str | None = None,
) -> GenEvalScorer:
    """A :class:`GenEvalScorer` from the parameters the ``geneval`` reward and benchmark share.

    Args:
        detector: ``mask2former`` (transformers, default), ``mmdet`` (official checkpoint), another
            registered detector or ``module.path:function``.
        detector_model: Mask2Former directory or hub id (default
            ``facebook/mask2former-swin-small-coco-instance``).
        mmdet_config, mmdet_checkpoint: config and ``.pth`` for ``detector=mmdet``.
        color: colour classifier: ``clip`` (default), another registered one or ``module.path:function``.
        clip_model: CLIP directory or hub id (default ``openai/clip-vit-large-patch14``).
        device: where the detector and CLIP run (default cuda when available).
    """
    # the built-ins take the device and their weights; a plug-in of the user's takes no parameters
    detector_params: dict[str, Any] = {"device": device} if detector in ("mask2former", "mmdet") else {}
    if detector == "mask2former" and detector_model is not None:
        detector_params["model"] = detector_model
    if detector == "mmdet":
        detector_params.update(config=mmdet_config, checkpoint=mmdet_checkpoint)
    color_params: dict[str, Any] = {"device": device} if color == "clip" else {}
    if color == "clip" and clip_model is not None:
        color_params["model"] = clip_model
    return GenEvalScorer(detector=detector, detector_params=detector_params, color=color, color_params=color_params)
