"""The ``detector`` plug-in kind: images -> GenEval detections; built-ins ``mask2former`` and ``mmdet``.

A detector is made by a builder (registered with ``@detectors.register(name)`` in
:mod:`opdkit.registry`, or named as ``module.path:function`` / ``./file.py:function``) and turns
images into what the GenEval rules (:mod:`opdkit.scoring.geneval`) consume::

    detect(images: Sequence[(H, W, 3) uint8 RGB]) -> list[Detections]   # one per image, boxes in pixels

Built-ins: ``mask2former`` (transformers' ``Mask2FormerForUniversalSegmentation``, COCO instance
weights from a local directory or a hub id; the default) and ``mmdet`` (the official GenEval
checkpoint through mmdetection 3.x; optional, see docs/geneval.md). A module of its own because
detectors are swapped independently of the colour classifier (:mod:`opdkit.scoring.colors`) and
of the scorer that joins them (:mod:`opdkit.scoring.geneval_scorer`); torch, transformers and
mmdet are imported inside the builders, so ``opdkit list`` imports none of them.

Upstream facts re-implemented (djghosh13/geneval ``evaluation/evaluate_images.py``; mmdetection
3.x ``MaskFormerFusionHead.instance_postprocess`` and the Mask2Former COCO test pipeline):
images resized so the short side is 800 (long side at most 1333), ImageNet mean/std, padded to a
multiple of 32; per image the top 100 (query, class) pairs by softmax score over the 80 thing
classes; masks = mask logits > 0 at the original resolution; score = class probability x mean
sigmoid inside the mask; box = tight box of the mask with exclusive right/bottom edges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from opdkit.errors import OpdkitError
from opdkit.registry import detectors
from opdkit.scoring.geneval import Detection, Detections
from opdkit.scoring.weights import load_resolved, resolve_device, resolve_pretrained

__all__ = [
    "COCO_CLASSES",
    "DEFAULT_MASK2FORMER",
    "MMDET_CHECKPOINT_URL",
    "MMDET_CONFIG",
    "Detector",
    "build_mask2former_detector",
    "build_mmdet_detector",
    "mask_to_box",
]

Detector = Callable[[Sequence[np.ndarray]], list[Detections]]
"""``images (each (H, W, 3) uint8 RGB) -> one Detections per image`` (boxes in pixels of that image)."""

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""The 80 COCO thing classes in detector index order, spelled as GenEval's ``object_names.txt``
(which is what its metadata's ``class`` fields use: "tv remote", "computer mouse", ...)."""

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
"""Hub id of transformers' Mask2Former Swin-S COCO instance model (the default detector)."""

MMDET_CONFIG = "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"
"""The official detector's mmdetection 3.x config (under ``mmdet/.mim/configs/mask2former/``)."""

MMDET_CHECKPOINT_URL = (
    "https://download.openmmlab.com/mmdetection/v3.0/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/"
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth"
)
"""Where GenEval's ``download_models.sh`` fetches the official checkpoint from."""

# ImageNet statistics in 0..255 RGB: mmdetection's and detectron2's Mask2Former preprocessing.
_PIXEL_MEAN = (123.675, 116.28, 103.53)
_PIXEL_STD = (58.395, 57.12, 57.375)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box ``(x1, y1, x2, y2)`` of a bool ``(H, W)`` mask; right/bottom exclusive (x2 = last + 1).

    An empty mask gives ``(0, 0, 0, 0)`` (mmdetection's ``mask2bbox`` convention).
    """
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0 or rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def _resized_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest scale with short <= short_side and long <= long_side."""
    scale = min(short_side / min(height, width), long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


@detectors.register("mask2former")
def build_mask2former_detector(
    model: str = DEFAULT_MASK2FORMER,
    device: str | None = None,
    short_side: int = 800,
    long_side: int = 1333,
    max_per_image: int = 100,
    batch_size: int = 4,
    class_names: Sequence[str] | None = None,
) -> Detector:
    """Mask2Former instance segmentation through transformers, post-processed as mmdetection does.

    Args:
        model: directory or hub id of a ``Mask2FormerForUniversalSegmentation`` COCO instance
            model (default: Swin-S, the backbone GenEval uses).
        device: ``"cuda"``/``"cpu"``; default cuda when available.
        short_side, long_side: test-time resize (mmdetection's ``Resize(scale=(1333, 800))``).
        max_per_image: (query, class) pairs kept per image before any threshold (100 upstream).
        batch_size: images per forward pass.
        class_names: detector index -> class name; default :data:`COCO_CLASSES` when the model
            has 80 labels, else the model's ``id2label``.

    Returns:
        A :data:`Detector`; each :class:`Detection` carries its ``(H, W)`` bool mask.
    """
    import torch
    import torch.nn.functional as F
    from transformers import Mask2FormerForUniversalSegmentation

    spec = resolve_pretrained(model, "the Mask2Former detector", "detector_model")
    net = load_resolved(Mask2FormerForUniversalSegmentation, spec, "the Mask2Former detector", "detector_model")
    dev = resolve_device(device or "auto")
    net = net.eval().to(dev)
    n_labels = int(net.config.num_labels)
    if class_names is not None:
        names = list(class_names)
    elif n_labels == len(COCO_CLASSES):
        names = list(COCO_CLASSES)
    else:
        names = [str(net.config.id2label[i]) for i in range(n_labels)]
    if len(names) != n_labels:
        raise OpdkitError(f"detector_model {model}: {n_labels} labels but {len(names)} class names")
    mean = torch.tensor(_PIXEL_MEAN, device=dev).view(3, 1, 1)
    std = torch.tensor(_PIXEL_STD, device=dev).view(3, 1, 1)

    def run_batch(images: Sequence[np.ndarray]) -> list[Detections]:
        sizes = [_resized_size(im.shape[0], im.shape[1], short_side, long_side) for im in images]
        pad_h = max(-(-h // 32) * 32 for h, _ in sizes)
        pad_w = max(-(-w // 32) * 32 for _, w in sizes)
        batch = torch.zeros(len(images), 3, pad_h, pad_w, device=dev)
        for i, (im, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            x = torch.from_numpy(np.ascontiguousarray(im)).to(dev).permute(2, 0, 1).float()
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            batch[i, :, :h, :w] = (x - mean) / std  # padding stays 0 after normalising, as mmdet
        with torch.no_grad():
            out = net(pixel_values=batch)
        results: list[Detections] = []
        for i, (im, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            probs = out.class_queries_logits[i].float().softmax(-1)[:, :-1]  # (Q, C): drop "no object"
            k = min(max_per_image, probs.numel())
            top_scores, top_index = probs.flatten().topk(k)
            queries = top_index // probs.shape[1]
            labels = top_index % probs.shape[1]
            # mask logits (Q, H/4, W/4) -> padded input size -> crop the image part -> original size
            logits = out.masks_queries_logits[i].float()[None]
            logits = F.interpolate(logits, size=(pad_h, pad_w), mode="bilinear", align_corners=False)
            logits = logits[:, :, :h, :w]
            logits = F.interpolate(logits, size=im.shape[:2], mode="bilinear", align_corners=False)[0]
            binary = logits > 0
            mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            scores = (top_scores * mask_scores[queries]).cpu().numpy()
            masks = binary.cpu().numpy()
            found: Detections = {}
            for score, q, label in zip(scores, queries.tolist(), labels.tolist(), strict=True):
                mask = masks[q]
                found.setdefault(names[label], []).append(Detection(box=mask_to_box(mask), score=float(score), mask=mask))
            results.append(found)
        return results

    def detect(images: Sequence[np.ndarray]) -> list[Detections]:
        results: list[Detections] = []
        for start in range(0, len(images), batch_size):
            results += run_batch(images[start : start + batch_size])
        return results

    return detect


@detectors.register("mmdet")
def build_mmdet_detector(
    config: str | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Detector:
    """The official GenEval detector: mmdetection 3.x Mask2Former Swin-S COCO instance model.

    Needs the ``mmdet`` extra and mmcv 2.1.0 compiled from source (``mmcv-lite`` lacks the
    ``mmcv._ext`` ops; about 33 minutes on 2 cores): see docs/geneval.md.

    Args:
        config: mmdetection config file; default :data:`MMDET_CONFIG` from mmdet's packaged configs.
        checkpoint: the ``.pth`` from :data:`MMDET_CHECKPOINT_URL` (required).
        device: ``"cuda"``/``"cpu"``; default cuda when available.
        class_names: label index -> name; default :data:`COCO_CLASSES`.
    """
    try:
        import mmdet
        from mmdet.apis import inference_detector, init_detector
    except ImportError as exc:
        raise OpdkitError(
            f"detector 'mmdet' needs mmdetection 3.3 with mmcv 2.1.0 built from source ({exc}); "
            "see docs/geneval.md, or use the default detector=mask2former"
        ) from None
    if checkpoint is None or not Path(checkpoint).expanduser().is_file():
        raise OpdkitError(
            f"detector 'mmdet' needs --param mmdet_checkpoint=PATH: download {MMDET_CHECKPOINT_URL}"
            + (f" ({checkpoint} does not exist)" if checkpoint else "")
        )
    if config is None:
        config = str(Path(mmdet.__file__).parent / ".mim" / "configs" / "mask2former" / MMDET_CONFIG)
    if not Path(config).expanduser().is_file():
        raise OpdkitError(f"mmdet_config={config}: no such file (expected {MMDET_CONFIG})")
    names = list(class_names or COCO_CLASSES)
    net = init_detector(str(config), str(Path(checkpoint).expanduser()), device=resolve_device(device or "auto"))

    def detect(images: Sequence[np.ndarray]) -> list[Detections]:
        results: list[Detections] = []
        for image in images:
            # mmdet reads ndarrays as BGR (cv2 convention), as if loaded from the PNG file.
            sample = inference_detector(net, np.ascontiguousarray(image[..., ::-1]))
            inst = sample.pred_instances
            boxes = inst.bboxes.cpu().numpy()
            scores = inst.scores.cpu().numpy()
            labels = inst.labels.cpu().numpy()
            masks = inst.masks.cpu().numpy() if "masks" in inst else None
            found: Detections = {}
            for j in range(len(scores)):
                found.setdefault(names[int(labels[j])], []).append(
                    Detection(box=boxes[j, :4], score=float(scores[j]), mask=None if masks is None else masks[j])
                )
            results.append(found)
        return results

    return detect
