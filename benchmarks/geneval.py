"""GenEval (djghosh13/geneval): 553 compositional prompts, 4 images each, scored by object detection.

The official protocol (DESIGN.md §6): a Mask2Former COCO instance detector, detections kept with
score > 0.3 (> 0.9 for counting prompts), at most 16 per class, no NMS; colours by CLIP ViT-L/14
zero-shot on the masked, cropped object; relative position with a 0.1 size margin. Per-tag
accuracy and the unweighted mean over the six tags ("overall"). The rules live in
:mod:`opdkit.scoring.geneval`, the detector and colour plug-ins in :mod:`opdkit.detectors`.

The prompt metadata is not shipped: pass ``--param metadata=PATH`` (GenEval's
``prompts/evaluation_metadata.jsonl``) or ``--param download=true`` (sha256-pinned, cached).
"""

from __future__ import annotations

from typing import Any

from opdkit.eval.benchmark import Benchmark
from opdkit.registry import benchmarks

PROTOCOL_VERSION = "1"


@benchmarks.register("geneval")
def geneval_bench(
    metadata: str | None = None,
    download: bool = False,
    samples_per_prompt: int = 4,
    detector: str = "mask2former",
    detector_model: str | None = None,
    mmdet_config: str | None = None,
    mmdet_checkpoint: str | None = None,
    color: str = "clip",
    clip_model: str | None = None,
    device: str | None = None,
    resolution: int = 512,
    steps: int = 40,
    cfg: float = 4.5,
) -> Benchmark:
    """GenEval, official protocol: 553 prompts x 4 images, Mask2Former + CLIP colour, per-tag accuracy.

    Args:
        metadata: path to GenEval's ``evaluation_metadata.jsonl`` (else the cache, see ``download``).
        download: fetch the metadata into the cache (``$OPDKIT_CACHE``), verified by sha256.
        samples_per_prompt: images per prompt (4 upstream).
        detector: ``mask2former`` (transformers, default), ``mmdet`` (official checkpoint) or
            ``module.path:function``.
        detector_model: Mask2Former directory or hub id (default
            ``facebook/mask2former-swin-small-coco-instance``).
        mmdet_config, mmdet_checkpoint: config and ``.pth`` for ``detector=mmdet``.
        color: colour classifier: ``clip`` (default) or ``module.path:function``.
        clip_model: CLIP directory or hub id (default ``openai/clip-vit-large-patch14``).
        device: where the detector and CLIP run (default cuda when available).
        resolution, steps, cfg: sampler defaults (SD3.5-M: 512 px, 40 steps, CFG 4.5).
    """
    from opdkit.data.sources import load_geneval_metadata
    from opdkit.detectors import GenEvalScorer, to_uint8_images
    from opdkit.scoring.geneval import summarize

    records, located = load_geneval_metadata(metadata, download)
    detector_params: dict[str, Any] = {"device": device} if detector in ("mask2former", "mmdet") else {}
    if detector == "mask2former" and detector_model is not None:
        detector_params["model"] = detector_model
    if detector == "mmdet":
        detector_params.update(config=mmdet_config, checkpoint=mmdet_checkpoint)
    color_params: dict[str, Any] = {"device": device} if color == "clip" else {}
    if color == "clip" and clip_model is not None:
        color_params["model"] = clip_model
    scorer = GenEvalScorer(detector=detector, detector_params=detector_params, color=color, color_params=color_params)

    def score(images: Any, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        results = scorer(to_uint8_images(images), batch)
        # score = the official verdict (what GenEval reports); Flow-GRPO's two variants ride along
        return {
            "score": torch.tensor([r["correct"] for r in results], dtype=torch.float32),
            "strict": torch.tensor([r["strict"] for r in results], dtype=torch.float32),
            "partial": torch.tensor([r["partial"] for r in results], dtype=torch.float32),
        }

    def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
        return summarize([{"tag": r["tag"], "correct": r["score"]} for r in rows])

    prompt_set = "" if located.official else f"+prompts-sha256:{located.sha256[:12]}"
    return Benchmark(
        name="geneval",
        world="sd3",
        prompts=records,
        samples_per_prompt=samples_per_prompt,
        score=score,
        summarize=summarize_rows,
        sampler={"steps": steps, "cfg": cfg, "resolution": resolution, "shift": None},
        protocol=f"geneval-official/{PROTOCOL_VERSION}{prompt_set}",
        engine=scorer.engine,
        family="GenEval",
    )
