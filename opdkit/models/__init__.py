"""Flow models: the adapter that exposes a text-to-image flow model as plain tensors, and its plug-ins.

This package is imported by the ``models`` registry on first lookup, so it stays import-light:
torch, diffusers and transformers are imported inside the builders (and lazily for the
re-exported names below). It registers the ``sd3``, ``flux`` and ``qwen-image`` plug-ins here
and the shapes-world plug-ins in :mod:`opdkit.models.shapes`.

Modules:

* :mod:`~opdkit.models.flow_model` — :class:`FlowModel` (the interface, SD3 implementation) and
  :class:`Cond`;
* :mod:`~opdkit.models.packed`, :mod:`~opdkit.models.flux`, :mod:`~opdkit.models.qwen_image`
  — the FLUX.1 and Qwen-Image families (2x2 packed latents, token-count time shift);
* :mod:`~opdkit.models.adapters` — LoRA adapters on the transformer (peft);
* :mod:`~opdkit.models.lora` — the LoRA file format (the one reader and writer);
* :mod:`~opdkit.models.merge` — merging LoRA adapters on their weight deltas;
* :mod:`~opdkit.models.loading` — pipeline directories: :func:`load_flow_model` and saving;
* :mod:`~opdkit.models.shapes` — the shapes-world model (config, tokenizer, builder, plug-ins);
* :mod:`~opdkit.models.tokenizers` — tokenizers trained offline for tiny random models.

Public names (loaded on first access): ``FlowModel``, ``Cond``, ``load_flow_model``,
``parse_dtype``, ``ShapesModelConfig``, ``build_shapes_pipeline``, ``build_shapes_tokenizer``,
``make_shapes_modules``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from opdkit.registry import models

if TYPE_CHECKING:
    from opdkit.models.flow_model import FlowModel

_LAZY: dict[str, str] = {
    "FlowModel": "opdkit.models.flow_model",
    "Cond": "opdkit.models.flow_model",
    "load_flow_model": "opdkit.models.loading",
    "parse_dtype": "opdkit.models.loading",
    "build_shapes_pipeline": "opdkit.models.shapes",
    "build_shapes_tokenizer": "opdkit.models.shapes",
    "make_shapes_modules": "opdkit.models.shapes",
    "ShapesModelConfig": "opdkit.models.shapes",
}

__all__ = [*sorted(_LAZY), "flux", "qwen_image", "sd3"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: keeps `import opdkit.models` free of torch.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def _load(
    family: str,
    path: str,
    dtype: str,
    device: str,
    max_sequence_length: int | None,
    text_dtype: str | None,
    **options: Any,
) -> FlowModel:
    """What the family plug-ins share: parse the dtypes, load the folder, insist on ``family``."""
    from opdkit.models.loading import load_flow_model, parse_dtype, pipeline_sources

    model = load_flow_model(
        path,
        dtype=parse_dtype(dtype),
        device=device,
        max_sequence_length=max_sequence_length,
        text_dtype=None if text_dtype is None else parse_dtype(text_dtype),
        family_options=options,
        family=family,
    )
    model.sources = pipeline_sources(path)
    return model


@models.register("sd3")
def sd3(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    max_sequence_length: int | None = None,
    text_dtype: str | None = None,
) -> FlowModel:
    """SD3-family model (SD3.5-M/L or a tiny test pipeline) from a diffusers StableDiffusion3Pipeline folder.

    Args:
        path: local directory in the StableDiffusion3Pipeline layout, or ``hf:owner/name`` for a
            Hugging Face hub id (downloaded explicitly; needs network).
        dtype: ``float32``/``fp32``, ``bfloat16``/``bf16`` or ``float16``/``fp16``.
        device: torch device string, e.g. ``cpu`` or ``cuda:0``.
        max_sequence_length: T5 tokens per prompt (default: the directory's ``opdkit.json``,
            else 256 as in diffusers; flow_grpo trains SD3.5 with 128).
        text_dtype: dtype of the frozen text encoders (default: ``dtype``); ``bf16`` next to an
            fp32 transformer saves about 12 GB on SD3.5-M (T5-XXL and CLIP-G), as flow_grpo keeps
            its text encoders in the inference dtype.
    """
    return _load("sd3", path, dtype, device, max_sequence_length, text_dtype)


@models.register("flux")
def flux(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    max_sequence_length: int | None = None,
    text_dtype: str | None = None,
    guidance: float | None = None,
) -> FlowModel:
    """FLUX.1-dev/schnell from a diffusers FluxPipeline folder (or ``hf:owner/name``); guidance embedded, not CFG.

    Args:
        path, dtype, device, text_dtype: as for ``sd3``.
        max_sequence_length: T5 tokens per prompt (default: ``opdkit.json``, else 512 as
            diffusers' FluxPipeline; schnell was trained with 256).
        guidance: the guidance scale fed to dev's guidance embedding in every forward (default:
            ``opdkit.json``, else 3.5); ignored by schnell. Keep ``sampler.cfg: 1``.
    """
    return _load("flux", path, dtype, device, max_sequence_length, text_dtype, guidance=guidance)


@models.register("qwen-image")
def qwen_image(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    max_sequence_length: int | None = None,
    text_dtype: str | None = None,
    negative_prompt: str | None = None,
) -> FlowModel:
    """Qwen-Image from a diffusers QwenImagePipeline folder (or ``hf:owner/name``); true CFG on a negative prompt.

    Args:
        path, dtype, device, text_dtype: as for ``sd3``.
        max_sequence_length: prompt tokens kept after the chat template (default: ``opdkit.json``,
            else 512 as diffusers' QwenImagePipeline).
        negative_prompt: CFG's unconditional prompt (default: ``opdkit.json``, else " ").
    """
    return _load(
        "qwen-image", path, dtype, device, max_sequence_length, text_dtype, negative_prompt=negative_prompt
    )


# The shapes-world model plug-ins (light at import, like this module).
from opdkit.models import shapes as shapes  # noqa: E402
