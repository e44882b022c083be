"""Builders of the preference scorers: the weights parameters every preference reward and benchmark takes.

``build_pickscore``, ``build_clipscore``, ``build_aesthetic``, ``build_hpsv2`` and
``build_imagereward`` locate (and convert once) the weights, then make the scorer of
:mod:`opdkit.scoring.preference.scorers`. Apart from the scorers because their signatures are read
when plug-ins are registered (:func:`opdkit.registry.with_params_of`): this module imports no
torch, the scorers module does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from opdkit.scoring.preference.images import pil_pixel_values, tensor_pixel_values
from opdkit.scoring.weights import load_pretrained, parse_dtype, resolve_device, resolve_file

if TYPE_CHECKING:
    from opdkit.scoring.preference.scorers import AestheticScorer, ClipScorer

__all__ = [
    "BACKENDS",
    "build_aesthetic",
    "build_clip_scorer",
    "build_clipscore",
    "build_hpsv2",
    "build_imagereward",
    "build_pickscore",
    "hps_model_dir",
]

BACKENDS = ("opdkit", "package")
"""``backend`` of HPSv2 and ImageReward: opdkit's conversion, or the upstream package (optional)."""


def build_clip_scorer(
    model: str, processor: str | None, what: str, device: str = "auto", dtype: str = "float32", batch_size: int = 32
) -> ClipScorer:
    """A :class:`ClipScorer` for a CLIP-family model and its CLIP processor (default: the model's)."""
    from opdkit.scoring.preference.scorers import ClipScorer, clip_processor_parts, load_clip

    clip = load_clip(model, f"{what} model", "model")
    tokenizer, image_processor = clip_processor_parts(processor or model, what, "processor" if processor else "model")
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
    from opdkit.scoring.preference.scorers import AestheticScorer

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


def _naming_weights(scorer: Any, spec: str, default: str) -> Any:
    """``scorer`` with its engine naming ``spec`` when that is not the default checkpoint: results
    keep an engine's rows apart from another engine's, so two checkpoints must not share a name."""
    if spec != default:
        scorer.engine = f"{scorer.engine} from {spec}"
    return scorer


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
        scorer = hpsv2_package_scorer(resolve_file(spec, f"HPSv2 ({version}) checkpoint", "checkpoint"), version)
        return _naming_weights(scorer, spec, HPS_CHECKPOINTS.get(version, ""))
    from transformers import AutoTokenizer

    from opdkit.scoring.preference.scorers import HpsScorer, load_clip

    model_dir = hps_model_dir(checkpoint, version)
    clip = load_clip(str(model_dir), f"HPSv2 ({version}) model", "checkpoint")

    tok = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "HPSv2 tokenizer", "tokenizer")
    size = int(clip.config.vision_config.image_size)
    scorer = HpsScorer(
        clip,
        tok,
        lambda images: tensor_pixel_values(images, size),
        engine=f"HPS{version} (opdkit conversion of the open_clip checkpoint) on transformers CLIPModel",
        device=resolve_device(device),
        dtype=parse_dtype(dtype),
        batch_size=batch_size,
    )
    return _naming_weights(scorer, checkpoint or HPS_CHECKPOINTS[version], HPS_CHECKPOINTS[version])


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
    from opdkit.scoring.preference.scorers import (
        ImageRewardScorer,
        imagereward_tokenizer,
        load_imagereward_dir,
    )

    if backend not in BACKENDS:
        raise OpdkitError(f"imagereward: backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    source = resolve_file(checkpoint, "ImageReward checkpoint", "checkpoint", fetch="https://huggingface.co/THUDM/ImageReward")
    if backend == "package":
        from opdkit.scoring.preference.backends import imagereward_package_scorer

        package = imagereward_package_scorer(source, med_config, resolve_device(device))
        return _naming_weights(package, checkpoint, IMAGEREWARD_CHECKPOINT)
    directory = source if source.is_dir() else convert_imagereward_checkpoint(source)
    model = load_imagereward_dir(directory)
    scorer = ImageRewardScorer(
        model,
        imagereward_tokenizer(tokenizer),
        engine="ImageReward-v1.0 (opdkit conversion) on transformers BLIP",
        device=resolve_device(device),
        dtype=parse_dtype(dtype),
        batch_size=batch_size,
    )
    return _naming_weights(scorer, checkpoint, IMAGEREWARD_CHECKPOINT)
