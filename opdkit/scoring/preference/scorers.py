"""The preference scorers: build once, then ``scorer(images, prompts) -> {name: Tensor (B,)}``.

``images`` is ``(B, 3, H, W)`` float in ``[0, 1]`` on any device; ``prompts`` has ``B`` strings.
Every scorer returns raw values as float32 CPU tensors and runs without gradients; the reward and
benchmark plug-ins apply their own scaling:

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
from opdkit.scoring.preference import (
    AESTHETIC_FILE,
    AESTHETIC_URL,
    BERT_BASE_UNCASED,
    HPS_CHECKPOINTS,
    IMAGEREWARD_CHECKPOINT,
    LAION_VIT_H14,
    OPENAI_VIT_L14,
    PICKSCORE_MODEL,
)
from opdkit.scoring.preference.images import make_clip_image_processor, pil_pixel_values, tensor_pixel_values
from opdkit.scoring.weights import load_pretrained, parse_dtype, resolve_device, resolve_file

Scores = dict[str, torch.Tensor]
BACKENDS = ("opdkit", "package")


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
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> Scores:
        _check_batch(images, prompts)
        cosine = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        scale = self.model.logit_scale.float().exp()
        return {"cosine": cosine.cpu(), "logit": (scale * cosine).cpu()}


def _clip_processor_parts(processor: str, what: str, param: str) -> tuple[Any, Any]:
    """(tokenizer, image processor) of a CLIP processor directory or hub id."""
    from transformers import AutoTokenizer

    from opdkit.scoring.preference.images import clip_image_processor_class

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, processor, f"{what} tokenizer", param)
    image_processor = load_pretrained(clip_image_processor_class().from_pretrained, processor, f"{what} image processor", param)
    return tokenizer, image_processor


def _load_clip(model: str, what: str, param: str) -> Any:
    from transformers import CLIPModel

    return load_pretrained(CLIPModel.from_pretrained, model, what, param)


def build_clip_scorer(
    model: str, processor: str | None, what: str, device: str = "auto", dtype: str = "float32", batch_size: int = 32
) -> ClipScorer:
    """A :class:`ClipScorer` for a CLIP-family model and its CLIP processor (default: the model's)."""
    clip = _load_clip(model, f"{what} model", "model")
    tokenizer, image_processor = _clip_processor_parts(processor or model, what, "processor" if processor else "model")
    return ClipScorer(
        clip,
        tokenizer,
        lambda images: pil_pixel_values(image_processor, images),
        engine=f"{what} ({model}) on transformers CLIPModel",
        device=resolve_device(device),
        dtype=parse_dtype(dtype),
        batch_size=batch_size,
    )


def build_pickscore(
    model: str = PICKSCORE_MODEL, processor: str = LAION_VIT_H14, device: str = "auto", dtype: str = "float32", batch_size: int = 32
) -> ClipScorer:
    """PickScore_v1 with the LAION ViT-H/14 processor, as the PickScore authors score it."""
    return build_clip_scorer(model, processor, "PickScore", device, dtype, batch_size)


def build_clipscore(
    model: str = OPENAI_VIT_L14, processor: str | None = None, device: str = "auto", dtype: str = "float32", batch_size: int = 32
) -> ClipScorer:
    """OpenAI CLIP ViT-L/14 (or any ``CLIPModel``)."""
    return build_clip_scorer(model, processor, "CLIPScore", device, dtype, batch_size)


# ----------------------------------------------------------------------------------------------
# Aesthetic


class AestheticScorer:
    """LAION aesthetic predictor v2: ``{"aesthetic": (B,)}`` from normalised CLIP image embeddings."""

    def __init__(self, clip: ClipScorer, head: torch.nn.Module, engine: str) -> None:
        self.clip = clip
        self.head = head.to(clip.device).float().eval().requires_grad_(False)
        self.engine = engine

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> Scores:
        _check_batch(images, prompts)
        return {"aesthetic": self.head(self.clip.image_embeds(images)).squeeze(-1).cpu()}


def build_aesthetic(
    predictor: str | None = None,
    clip: str = OPENAI_VIT_L14,
    processor: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> AestheticScorer:
    """The predictor's head (``.pth`` converted once, or a ``head.safetensors``/its directory) on ``clip``."""
    from safetensors.torch import load_file

    from opdkit.scoring.preference.convert import convert_aesthetic_head, convert_aesthetic_state
    from opdkit.scoring.preference.modules import preference_head

    if predictor is None:
        raise OpdkitError(
            f"aesthetic: no predictor weights: fetch {AESTHETIC_FILE} from {AESTHETIC_URL} and set `predictor:` "
            "in the plug-in's params (recipe) or pass --param predictor=PATH (opdkit eval)"
        )
    scorer = build_clip_scorer(clip, processor, "Aesthetic backbone", device, dtype, batch_size)
    in_dim = int(scorer.model.config.projection_dim)
    source = resolve_file(predictor, "Aesthetic predictor", "predictor", fetch=AESTHETIC_URL)
    if source.is_dir():
        source = source / "head.safetensors"
    if source.suffix == ".safetensors":
        state = convert_aesthetic_state(load_file(str(source)), in_dim, f"Aesthetic predictor {str(source)!r}")
    else:
        state = load_file(str(convert_aesthetic_head(source, in_dim) / "head.safetensors"))
    head = preference_head(in_dim)
    head.load_state_dict(state)
    return AestheticScorer(scorer, head, engine=f"LAION aesthetic predictor v2 ({Path(predictor).name}) on {clip}")


# ----------------------------------------------------------------------------------------------
# HPSv2


class HpsScorer(ClipScorer):
    """HPSv2 / HPSv2.1: ``{"cosine": (B,)}`` (HPS is the raw cosine; no logit scale)."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> Scores:
        _check_batch(images, prompts)
        return {"cosine": (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).cpu()}


def hps_model_dir(checkpoint: str | None = None, version: str = "v2.1") -> Path:
    """A converted HPS ``CLIPModel`` directory: given as such, or converted from the official ``.pt``."""
    from opdkit.scoring.preference.convert import convert_hps_checkpoint

    if version not in HPS_CHECKPOINTS:
        raise OpdkitError(f"hpsv2: version {version!r}: expected one of {', '.join(HPS_CHECKPOINTS)}")
    spec = checkpoint or HPS_CHECKPOINTS[version]
    source = resolve_file(spec, f"HPSv2 ({version}) checkpoint", "checkpoint", fetch="https://huggingface.co/xswu/HPSv2")
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise OpdkitError(f"hpsv2: {str(source)!r} is a directory without config.json (expected a converted CLIPModel)")
        return source
    return convert_hps_checkpoint(source)


def build_hpsv2(
    checkpoint: str | None = None,
    version: str = "v2.1",
    tokenizer: str = LAION_VIT_H14,
    backend: str = "opdkit",
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Any:
    """HPSv2 scorer: our converted ``CLIPModel`` (default) or the ``hpsv2`` package (``backend="package"``)."""
    if backend not in BACKENDS:
        raise OpdkitError(f"hpsv2: backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "package":
        from opdkit.scoring.preference.backends import hpsv2_package_scorer

        spec = checkpoint or HPS_CHECKPOINTS.get(version, "")
        return hpsv2_package_scorer(resolve_file(spec, f"HPSv2 ({version}) checkpoint", "checkpoint"), version)
    model_dir = hps_model_dir(checkpoint, version)
    clip = _load_clip(str(model_dir), f"HPSv2 ({version}) model", "checkpoint")
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "HPSv2 tokenizer", "tokenizer")
    size = int(clip.config.vision_config.image_size)
    return HpsScorer(
        clip,
        tok,
        lambda images: tensor_pixel_values(images, size),
        engine=f"HPS{version} (opdkit conversion of the open_clip checkpoint) on transformers CLIPModel",
        device=resolve_device(device),
        dtype=parse_dtype(dtype),
        batch_size=batch_size,
    )


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
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> Scores:
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


def build_imagereward(
    checkpoint: str = IMAGEREWARD_CHECKPOINT,
    tokenizer: str = BERT_BASE_UNCASED,
    backend: str = "opdkit",
    med_config: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Any:
    """ImageReward scorer: our conversion on transformers BLIP (default) or the ``image-reward`` package."""
    from opdkit.scoring.preference.convert import convert_imagereward_checkpoint

    if backend not in BACKENDS:
        raise OpdkitError(f"imagereward: backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    source = resolve_file(checkpoint, "ImageReward checkpoint", "checkpoint", fetch="https://huggingface.co/THUDM/ImageReward")
    if backend == "package":
        from opdkit.scoring.preference.backends import imagereward_package_scorer

        return imagereward_package_scorer(source, med_config, resolve_device(device))
    directory = source if source.is_dir() else convert_imagereward_checkpoint(source)
    model = load_imagereward_dir(directory)
    return ImageRewardScorer(
        model,
        imagereward_tokenizer(tokenizer),
        engine="ImageReward-v1.0 (opdkit conversion) on transformers BLIP",
        device=resolve_device(device),
        dtype=parse_dtype(dtype),
        batch_size=batch_size,
    )
