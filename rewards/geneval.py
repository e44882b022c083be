"""The GenEval training reward (Flow-GRPO): partial credit from detections, official and strict verdicts logged.

Shares the detector, colour classifier and rules with the ``geneval`` benchmark through
:class:`opdkit.detectors.GenEvalScorer`. The prompt records must carry GenEval metadata
(``tag``, ``include``, ``exclude``), e.g. a prompts dataset read from GenEval-style JSONL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdkit.registry import rewards

if TYPE_CHECKING:
    import torch


@rewards.register("geneval")
def geneval(
    strict: bool = False,
    clamp: bool = False,
    detector: str = "mask2former",
    detector_model: str | None = None,
    mmdet_config: str | None = None,
    mmdet_checkpoint: str | None = None,
    color: str = "clip",
    clip_model: str | None = None,
    device: str | None = None,
) -> Any:
    """GenEval reward: Flow-GRPO partial credit (or the strict verdict if ``strict``); official/strict logged.

    Args:
        strict: reward = Flow-GRPO's exact-count verdict (0/1) instead of partial credit.
        clamp: clamp partial credit at 0 (upstream lets too many objects go negative).
        detector, detector_model, mmdet_config, mmdet_checkpoint, color, clip_model, device: as the
            ``geneval`` benchmark.

    Returns:
        ``reward(images (B, 3, H, W) in [0, 1], prompts, metadata) -> {"score", "partial",
        "strict", "correct"}``, each a float tensor (B,).
    """
    from opdkit.detectors import GenEvalScorer

    detector_params: dict[str, Any] = {"device": device} if detector in ("mask2former", "mmdet") else {}
    if detector == "mask2former" and detector_model is not None:
        detector_params["model"] = detector_model
    if detector == "mmdet":
        detector_params.update(config=mmdet_config, checkpoint=mmdet_checkpoint)
    color_params: dict[str, Any] = {"device": device} if color == "clip" else {}
    if color == "clip" and clip_model is not None:
        color_params["model"] = clip_model
    scorer = GenEvalScorer(detector=detector, detector_params=detector_params, color=color, color_params=color_params)

    def reward(images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        from opdkit.detectors import to_uint8_images

        results = scorer(to_uint8_images(images), metadata)
        out = {key: torch.tensor([r[key] for r in results], dtype=torch.float32) for key in ("partial", "strict", "correct")}
        partial = out["partial"].clamp_min(0.0) if clamp else out["partial"]
        return {"score": out["strict"] if strict else partial, **out}

    return reward
