"""GenEval's detector and colour plug-ins, and the scorer that joins them to the official rules.

GenEval decides whether an image matches its prompt from object detections; the rules live in
:mod:`opdkit.scoring.geneval` (pure numpy). This module supplies what the rules consume:

- a **detector**: ``images -> [Detections]``, one dict ``class name -> [Detection]`` per image.
  Built-ins: ``mask2former`` (transformers' ``Mask2FormerForUniversalSegmentation``, COCO
  instance weights from a local directory or a hub id; the default) and ``mmdet`` (the official
  GenEval checkpoint through mmdetection 3.x; optional, see docs/geneval.md).
- a **colour classifier** (:data:`opdkit.scoring.geneval.ColorClassifier`): ``clip``, zero-shot
  CLIP ViT-L/14 through transformers' ``CLIPModel`` with GenEval's three prompt templates, on the
  object painted onto a ``#999999`` background and cropped to its box.
- :class:`GenEvalScorer`: detector + colour classifier + :func:`~opdkit.scoring.geneval.judge`
  (official), :func:`~opdkit.scoring.geneval.judge_exact` (Flow-GRPO's strict) and
  :func:`~opdkit.scoring.geneval.partial_credit`. The ``geneval`` benchmark and the ``geneval``
  reward both use it, so they cannot drift apart.

Each plug-in is a builder function with keyword parameters; torch/transformers/mmdet are
imported inside the builders, so importing this module is cheap. Third-party detectors and
colour classifiers can be named as ``module.path:function`` (a builder with the same contract).

Upstream facts re-implemented (djghosh13/geneval ``evaluation/evaluate_images.py``; mmdetection
3.x ``MaskFormerFusionHead.instance_postprocess`` and the Mask2Former COCO test pipeline):
images resized so the short side is 800 (long side at most 1333), ImageNet mean/std, padded to a
multiple of 32; per image the top 100 (query, class) pairs by softmax score over the 80 thing
classes; masks = mask logits > 0 at the original resolution; score = class probability x mean
sigmoid inside the mask; box = tight box of the mask with exclusive right/bottom edges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from opdkit.errors import OpdkitError
from opdkit.scoring.geneval import (
    GENEVAL_COLORS,
    ColorClassifier,
    Detection,
    Detections,
    GenEvalConfig,
    judge,
    judge_exact,
    partial_credit,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLIP_COLOR_TEMPLATES",
    "COCO_CLASSES",
    "COLOR_CLASSIFIERS",
    "DEFAULT_CLIP",
    "DEFAULT_MASK2FORMER",
    "DETECTORS",
    "MMDET_CHECKPOINT_URL",
    "MMDET_CONFIG",
    "Detector",
    "GenEvalScorer",
    "build_clip_color_classifier",
    "build_color_classifier",
    "build_detector",
    "build_mask2former_detector",
    "build_mmdet_detector",
    "mask_to_box",
    "object_crop",
    "resolve_pretrained",
    "save_tiny_clip",
    "save_tiny_mask2former",
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

CLIP_COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
"""GenEval's zero-shot colour prompts; ``{c}`` is a colour, ``{obj}`` the detected class name."""

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
"""Hub id of transformers' Mask2Former Swin-S COCO instance model (the default detector)."""

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
"""Hub id of OpenAI's CLIP ViT-L/14, the model GenEval classifies colours with."""

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


# ------------------------------------------------------------------------------------------
# Weights: a local directory or a hub id, with one clear line when neither is available
# ------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(spec: str, what: str, param: str) -> str:
    """Check that weights ``spec`` (a directory or a Hugging Face hub id) can be loaded; return it.

    Cheap: loads no model. A directory must hold ``config.json``. A hub id must already be in the
    Hugging Face cache, or (unless ``HF_HUB_OFFLINE`` is set) its ``config.json`` must download;
    the weights themselves are fetched when the model is first used.

    Args:
        spec: a local directory or a hub id such as ``openai/clip-vit-large-patch14``.
        what: what the weights are for, used in the message (``"the CLIP colour classifier"``).
        param: the benchmark/reward parameter that takes them (``"clip_model"``).

    Raises:
        OpdkitError: one line naming what to fetch and which parameter to set.
    """
    path = Path(spec).expanduser()
    looks_local = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise OpdkitError(f"{param}={spec}: not a model directory (no config.json) for {what}")
        return str(path)
    fetch = f"on a connected machine run `hf download {spec} --local-dir DIR`, then pass --param {param}=DIR"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # a malformed id: the checks below report it
        cached = None
    if isinstance(cached, str):
        return spec
    if _offline():
        raise OpdkitError(
            f"{what}: {spec!r} is not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set); {fetch}"
        )
    try:  # one small file proves the hub is reachable and the repository exists; weights come later
        from huggingface_hub import hf_hub_download

        hf_hub_download(spec, "config.json")
    except Exception as exc:
        raise OpdkitError(
            f"{what}: {spec!r} is not a local directory, not in the Hugging Face cache, and could not be fetched "
            f"({type(exc).__name__}: no network, or no such repository); {fetch}"
        ) from None
    return spec


def _load_pretrained(cls: Any, spec: str, what: str, param: str) -> Any:
    """``cls.from_pretrained(spec)``, turning a download/cache failure into one clear line."""
    try:
        return cls.from_pretrained(spec)
    except Exception as exc:  # hub/network/cache/format failures come in many types: report one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if Path(spec).expanduser().is_dir():
            raise OpdkitError(f"{what}: cannot load {spec} ({type(exc).__name__}: {first}); check --param {param}") from None
        raise OpdkitError(
            f"{what}: cannot load {spec!r} ({type(exc).__name__}: {first}); on a connected machine run "
            f"`hf download {spec} --local-dir DIR`, then pass --param {param}=DIR"
        ) from None


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------
# Detectors
# ------------------------------------------------------------------------------------------


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
    net = _load_pretrained(Mask2FormerForUniversalSegmentation, spec, "the Mask2Former detector", "detector_model")
    dev = _device(device)
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
    net = init_detector(str(config), str(Path(checkpoint).expanduser()), device=_device(device))

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


DETECTORS: dict[str, Callable[..., Detector]] = {
    "mask2former": build_mask2former_detector,
    "mmdet": build_mmdet_detector,
}
"""Built-in detector builders by name."""


# ------------------------------------------------------------------------------------------
# Colour classification
# ------------------------------------------------------------------------------------------


def object_crop(image: np.ndarray, detection: Detection, background: str = "#999999", crop: bool = True) -> Any:
    """The object as GenEval shows it to CLIP: masked onto ``background``, cropped to its box.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        detection: box in pixels; its ``mask`` (``(H, W)`` bool) if any selects the object's
            pixels, everything else becomes ``background``.
        background: a PIL colour; upstream's default ``#999`` is ``#999999``.
        crop: crop to the box (rounded to whole pixels, at least 1 x 1).

    Returns:
        A PIL RGB image.
    """
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    if detection.mask is not None:
        if detection.mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {detection.mask.shape} does not match image {image.shape[:2]}")
        blank = Image.new("RGB", picture.size, color=background)
        mask = Image.fromarray(detection.mask.astype(np.uint8) * 255, mode="L")
        picture = Image.composite(picture, blank, mask)
    if crop:
        x1, y1, x2, y2 = (round(v) for v in detection.box)
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)  # a degenerate box still yields a pixel
        picture = picture.crop((x1, y1, x2, y2))
    return picture


def build_clip_color_classifier(
    model: str = DEFAULT_CLIP,
    device: str | None = None,
    background: str = "#999999",
    crop: bool = True,
    colors: Sequence[str] = GENEVAL_COLORS,
    templates: Sequence[str] = CLIP_COLOR_TEMPLATES,
) -> ColorClassifier:
    """Zero-shot colour of a detected object with CLIP (transformers ``CLIPModel``/``CLIPProcessor``).

    Per class name, each colour's text embedding is the normalised mean of its normalised
    template embeddings (clip_benchmark's zero-shot classifier, which GenEval uses); the answer is
    the colour with the highest cosine to the normalised image embedding of
    :func:`object_crop`.

    Returns:
        ``classify(image (H, W, 3) uint8, detection, class_name) -> colour name``.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    spec = resolve_pretrained(model, "the CLIP colour classifier", "clip_model")
    processor = _load_pretrained(CLIPProcessor, spec, "the CLIP colour classifier", "clip_model")
    net = _load_pretrained(CLIPModel, spec, "the CLIP colour classifier", "clip_model")
    dev = _device(device)
    net = net.eval().to(dev)
    palette = list(colors)
    text_weights: dict[str, torch.Tensor] = {}

    def features(out: Any) -> torch.Tensor:
        # transformers 4.x returns the projected embedding; 5.x a model output holding it.
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return emb.float() / emb.float().norm(dim=-1, keepdim=True)

    def weights_for(class_name: str) -> torch.Tensor:
        if class_name not in text_weights:
            texts = [t.format(c=c, obj=class_name) for c in palette for t in templates]
            tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(dev)
            with torch.no_grad():
                emb = features(net.get_text_features(**tokens)).view(len(palette), len(templates), -1).mean(1)
            text_weights[class_name] = emb / emb.norm(dim=-1, keepdim=True)  # (colours, D)
        return text_weights[class_name]

    def classify(image: np.ndarray, detection: Detection, class_name: str) -> str:
        picture = object_crop(image, detection, background=background, crop=crop)
        pixels = processor.image_processor(images=picture, return_tensors="pt")["pixel_values"].to(dev)
        with torch.no_grad():
            emb = features(net.get_image_features(pixel_values=pixels))
        return palette[int((emb @ weights_for(class_name).T).argmax(-1)[0])]

    return classify


COLOR_CLASSIFIERS: dict[str, Callable[..., ColorClassifier]] = {"clip": build_clip_color_classifier}
"""Built-in colour classifier builders by name."""


def _builder(kind: str, name: str, table: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    if name in table:
        return table[name]
    if ":" in name:
        from opdkit.registry import load_object

        return load_object(name, kind)
    raise OpdkitError(f"unknown {kind} {name!r} (known: {', '.join(sorted(table))}, or module.path:function)")


def build_detector(name: str, **params: Any) -> Detector:
    """A detector by built-in name (``mask2former``, ``mmdet``) or ``module.path:function``."""
    return _builder("detector", name, DETECTORS)(**params)


def build_color_classifier(name: str, **params: Any) -> ColorClassifier:
    """A colour classifier by built-in name (``clip``) or ``module.path:function``."""
    return _builder("colour classifier", name, COLOR_CLASSIFIERS)(**params)


# ------------------------------------------------------------------------------------------
# The scorer shared by the geneval benchmark and the geneval reward
# ------------------------------------------------------------------------------------------


class GenEvalScorer:
    """Detections -> official verdict, strict verdict and partial credit, for batches of images.

    Weights are checked when the scorer is made (so a missing model fails before any image is
    generated) and loaded on first use.

    Args:
        detector: ``mask2former`` (default), ``mmdet`` or ``module.path:function``.
        detector_params: keyword arguments of the detector builder.
        color: ``clip`` (default) or ``module.path:function``.
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
            self._classify = build_color_classifier(self.color_name, **self.color_params)
        return self._classify

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Run the detector: one ``class -> detections`` dict per ``(H, W, 3)`` uint8 image."""
        if self._detect is None:
            self._detect = build_detector(self.detector_name, **self.detector_params)
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

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Score a batch: ``images`` ``(B, H, W, 3)`` uint8 RGB, ``records`` GenEval metadata."""
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


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded as when saved to PNG."""
    import torch

    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------------------------------
# Tiny random models, for tests and smoke runs without downloads
# ------------------------------------------------------------------------------------------


def save_tiny_mask2former(out_dir: str | Path, seed: int = 0, favour: str | None = "bench") -> Path:
    """Build a tiny random Mask2Former (80 COCO labels, 10 queries, Swin backbone) and save it.

    Args:
        out_dir: target directory (created).
        seed: seeds the random weights (the global RNG is left untouched).
        favour: a class name every query predicts with probability ~1, so the tiny model yields
            real detections (random masks, scores around 0.5) for that class; ``None`` keeps the
            random classifier (scores ~1/81: nothing survives GenEval's thresholds).

    Returns:
        The directory (loadable with ``detector_model=DIR``).
    """
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,  # GroupNorm(32, .) in the pixel decoder needs a multiple of 32
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=10,
        id2label=dict(enumerate(COCO_CLASSES)),
        label2id={name: i for i, name in enumerate(COCO_CLASSES)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Mask2FormerForUniversalSegmentation(config).eval()
    if favour is not None:
        with torch.no_grad():
            head = net.class_predictor
            head.weight.zero_()
            head.bias.fill_(-10.0)
            head.bias[COCO_CLASSES.index(favour)] = 10.0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    return out


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random CLIP (2-layer text and vision towers, 224 px input) with its processor.

    The tokenizer is a BPE trained offline on GenEval's colour and class words. Returns the
    directory (loadable with ``clip_model=DIR``).
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from opdkit.models.tokenizers import clip_tokenizer_from_corpus as _clip_tokenizer_from_corpus

    corpus = (
        *(t.format(c=c, obj=o) for t in CLIP_COLOR_TEMPLATES for c in GENEVAL_COLORS for o in COCO_CLASSES[:8]),
        " ".join(COCO_CLASSES),
        " ".join("abcdefghijklmnopqrstuvwxyz-"),
    )
    tokenizer = _clip_tokenizer_from_corpus(tuple(corpus), 32)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tokenizer,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    processor.save_pretrained(out)
    return out
