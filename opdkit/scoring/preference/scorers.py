"""The preference scorers: ``scorer(images, prompts, records) -> {measurement: Tensor (B,)}``.

The one scorer signature (:data:`opdkit.scoring.scorer.Scorer`): ``images`` is ``(B, 3, H, W)``
float in ``[0, 1]`` on any device, ``prompts`` has ``B`` strings, the records are not read. Every
scorer returns raw values as float32 CPU tensors and runs without gradients; the reward and
benchmark plug-ins pick their ``"score"`` and scale it (:class:`opdkit.scoring.scorer.WithScore`):

========== ======================================== ===================== ====================
scorer     returns                                  reward ("score")      benchmark ("score")
========== ======================================== ===================== ====================
PickScore  ``logit`` = exp(logit_scale) * cos, cos  logit / 26            logit (~21-24)
CLIPScore  ``logit``, ``cosine``                    logit / 100           logit / 100
Aesthetic  ``aesthetic`` (LAION scale ~1-10)        aesthetic             aesthetic
HPSv2.1    ``cosine``                               cosine (~0.2-0.35)    100 x cosine
ImageReward ``imagereward`` ((head - mean) / std)   imagereward           imagereward
========== ======================================== ===================== ====================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.scoring.preference.images import make_clip_image_processor, pil_pixel_values
from opdkit.scoring.scorer import Scores
from opdkit.scoring.weights import load_pretrained


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")


class ClipScorer:
    """Image-text similarity of a ``CLIPModel``: ``{"cosine": (B,), "logit": (B,)}``.

    ``logit`` = exp(logit_scale) * cosine, i.e. the diagonal of ``logits_per_image``. Prompts that
    repeat inside a batch (a GRPO group shares one) are encoded once.

    Args:
        model: a loaded ``CLIPModel`` (moved to ``device``/``dtype`` here).
        tokenizer: its tokenizer.
        pixel_values: ``images (B, 3, H, W) -> (B, 3, S, S)`` preprocessing.
        engine: description stored with benchmark results.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pixel_values: Callable[[torch.Tensor], torch.Tensor],
        engine: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pixel_values = pixel_values
        self.engine = engine
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        config = model.config.text_config
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``(B, E)`` float32 on the model's device."""
        out = []
        for part in _chunks(images.shape[0], self.batch_size):
            pixels = self.pixel_values(images[part]).to(self.device, self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        embeds = torch.cat(out)
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``(B, E)`` float32 (unique prompts encoded once)."""
        unique = list(dict.fromkeys(prompts))
        out = []
        for part in _chunks(len(unique), self.batch_size):
            tokens = self.tokenizer(
                unique[part], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float())
        embeds = torch.cat(out)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        index = {p: i for i, p in enumerate(unique)}
        return embeds[torch.tensor([index[p] for p in prompts], device=embeds.device)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]] | None = None) -> Scores:
        _check_batch(images, prompts)
        cosine = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        scale = self.model.logit_scale.float().exp()
        return {"cosine": cosine.cpu(), "logit": (scale * cosine).cpu()}


def clip_processor_parts(processor: str, what: str, param: str) -> tuple[Any, Any]:
    """(tokenizer, image processor) of a CLIP processor directory or hub id."""
    from transformers import AutoTokenizer

    from opdkit.scoring.preference.images import clip_image_processor_class

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, processor, f"{what} tokenizer", param)
    image_processor = load_pretrained(clip_image_processor_class().from_pretrained, processor, f"{what} image processor", param)
    return tokenizer, image_processor


def load_clip(model: str, what: str, param: str) -> Any:
    """A ``CLIPModel`` from a directory or hub id, any failure one line naming ``param``."""
    from transformers import CLIPModel

    return load_pretrained(CLIPModel.from_pretrained, model, what, param)


# ----------------------------------------------------------------------------------------------
# Aesthetic


class AestheticScorer:
    """LAION aesthetic predictor v2: ``{"aesthetic": (B,)}`` from normalised CLIP image embeddings."""

    def __init__(self, clip: ClipScorer, head: torch.nn.Module, engine: str) -> None:
        self.clip = clip
        self.head = head.to(clip.device).float().eval().requires_grad_(False)
        self.engine = engine

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]] | None = None) -> Scores:
        _check_batch(images, prompts)
        return {"aesthetic": self.head(self.clip.image_embeds(images)).squeeze(-1).cpu()}


# ----------------------------------------------------------------------------------------------
# HPSv2


class HpsScorer(ClipScorer):
    """HPSv2 / HPSv2.1: ``{"cosine": (B,)}`` (HPS is the raw cosine; no logit scale)."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]] | None = None) -> Scores:
        _check_batch(images, prompts)
        return {"cosine": (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).cpu()}


# ----------------------------------------------------------------------------------------------
# ImageReward


class ImageRewardScorer:
    """ImageReward-v1.0: ``{"imagereward": (B,)}``, normalised as upstream ((r - mean) / std)."""

    def __init__(
        self, model: Any, tokenizer: Any, engine: str, device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 32
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.model.head.float()  # upstream runs the head in float32 on .float() features
        self.tokenizer = tokenizer
        self.processor = make_clip_image_processor(int(model.vision.config.image_size))
        self.engine = engine
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]] | None = None) -> Scores:
        _check_batch(images, prompts)
        # Upstream: padding to max_length 35 with truncation (BERT [CLS] ... [SEP] [PAD]...).
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = []
        for part in _chunks(images.shape[0], self.batch_size):
            pixels = pil_pixel_values(self.processor, images[part]).to(self.device, self.dtype)
            out.append(
                self.model(
                    pixels, tokens["input_ids"][part].to(self.device), tokens["attention_mask"][part].to(self.device)
                ).float()
            )
        return {"imagereward": torch.cat(out).cpu()}


def load_imagereward_dir(directory: Path) -> Any:
    """An :class:`ImageRewardModel` from a converted directory (``config.json`` + ``model.safetensors``)."""
    import json

    from safetensors.torch import load_file
    from transformers import BlipTextConfig, BlipVisionConfig

    from opdkit.scoring.preference.convert import IMAGEREWARD_FORMAT
    from opdkit.scoring.preference.modules import ImageRewardModel

    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("format") != IMAGEREWARD_FORMAT:
        raise OpdkitError(
            f"imagereward: {str(directory)!r} is not a converted ImageReward directory (config.json format "
            f"{config.get('format')!r}, expected {IMAGEREWARD_FORMAT!r}); give the original ImageReward.pt instead"
        )
    vision = BlipVisionConfig.from_dict(config["vision_config"])
    text = BlipTextConfig.from_dict(config["text_config"])
    # Built on "meta" and filled by assignment: a random init of the real model would cost ~30 s
    # of CPU (446M parameters) only to be overwritten.
    with torch.device("meta"):
        model = ImageRewardModel(vision, text, config["mean"], config["std"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True, assign=True)
    # The one non-persistent buffer (not in any state dict): BERT's position ids.
    embeddings = model.text.embeddings
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1]).expand((1, -1))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise OpdkitError(f"imagereward: {str(directory)!r} left {len(left)} tensors unset: {', '.join(left[:10])}")
    return model


def imagereward_tokenizer(spec: str) -> Any:
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``, as BLIP's init_tokenizer."""
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer.from_pretrained, spec, "ImageReward tokenizer", "tokenizer")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok

