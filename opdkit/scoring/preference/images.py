"""Image preprocessing of the preference models, faithful to each upstream pipeline.

Generated images arrive as ``(B, 3, H, W)`` float in ``[0, 1]``. Every path first rounds them to
8-bit levels, so a score equals the score of the PNG the eval runner saves (and of the PIL images
flow_grpo's scorers are given).

* :func:`pil_pixel_values` — the CLIP pipeline on PIL images: shortest edge to ``size`` with PIL
  bicubic, centre crop, scale to [0, 1], normalise. This is transformers' CLIP image processor
  (PickScore, CLIPScore, the Aesthetic predictor) and equally torchvision's ``Resize(n, BICUBIC),
  CenterCrop(n), ToTensor(), Normalize(...)`` applied to a PIL image (ImageReward, OpenAI CLIP).
* :func:`tensor_pixel_values` — HPSv2's order: ``ToTensor()`` FIRST, then bicubic resize of the
  float tensor (antialiased, torchvision >= 0.17's default) and centre crop, then normalise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opdkit.scoring.scorer import to_uint8

if TYPE_CHECKING:
    import torch

# OpenAI CLIP's normalisation, used by every model here (open_clip's ViT-H-14 included).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(images: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) float in [0, 1] -> B RGB ``PIL.Image`` objects."""
    from PIL import Image

    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def clip_image_processor_class() -> Any:
    """transformers' PIL-backed CLIP image processor class.

    transformers 5 names it ``CLIPImageProcessorPil`` (``CLIPImageProcessor`` there wants
    torchvision, which does not load beside the CPU torch build); in transformers 4 the PIL
    implementation is ``CLIPImageProcessor`` itself.
    """
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def make_clip_image_processor(size: int, mean: tuple[float, ...] = OPENAI_CLIP_MEAN, std: tuple[float, ...] = OPENAI_CLIP_STD) -> Any:
    """A CLIP image processor for ``size`` px: shortest edge ``size`` (bicubic), centre crop ``size``."""
    cls = clip_image_processor_class()
    return cls(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
        resample=3,  # PIL.Image.BICUBIC
    )


def pil_pixel_values(processor: Any, images: torch.Tensor) -> torch.Tensor:
    """Pixel values ``(B, 3, S, S)`` float32 through a CLIP image processor on PIL images."""
    return processor(images=to_pil(images), return_tensors="pt")["pixel_values"]


def tensor_pixel_values(
    images: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """HPSv2's validation transform on 8-bit levels: ``(B, 3, H, W)`` -> ``(B, 3, size, size)`` float32.

    Shortest edge to ``size`` (long edge ``int(size * long / short)``, as torchvision computes it)
    with antialiased bicubic interpolation of the float tensor, centre crop (offsets rounded as
    torchvision's ``center_crop``), then per-channel normalisation.
    """
    import torch
    import torch.nn.functional as F

    x = to_uint8(images).float() / 255.0
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
