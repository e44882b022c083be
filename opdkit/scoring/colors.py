"""The ``color_classifier`` plug-in kind: the colour of a detected object; built-in ``clip``.

A colour classifier is made by a builder (registered with ``@color_classifiers.register(name)``
in :mod:`opdkit.registry`, or named as ``module.path:function`` / ``./file.py:function``) and
answers :data:`opdkit.scoring.geneval.ColorClassifier`'s question::

    classify(image (H, W, 3) uint8 RGB, detection, class name) -> colour name

Built-in ``clip``: zero-shot CLIP ViT-L/14 through transformers' ``CLIPModel`` with GenEval's
three prompt templates, on the object painted onto a ``#999999`` background and cropped to its
box (djghosh13/geneval ``evaluation/evaluate_images.py``). A module of its own because the
colour classifier is swapped independently of the detector; torch and transformers are imported
inside the builder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from opdkit.registry import color_classifiers
from opdkit.scoring.geneval import GENEVAL_COLORS, ColorClassifier, Detection
from opdkit.scoring.weights import load_resolved, resolve_device, resolve_pretrained

__all__ = ["CLIP_COLOR_TEMPLATES", "DEFAULT_CLIP", "build_clip_color_classifier", "object_crop"]

CLIP_COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
"""GenEval's zero-shot colour prompts; ``{c}`` is a colour, ``{obj}`` the detected class name."""

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
"""Hub id of OpenAI's CLIP ViT-L/14, the model GenEval classifies colours with."""


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


@color_classifiers.register("clip")
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
    processor = load_resolved(CLIPProcessor, spec, "the CLIP colour classifier", "clip_model")
    net = load_resolved(CLIPModel, spec, "the CLIP colour classifier", "clip_model")
    dev = resolve_device(device or "auto")
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


