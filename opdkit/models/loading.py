"""Pipeline directories: reading SD3-family models in the diffusers layout (writing: :mod:`.saving`).

A model directory is a ``StableDiffusion3Pipeline`` folder: ``model_index.json`` naming one
sub-folder per component (``transformer``, CLIP ``text_encoder``/``_2`` with their tokenizers,
T5 ``text_encoder_3``, ``vae``, ``scheduler``), weights as safetensors, plus opdkit's own
``opdkit.json`` beside the index for what that layout has no slot for (the world name, the
T5/zero-padding sequence length, e.g. the shapes model's config). SD3.5-M/L, the tiny test
pipelines and the shapes-world model all load through :func:`load_flow_model`;
:func:`resolution_problem` reads the same configs to check a recipe's resolution without loading.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.models.adapters import ATTENTION_LORA_TARGETS
from opdkit.models.flow_model import DEFAULT_MAX_SEQUENCE_LENGTH, FlowModel, encoder_kind

# opdkit's additions to a pipeline directory, written beside model_index.json.
from opdkit.models.saving import OPDKIT_CONFIG

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float32"``... (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise OpdkitError(f"unknown dtype {dtype!r} (expected one of: {', '.join(_DTYPES)})") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (errors shown to users are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# SD3 pipeline slots: (text encoder, tokenizer, kind). CLIP-L, CLIP-G, T5-XXL.
_TEXT_SLOTS: tuple[tuple[str, str, str], ...] = (
    ("text_encoder", "tokenizer", "clip"),
    ("text_encoder_2", "tokenizer_2", "clip"),
    ("text_encoder_3", "tokenizer_3", "t5"),
)
# Only classes from these libraries are instantiated from model_index.json.
_ALLOWED_LIBRARIES = ("diffusers", "transformers")
_HUB_PREFIXES = ("hf://", "hf:")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve_path(path: str | Path) -> Path:
    """Local directory, or ``hf:owner/name`` downloaded explicitly from the Hugging Face hub."""
    text = str(path)
    for prefix in _HUB_PREFIXES:
        if text.startswith(prefix):
            repo_id = text[len(prefix) :]
            if not _HUB_ID.match(repo_id):
                raise OpdkitError(f"model path {text!r}: {repo_id!r} is not a hub id of the form owner/name")
            try:
                from huggingface_hub import snapshot_download

                return Path(
                    snapshot_download(
                        repo_id,
                        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                    )
                )
            except Exception as exc:
                raise OpdkitError(
                    f"cannot download {repo_id!r} from the Hugging Face hub: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
    local = Path(text).expanduser()
    if not local.exists():
        hint = " (for a Hugging Face hub id write hf:owner/name)" if _HUB_ID.match(text) else ""
        raise OpdkitError(f"model path {text!r} does not exist{hint}")
    if not local.is_dir():
        raise OpdkitError(f"model path {text!r} is not a directory (expected a diffusers pipeline folder)")
    return local


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise OpdkitError(f"{what}: {str(file)!r} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise OpdkitError(f"{what}: {str(file)!r} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise OpdkitError(f"{what}: {str(file)!r} must hold a JSON object")
    return data


def _component_class(root: Path, index: dict[str, Any], name: str) -> Any | None:
    """The class model_index.json declares for component ``name``; None when absent."""
    entry = index.get(name)
    if (
        entry is None
        or not isinstance(entry, list)
        or len(entry) != 2
        or entry[0] is None
        or entry[1] is None
    ):
        return None
    library, class_name = str(entry[0]), str(entry[1])
    if library not in _ALLOWED_LIBRARIES:
        raise OpdkitError(
            f"{root / 'model_index.json'}: component {name!r} comes from library {library!r}; "
            f"only {', '.join(_ALLOWED_LIBRARIES)} are loaded"
        )
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise OpdkitError(
            f"{root / 'model_index.json'}: component {name!r}: {library} has no class {class_name!r}"
        )
    return cls


def _load_component(root: Path, name: str, cls: Any, *, dtype: torch.dtype | None) -> Any:
    folder = root / name
    if not folder.is_dir():
        raise OpdkitError(f"component {name!r} is listed in model_index.json but {str(folder)!r} is missing")
    try:
        if dtype is None:  # tokenizers
            return cls.from_pretrained(str(folder))
        if cls.__module__.startswith("transformers"):
            return cls.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
        return cls.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    except OpdkitError:
        raise
    except Exception as exc:
        raise OpdkitError(
            f"cannot load component {name!r} ({cls.__name__}) from {str(folder)!r}: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _load_transformer(root: Path, index: dict[str, Any], path: str | Path, dtype: torch.dtype) -> Any:
    transformer_cls = _component_class(root, index, "transformer")
    if transformer_cls is None:
        raise OpdkitError(f"model {str(path)!r}: model_index.json has no 'transformer' component")
    return _load_component(root, "transformer", transformer_cls, dtype=dtype)


def load_transformer(
    path: str | Path, *, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
) -> Any:
    """Only the ``transformer`` component of a pipeline directory (``path`` as in :func:`load_flow_model`).

    A full-checkpoint OPD teacher is run on the student's prompt embeddings, so its own text
    encoders and VAE would be loaded only to be thrown away (about 10 GB for SD3.5-M).
    """
    root = _resolve_path(path)
    index = _read_json(root / "model_index.json", f"model {str(path)!r}")
    return _load_transformer(root, index, path, parse_dtype(dtype)).to(device=device)


def load_flow_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    world: str | None = None,
    max_sequence_length: int | None = None,
    text_dtype: torch.dtype | str | None = None,
    family_options: dict[str, Any] | None = None,
    family: str | None = None,
) -> FlowModel:
    """Load a flow model from a pipeline dir: SD3 (SD3.5, tiny test pipelines, the shapes model),
    FLUX.1 or Qwen-Image, by model_index.json's ``_class_name`` (:data:`PIPELINE_FAMILIES`).

    The SD3 layout is described here; FLUX (``FluxPipeline``: transformer, CLIP
    ``text_encoder``, T5 ``text_encoder_2``, vae, scheduler) and Qwen-Image
    (``QwenImagePipeline``: transformer, Qwen2.5-VL ``text_encoder``, vae, scheduler) need every
    component and are built by :class:`~opdkit.models.flux.FluxModel` /
    :class:`~opdkit.models.qwen_image.QwenImageModel`.

    Reads ``model_index.json`` and loads each present component with ``from_pretrained``
    (safetensors only): ``transformer`` (required), ``text_encoder``/``tokenizer`` and
    ``text_encoder_2``/``tokenizer_2`` (CLIP), ``text_encoder_3``/``tokenizer_3`` (T5), ``vae``
    (absent = pixel space), ``scheduler`` config (for ``shift``). Components set to
    ``[null, null]`` or missing from the index are treated as absent.

    Args:
        path: local directory, or ``hf:owner/name`` to download from the hub explicitly.
        dtype: weights dtype for every module.
        device: device for every module.
        world: ``"sd3"``/``"shapes"``; default from ``opdkit.json`` in the directory, else
            ``"sd3"``.
        max_sequence_length: T5 (or zero-padding) tokens; default from ``opdkit.json``, else 256.
        text_dtype: weights dtype of the (frozen) text encoders; default ``dtype``. bf16 halves
            SD3.5's T5-XXL (4.7B parameters: 19 GB in fp32) next to an fp32 transformer; the
            prompt embeddings are cast to the transformer's dtype either way.
        family_options: a family's own settings, None values ignored: FLUX ``guidance``,
            Qwen-Image ``negative_prompt`` (default: ``opdkit.json``, else the family's).
        family: the family the folder must hold (a model plug-in's name); None accepts any.

    Raises:
        OpdkitError: one line naming the path and component when something is missing/broken.
    """
    root = _resolve_path(path)
    index = _read_json(root / "model_index.json", f"model {str(path)!r}")
    extra = _read_json(root / OPDKIT_CONFIG, "opdkit config") if (root / OPDKIT_CONFIG).exists() else {}
    torch_dtype = parse_dtype(dtype)
    encoder_dtype = torch_dtype if text_dtype is None else parse_dtype(text_dtype)
    class_name = str(index.get("_class_name", "StableDiffusion3Pipeline"))
    found = PIPELINE_FAMILIES.get(class_name)
    if found is None:
        raise OpdkitError(
            f"model {str(path)!r}: model_index.json's _class_name {class_name!r} is no family opdkit "
            f"loads (expected one of: {', '.join(PIPELINE_FAMILIES)})"
        )
    if family is not None and found != family:
        raise OpdkitError(f"model {str(path)!r} is a {class_name} folder: use model type {found!r}, not {family!r}")
    if found != "sd3":
        settings = {"world": world, "max_sequence_length": max_sequence_length, **(family_options or {})}
        try:
            model = _load_packed(found, root, index, extra, path, torch_dtype, encoder_dtype, settings)
        except OpdkitError as exc:
            raise OpdkitError(f"model {str(path)!r}: {exc}") from None
        return model.to(device=device)

    transformer = _load_transformer(root, index, path, torch_dtype)

    encoders: list[Any] = []
    tokenizers: list[Any] = []
    kinds: list[str] = []
    for encoder_name, tokenizer_name, kind in _TEXT_SLOTS:
        encoder_cls = _component_class(root, index, encoder_name)
        if encoder_cls is None:
            continue
        tokenizer_cls = _component_class(root, index, tokenizer_name)
        if tokenizer_cls is None:
            raise OpdkitError(
                f"model {str(path)!r}: {encoder_name!r} is present but {tokenizer_name!r} is not"
            )
        encoder = _load_component(root, encoder_name, encoder_cls, dtype=encoder_dtype)
        if encoder_kind(encoder) != kind:
            raise OpdkitError(
                f"model {str(path)!r}: {encoder_name!r} is a {type(encoder).__name__}; SD3 expects "
                f"{'CLIPTextModelWithProjection' if kind == 'clip' else 'T5EncoderModel'} there"
            )
        encoders.append(encoder)
        tokenizers.append(_load_component(root, tokenizer_name, tokenizer_cls, dtype=None))
        kinds.append(kind)

    vae = None
    vae_cls = _component_class(root, index, "vae")
    if vae_cls is not None:
        vae = _load_component(root, "vae", vae_cls, dtype=torch_dtype)

    scheduler_config: dict[str, Any] = {}
    if _component_class(root, index, "scheduler") is not None:
        scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", "component 'scheduler'")
    # diffusers' FlowMatchEulerDiscreteScheduler default shift is 1.0.
    shift = float(scheduler_config.get("shift", 1.0))

    if max_sequence_length is None:
        max_sequence_length = int(extra.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
    try:
        model = FlowModel(
            transformer,
            encoders,
            tokenizers,
            vae,
            world=world or str(extra.get("world", "sd3")),
            shift=shift,
            max_sequence_length=max_sequence_length,
            encoder_kinds=kinds,
            scheduler_config=scheduler_config,
            extra_config={k: v for k, v in extra.items() if k not in ("world", "max_sequence_length")},
        )
    except OpdkitError as exc:
        raise OpdkitError(f"model {str(path)!r}: {exc}") from None
    if model.world == "shapes":
        model.lora_targets = ATTENTION_LORA_TARGETS  # what the shapes recipes and teachers adapt
    return model.to(device=device)


def pipeline_sources(path: str | Path) -> list[Path] | None:
    """What :attr:`FlowModel.sources` says of a model :func:`load_flow_model` loaded from ``path``
    alone: that folder, or None for a hub id (a later call may fetch newer files).

    Set by the built-in model plug-ins, not by the loader: a custom plug-in may read more files
    than the folder it names, so its models' origin stays unknown.
    """
    return None if str(path).startswith(_HUB_PREFIXES) else [Path(path).expanduser().resolve()]


# model_index.json's _class_name -> the family (the ``model`` plug-in) that loads it
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen-image",
}
# Per family: its text slots (encoder, tokenizer), and the opdkit.json keys of its own settings.
_PACKED_SLOTS: dict[str, tuple[tuple[str, str], ...]] = {
    "flux": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
    "qwen-image": (("text_encoder", "tokenizer"),),
}
_PACKED_SETTINGS: dict[str, tuple[str, ...]] = {"flux": ("guidance",), "qwen-image": ("negative_prompt",)}


def _load_packed(
    family: str,
    root: Path,
    index: dict[str, Any],
    extra: dict[str, Any],
    path: str | Path,
    dtype: torch.dtype,
    text_dtype: torch.dtype,
    settings: dict[str, Any],
) -> Any:
    """A FLUX or Qwen-Image model from its pipeline folder (every component required).

    ``settings``: world, max_sequence_length and the family's own options (None: the folder's
    ``opdkit.json``, else the family default).
    """
    transformer = _load_transformer(root, index, path, dtype)
    encoders, tokenizers = [], []
    for encoder_name, tokenizer_name in _PACKED_SLOTS[family]:
        encoder_cls, tokenizer_cls = _component_class(root, index, encoder_name), _component_class(root, index, tokenizer_name)
        if encoder_cls is None or tokenizer_cls is None:
            raise OpdkitError(f"model_index.json lacks {encoder_name!r} or {tokenizer_name!r}, which {family} needs")
        encoders.append(_load_component(root, encoder_name, encoder_cls, dtype=text_dtype))
        tokenizers.append(_load_component(root, tokenizer_name, tokenizer_cls, dtype=None))
    vae_cls = _component_class(root, index, "vae")
    if vae_cls is None:
        raise OpdkitError(f"model_index.json has no 'vae', which {family} needs")
    vae = _load_component(root, "vae", vae_cls, dtype=dtype)
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", "component 'scheduler'")
    own = set(_PACKED_SETTINGS[family]) | {"world", "max_sequence_length"}
    options = {k: extra[k] for k in own if k in extra}
    options.update({k: v for k, v in settings.items() if v is not None})
    common = {"scheduler_config": scheduler_config, "extra_config": {k: v for k, v in extra.items() if k not in own}}
    if family == "flux":
        from opdkit.models.flux import FluxModel

        return FluxModel(transformer, encoders, tokenizers, vae, **options, **common)
    from opdkit.models.qwen_image import QwenImageModel

    return QwenImageModel(transformer, encoders[0], tokenizers[0], vae, **options, **common)


def resolution_problem(model_type: str, params: dict[str, Any], resolution: int) -> str | None:
    """What is wrong with sampling ``resolution`` px with a built-in model, read from its configs
    without loading weights (None when it fits, or when the model is not one we can read).

    The image side must be a multiple of the VAE factor x the patch side, and its token grid must
    fit the transformer's ``pos_embed_max_size``. Lets ``opdkit validate`` refuse what training
    would only find out after building the model.
    """
    facts = _grid_facts(model_type, params)
    return None if facts is None else _side_problem(resolution, *facts)


def logprob_pool_problem(model_type: str, params: dict[str, Any], resolution: int, pool: int) -> str | None:
    """What is wrong with ``sampler.logprob_pool`` ``pool`` at ``resolution`` px: it must divide the
    side of the states' (latent) grid, resolution / the VAE factor. None when it does, or when the
    model is not one whose configs we can read."""
    facts = _grid_facts(model_type, params) if pool > 1 else None
    if facts is None:
        return None
    side = resolution // facts[0]
    if side % pool:
        return f"{pool} does not divide the {side}x{side} grid of the states at sampler.resolution {resolution} (VAE factor {facts[0]})"
    return None


def _grid_facts(model_type: str, params: dict[str, Any]) -> tuple[int, int, int | None] | None:
    """(VAE factor, patch side, largest side in patches or None) of a built-in model, from its
    configs without loading weights; None for a model we cannot read."""
    if model_type == "shapes_new":  # pixel space, built from these params
        patch = int(params.get("patch_size", 2))
        return 1, patch, int(params.get("resolution", 32)) // patch
    if model_type in ("flux", "qwen-image"):  # 2x2 packed latents, no token limit
        given = params.get("path")
        vae_file = Path(str(given)).expanduser() / "vae" / "config.json" if given is not None else None
        if vae_file is None or not vae_file.is_file():
            return None
        vae = _read_json(vae_file, "model.path")
        if "temperal_downsample" in vae:  # Qwen-Image's video VAE
            factor = 2 ** len(vae["temperal_downsample"])
        else:
            factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
        return factor, 2, None
    if model_type in ("shapes", "shapes-base", "sd3"):
        from opdkit.checkpoint import COMMITTED_DIR

        given = params.get("path")
        if given is None and model_type == "sd3":
            return None
        folder = Path(str(given)).expanduser() if given is not None else COMMITTED_DIR / "shapes-base"
        config = folder / "transformer" / "config.json"
        if not config.is_file():
            return None  # not a local folder (a hub id, or missing: the builder says so)
        transformer = _read_json(config, "model.path")
        vae_file = folder / "vae" / "config.json"
        vae = _read_json(vae_file, "model.path") if vae_file.is_file() else None
        factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1) if vae else 1
        limit = transformer.get("pos_embed_max_size")
        return factor, int(transformer.get("patch_size", 1)), int(limit) if limit else None
    return None


def _side_problem(resolution: int, factor: int, patch: int, max_tokens: int | None) -> str | None:
    cell = factor * patch
    if resolution % cell:
        return f"{resolution} is not a multiple of {cell} (the model's VAE factor {factor} x patch {patch})"
    if max_tokens is not None and resolution // cell > max_tokens:
        return f"{resolution} is above the model's largest side, {max_tokens * cell} px ({max_tokens} patches)"
    return None
