"""Writing a flow model as a pipeline folder: the StableDiffusion3Pipeline layout plus ``opdkit.json``.

Apart from :mod:`opdkit.models.loading` so that the model (whose ``save_pretrained`` calls
:func:`save_flow_model`) and the loader (which builds models) do not import each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    from opdkit.models.flow_model import FlowModel
    from opdkit.models.packed import PackedFlowModel

# opdkit's own settings of a pipeline folder (world, max_sequence_length, model.extra_config)
OPDKIT_CONFIG = "opdkit.json"


def write_opdkit_config(out_dir: str | Path, values: dict[str, Any]) -> None:
    """Write ``opdkit.json`` (keys sorted) into a pipeline directory."""
    (Path(out_dir) / OPDKIT_CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def save_flow_model(model: FlowModel, out_dir: str | Path) -> Path:
    """Write ``model`` in the StableDiffusion3Pipeline layout that :func:`load_flow_model` reads.

    Every module is saved with ``save_pretrained`` (safetensors); ``model_index.json`` names
    the present components (absent ones as ``[null, null]``, as diffusers writes them);
    ``opdkit.json`` keeps world, ``max_sequence_length`` and ``model.extra_config``. Refuses a
    transformer with LoRA adapters attached.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    _refuse_adapters(model, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
    }
    # Every SD3 pipeline slot, null unless filled below (diffusers' own way to mark absence).
    for slot in (
        "feature_extractor", "image_encoder", "vae", "text_encoder", "text_encoder_2",
        "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
    ):  # fmt: skip
        index[slot] = [None, None]

    def put(slot: str, obj: Any, **kwargs: Any) -> None:
        obj.save_pretrained(str(out / slot), **kwargs)
        index[slot] = [type(obj).__module__.split(".")[0], type(obj).__name__]

    put("transformer", model.transformer, safe_serialization=True)
    clip_slots = iter([("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")])
    for encoder, tokenizer, kind in zip(model.text_encoders, model.tokenizers, model.encoder_kinds, strict=True):
        encoder_slot, tokenizer_slot = next(clip_slots) if kind == "clip" else ("text_encoder_3", "tokenizer_3")
        put(encoder_slot, encoder, safe_serialization=True)
        put(tokenizer_slot, tokenizer)
    if model.vae is not None:
        put("vae", model.vae, safe_serialization=True)
    scheduler_config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    scheduler_config["shift"] = model.shift
    put("scheduler", FlowMatchEulerDiscreteScheduler.from_config(scheduler_config))
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    write_opdkit_config(
        out, {**model.extra_config, "world": model.world, "max_sequence_length": model.max_sequence_length}
    )
    return out


def _refuse_adapters(model: FlowModel, out_dir: str | Path) -> None:
    if model.lora_names():
        raise OpdkitError(
            f"cannot save_pretrained to {str(out_dir)!r} with LoRA adapters attached "
            f"({', '.join(model.lora_names())}); merge_lora() or save_lora() them first"
        )


def save_family_pipeline(model: PackedFlowModel, out_dir: str | Path) -> Path:
    """Write a FLUX / Qwen-Image model as its diffusers pipeline folder plus ``opdkit.json``.

    The pipeline class named by ``model.pipeline_class`` saves its own components (safetensors),
    with a FlowMatchEulerDiscreteScheduler of the model's scheduler config; ``opdkit.json``
    keeps world, ``max_sequence_length``, the family's own settings and ``model.extra_config``.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    _refuse_adapters(model, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    pipeline_cls = getattr(diffusers, model.pipeline_class)
    pipe = pipeline_cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(config), **model.pipeline_components())
    save_pipeline(pipe, out)
    write_opdkit_config(
        out,
        {**model.extra_config, **model.opdkit_config(), "world": model.world,
         "max_sequence_length": model.max_sequence_length},
    )  # fmt: skip
    return out


def save_pipeline(pipe: Any, out_dir: str | Path) -> None:
    """``save_pretrained`` of a diffusers pipeline (safetensors) without its "None cannot be saved" warnings."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(previous)
