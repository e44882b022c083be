"""Model plug-ins: adapters that expose a flow-matching text-to-image model as plain tensors.

This module is imported by the ``models`` registry on first lookup, so it stays import-light:
torch, diffusers and transformers are imported inside the builders (and lazily for the
re-exported names below).

Public names (loaded on first access):

* :class:`~opdkit.models.flow_model.FlowModel`, :class:`~opdkit.models.flow_model.Cond`,
  :func:`~opdkit.models.flow_model.load_flow_model` — the adapter, its conditioning, the loader;
* :func:`~opdkit.models.tiny.build_tiny_sd3_pipeline`,
  :func:`~opdkit.models.tiny.build_shapes_pipeline`,
  :class:`~opdkit.models.tiny.ShapesModelConfig` — tiny random pipelines.
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
    "load_flow_model": "opdkit.models.flow_model",
    "parse_dtype": "opdkit.models.flow_model",
    "build_tiny_sd3_pipeline": "opdkit.models.tiny",
    "build_shapes_pipeline": "opdkit.models.tiny",
    "build_shapes_tokenizer": "opdkit.models.tiny",
    "make_shapes_modules": "opdkit.models.tiny",
    "ShapesModelConfig": "opdkit.models.tiny",
}

__all__ = [*sorted(_LAZY), "sd3"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attribute: keeps `import opdkit.models` free of torch.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


@models.register("sd3")
def sd3(
    path: str,
    dtype: str = "float32",
    device: str = "cpu",
    max_sequence_length: int | None = None,
    text_dtype: str | None = None,
) -> FlowModel:
    """SD3-family model (SD3.5-M/L or a tiny test pipeline) from a diffusers pipeline directory.

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
    from opdkit.models.flow_model import load_flow_model, parse_dtype

    return load_flow_model(
        path,
        dtype=parse_dtype(dtype),
        device=device,
        max_sequence_length=max_sequence_length,
        text_dtype=None if text_dtype is None else parse_dtype(text_dtype),
    )


# The shapes-world model plug-ins (light at import, like this module).
from opdkit.models import shapes as shapes  # noqa: E402
