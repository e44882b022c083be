"""The flow-model adapter the trainers use, and the one loader of the SD3 family.

:class:`FlowModel` wraps a diffusers ``SD3Transformer2DModel`` plus whatever text encoders and
VAE a pipeline directory holds, and exposes the few operations GRPO/OPD/pretraining need, in
plain tensors: :meth:`~FlowModel.encode_prompts`, :meth:`~FlowModel.velocity`,
:meth:`~FlowModel.decode`, :meth:`~FlowModel.encode_images`, plus LoRA adapter management.

Conventions (DESIGN §2): ``sigma`` in [0, 1] with 1 = pure noise, ``x_sigma = (1 - sigma) x0 +
sigma eps``, velocity ``v = eps - x0``, transformer timestep ``sigma * 1000``.

:func:`load_flow_model` reads a diffusers pipeline directory (``model_index.json`` and one
folder per component) for SD3.5-M/L, the tiny test pipelines and the shapes-world model alike.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opdkit.errors import OpdkitError

# Written by opdkit's builders beside model_index.json (see opdkit.models.tiny).
OPDKIT_CONFIG = "opdkit.json"
# diffusers' StableDiffusion3Pipeline default for the T5 sequence length.
DEFAULT_MAX_SEQUENCE_LENGTH = 256
# The attention projections flow_grpo adapts on SD3 (joint attention: image and text streams).
SD3_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
_LORA_FORMAT = "opdkit-lora/1"

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


@dataclass
class Cond:
    """Text conditioning of a batch, as the SD3 transformer consumes it.

    Attributes:
        prompt_embeds: (B, L, D) token embeddings, D = transformer ``joint_attention_dim``
            (CLIP penultimate states, channel-concatenated and zero-padded, then T5 tokens or
            zero tokens along L).
        pooled: (B, P) pooled embedding, P = ``pooled_projection_dim`` (concat of CLIP
            ``text_embeds``).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def cat(self, other: Cond) -> Cond:
        """Batch-concatenate (used to run cond and uncond in one forward)."""
        return Cond(
            torch.cat([self.prompt_embeds, other.prompt_embeds], dim=0),
            torch.cat([self.pooled, other.pooled], dim=0),
        )

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> Cond:
        """Select batch rows; an int index keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cond(self.prompt_embeds[index], self.pooled[index])

    def repeat_interleave(self, repeats: int) -> Cond:
        """Each row ``repeats`` times in a row (a GRPO group per prompt)."""
        return Cond(
            self.prompt_embeds.repeat_interleave(repeats, dim=0),
            self.pooled.repeat_interleave(repeats, dim=0),
        )

    def expand(self, batch_size: int) -> Cond:
        """A batch of ``batch_size`` copies of a single-row Cond (views, no copy)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch of 1, got {len(self)}")
        return Cond(
            self.prompt_embeds.expand(batch_size, -1, -1),
            self.pooled.expand(batch_size, -1),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        return Cond(
            self.prompt_embeds.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype)
        )


class FlowModel:
    """SD3-architecture flow model with its text encoders and (optional) VAE.

    Attributes:
        transformer: the ``SD3Transformer2DModel`` (the only part trainers update).
        text_encoders: present text encoders in SD3 order (CLIP-L, CLIP-G, T5); frozen.
        tokenizers: their tokenizers, same order.
        encoder_kinds: ``"clip"`` or ``"t5"`` per text encoder.
        vae: ``AutoencoderKL`` or None (pixel space: x in [-1, 1] is the image itself).
        world: ``"sd3"`` or ``"shapes"``; benchmarks refuse models of another world.
        shift: SD3 schedule shift from the scheduler config (3.0 for SD3.5).
        max_sequence_length: T5 tokens, or zero tokens appended when there is no T5 (SD3
            pipeline behaviour; 0 for the shapes model so no tokens are wasted).
        scheduler_config: the scheduler's config dict (written back by :meth:`save_pretrained`).
        extra_config: other keys of the directory's ``opdkit.json``.
    """

    def __init__(
        self,
        transformer: Any,
        text_encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        vae: Any | None = None,
        *,
        world: str = "sd3",
        shift: float = 3.0,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        encoder_kinds: Sequence[str] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        if len(text_encoders) != len(tokenizers):
            raise ValueError(f"{len(text_encoders)} text encoders but {len(tokenizers)} tokenizers")
        # diffusers/transformers modules are typed Any: their configs are dynamic attributes.
        self.transformer: Any = transformer
        self.text_encoders: list[Any] = list(text_encoders)
        self.tokenizers: list[Any] = list(tokenizers)
        self.encoder_kinds: list[str] = (
            list(encoder_kinds) if encoder_kinds is not None else [_encoder_kind(e) for e in text_encoders]
        )
        self.vae: Any | None = vae
        self.world = world
        self.shift = float(shift)
        self.max_sequence_length = int(max_sequence_length)
        self._base_fingerprint: str | None = None  # see base_fingerprint()
        self.scheduler_config: dict[str, Any] = dict(scheduler_config or {})
        # Other keys of opdkit.json (e.g. the shapes config), written back by save_pretrained.
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self._uncond_cache: Cond | None = None
        for module in [*self.text_encoders, *([vae] if vae is not None else [])]:
            module.eval().requires_grad_(False)
        self._check_dimensions()

    # -- basic properties ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD3's VAE, 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlowModel:
        """Move every component (in place); returns self."""
        target = torch.device(device) if device is not None else None
        for module in [self.transformer, *self.text_encoders, *([self.vae] if self.vae is not None else [])]:
            current = next(module.parameters())
            # Skip no-op moves: diffusers warns on every ModelMixin.to() call of a model that
            # declares fp32-only modules, even when nothing changes.
            if (target is None or current.device == target) and (dtype is None or current.dtype == dtype):
                continue
            module.to(device=target, dtype=dtype)
        self._uncond_cache = None
        return self

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the transformer's input for square images of ``resolution`` pixels."""
        cell = self.vae_scale_factor * int(self.transformer.config.patch_size)
        if resolution % cell:
            raise ValueError(
                f"resolution {resolution} must be a multiple of {cell} (VAE factor x patch size)"
            )
        side = resolution // self.vae_scale_factor
        return (self.in_channels, side, side)

    # -- text ----------------------------------------------------------------------------------
    @property
    def clip_max_length(self) -> int:
        """Token count of every CLIP encoder: the first CLIP tokenizer's ``model_max_length``.

        As in diffusers' SD3 pipeline, which pads both CLIP tokenizers to the first one's length
        (77 for SD3.5) so their hidden states can be concatenated channel-wise.
        """
        for tokenizer, kind in zip(self.tokenizers, self.encoder_kinds, strict=True):
            if kind == "clip":
                return int(tokenizer.model_max_length)
        return 77

    def encode_prompts(self, prompts: Sequence[str], *, grad: bool = False) -> Cond:
        """Encode prompts the SD3 way, with whatever encoders are present.

        CLIP encoders: penultimate hidden states (B, Lc, Hi) concatenated channel-wise and
        zero-padded to ``joint_attention_dim``; their ``text_embeds`` concatenated into
        ``pooled``. T5 (if any): last hidden state (B, max_sequence_length, D) appended along the
        sequence; without T5, ``max_sequence_length`` zero tokens are appended instead. Prompts
        longer than a tokenizer's length are truncated (as in diffusers).

        Runs under ``no_grad`` (encoders are frozen) unless ``grad`` is True: pretraining of the
        shapes model trains its text encoder too (the caller sets ``requires_grad``). The result
        is in the model dtype.

        Returns:
            :class:`Cond` with prompt_embeds (B, Lc + max_sequence_length, D) and pooled (B, P).
        """
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self._encode(list(prompts))

    def _encode(self, texts: list[str]) -> Cond:
        """:meth:`encode_prompts` without the grad-mode handling."""
        device, dtype = self.device, self.dtype
        batch = len(texts)
        joint_dim = int(self.transformer.config.joint_attention_dim)
        clip_states: list[torch.Tensor] = []
        pooled_parts: list[torch.Tensor] = []
        t5_states: torch.Tensor | None = None
        for encoder, tokenizer, kind in zip(
            self.text_encoders, self.tokenizers, self.encoder_kinds, strict=True
        ):
            enc_device = next(encoder.parameters()).device
            if kind == "clip":
                ids = tokenizer(
                    texts,
                    padding="max_length",
                    max_length=self.clip_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(enc_device)
                # No attention mask, as in SD3: CLIP is causal, so trailing pads change nothing
                # before the end token, and the pad positions' states are part of the sequence.
                out = encoder(ids, output_hidden_states=True)
                clip_states.append(out.hidden_states[-2].to(device=device, dtype=dtype))
                pooled_parts.append(out.text_embeds.to(device=device, dtype=dtype))
            else:
                ids = tokenizer(
                    texts,
                    padding="max_length",
                    max_length=self.max_sequence_length,
                    truncation=True,
                    add_special_tokens=True,
                    return_tensors="pt",
                ).input_ids.to(enc_device)
                t5_states = encoder(ids)[0].to(device=device, dtype=dtype)
        if clip_states:
            clip = torch.cat(clip_states, dim=-1)
            clip = nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
        else:
            clip = torch.zeros(batch, 0, joint_dim, device=device, dtype=dtype)
        if t5_states is None:
            t5_states = torch.zeros(batch, self.max_sequence_length, joint_dim, device=device, dtype=dtype)
        pooled = (
            torch.cat(pooled_parts, dim=-1)
            if pooled_parts
            else torch.zeros(batch, 0, device=device, dtype=dtype)
        )
        return Cond(torch.cat([clip, t5_states], dim=1), pooled)

    def uncond(self, batch_size: int) -> Cond:
        """The empty-prompt conditioning (CFG's unconditional branch), cached, as (batch_size, ...).

        The returned tensors are expanded views of one cached row; do not modify them in place.
        """
        if self._uncond_cache is None or self._uncond_cache.prompt_embeds.device != self.device:
            self._uncond_cache = self.encode_prompts([""])
        return self._uncond_cache.expand(batch_size)

    # -- flow ----------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` at noise level ``sigma``.

        Args:
            x: (B, C, h, w) noisy latents (or pixels in [-1, 1] scale in pixel space).
            sigma: (B,) or scalar noise level in [0, 1]; fed to the transformer as sigma * 1000.
            cond: conditioning with batch B (see :meth:`encode_prompts`).

        Returns:
            (B, C, h, w) velocity in the dtype of ``x`` (the transformer runs in the model dtype).
        """
        batch = x.shape[0]
        if len(cond) != batch:
            raise ValueError(f"velocity: x has batch {batch} but cond has {len(cond)}")
        device, dtype = self.device, self.dtype
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        if sigma_t.numel() == 1:
            sigma_t = sigma_t.expand(batch)
        out = self.transformer(
            hidden_states=x.to(device=device, dtype=dtype),
            timestep=sigma_t * 1000.0,
            encoder_hidden_states=cond.prompt_embeds.to(device=device, dtype=dtype),
            pooled_projections=cond.pooled.to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    # -- images --------------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images (B, 3, H, W) float in [0, 1] (clamped).

        With a VAE: ``z = x / scaling_factor + shift_factor`` then VAE decode. In pixel space
        ``x`` already is the image in [-1, 1].
        """
        if self.vae is None:
            images = x.float()
        else:
            scaling, shift = self._vae_factors()
            z = x.to(device=self.vae.device, dtype=self.vae.dtype) / scaling + shift
            images = self.vae.decode(z, return_dict=False)[0].float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> model space x0 (inverse of :meth:`decode`).

        With a VAE the latent distribution's mean is used unless ``sample`` is True.
        Returns a tensor in the model dtype on the model device.
        """
        pixels = images.to(device=self.device, dtype=torch.float32) * 2.0 - 1.0
        if self.vae is None:
            return pixels.to(self.dtype)
        scaling, shift = self._vae_factors()
        dist = self.vae.encode(pixels.to(self.vae.dtype), return_dict=False)[0]
        z = dist.sample(generator) if sample else dist.mode()
        return ((z - shift) * scaling).to(self.dtype)

    def _vae_factors(self) -> tuple[float, float]:
        assert self.vae is not None
        scaling = float(self.vae.config.scaling_factor)
        shift = self.vae.config.get("shift_factor", None)
        return scaling, float(shift) if shift is not None else 0.0

    # -- saving --------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model in the StableDiffusion3Pipeline layout that :func:`load_flow_model` reads.

        Every module is saved with ``save_pretrained`` (safetensors); ``model_index.json`` names
        the present components (absent ones as ``[null, null]``, as diffusers writes them);
        ``opdkit.json`` keeps world, ``max_sequence_length`` and :attr:`extra_config`. Refuses a
        transformer with LoRA adapters attached: merge them (:meth:`merge_lora`) or save them
        separately (:meth:`save_lora`).
        """
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.lora_names():
            raise OpdkitError(
                f"cannot save_pretrained to {str(out_dir)!r} with LoRA adapters attached "
                f"({', '.join(self.lora_names())}); merge_lora() or save_lora() them first"
            )
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

        put("transformer", self.transformer, safe_serialization=True)
        clip_slots = iter([("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")])
        for encoder, tokenizer, kind in zip(
            self.text_encoders, self.tokenizers, self.encoder_kinds, strict=True
        ):
            encoder_slot, tokenizer_slot = (
                next(clip_slots) if kind == "clip" else ("text_encoder_3", "tokenizer_3")
            )
            put(encoder_slot, encoder, safe_serialization=True)
            put(tokenizer_slot, tokenizer)
        if self.vae is not None:
            put("vae", self.vae, safe_serialization=True)
        scheduler_config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        scheduler_config["shift"] = self.shift
        put("scheduler", FlowMatchEulerDiscreteScheduler.from_config(scheduler_config))
        (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
        extra = {**self.extra_config, "world": self.world, "max_sequence_length": self.max_sequence_length}
        (out / OPDKIT_CONFIG).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        return out

    # -- LoRA (peft on the transformer) --------------------------------------------------------
    def add_lora(
        self,
        name: str = "default",
        *,
        rank: int = 32,
        alpha: int = 64,
        target_modules: Sequence[str] = SD3_LORA_TARGETS,
        dropout: float = 0.0,
        init_lora_weights: Any = "gaussian",
    ) -> None:
        """Add a LoRA adapter ``name`` to the transformer and make it the active one.

        ``init_lora_weights="gaussian"`` (flow_grpo's choice) starts B at zero, so a fresh
        adapter leaves the model unchanged. peft marks only adapter weights trainable.

        The adapter weights are float32 whatever the base dtype: on a bf16/fp16 base, peft would
        create them in the base's dtype, where AdamW's small updates round away (bf16 keeps 8
        mantissa bits: an update below 1/256 of a weight is lost). peft's LoRA layers cast their
        input to the adapter's dtype and the result back, so a bf16 base with fp32 adapters is
        the usual memory-saving setup, not a mixed-dtype error.
        """
        from peft import LoraConfig

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(target_modules),
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
        )
        with warnings.catch_warnings():
            # peft warns on every second adapter; several named adapters are intended here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.transformer.add_adapter(config, adapter_name=name)
        for param in self.lora_parameters(name):
            if param.dtype != torch.float32:
                param.data = param.data.float()

    def lora_names(self) -> list[str]:
        """Names of the adapters attached to the transformer."""
        return list(getattr(self.transformer, "peft_config", {}) or {})

    def set_adapter(self, name: str | list[str]) -> None:
        """Activate adapter(s) ``name``; peft makes the active ones trainable, the others frozen."""
        self.transformer.set_adapter(name)

    def active_adapters(self) -> list[str]:
        active = self.transformer.active_adapters() if self.lora_names() else []
        return [active] if isinstance(active, str) else list(active or [])

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model (e.g. the GRPO reference policy) inside the block.

        On exit the previously active adapters are enabled again (and made trainable again).
        Without adapters this is a no-op.
        """
        if not self.lora_names():
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def lora_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of adapter ``name`` (all adapters when None), in module order."""
        wanted = f".{name}." if name is not None else None
        return [
            p
            for n, p in self.transformer.named_parameters()
            if "lora_" in n and (wanted is None or wanted in n + ".")
        ]

    def base_fingerprint(self) -> str:
        """Short SHA-256 of the base transformer weights (adapters excluded), cached.

        Saved in every LoRA file and checked when one is loaded: a LoRA delta only means something
        on the base it was trained on. Hashes each tensor's name, shape and up to 4,096 of its
        first and last values rounded to bf16, so it costs milliseconds even for SD3.5-M and
        agrees between an fp32 and a bf16 copy of the same weights.
        """
        import hashlib

        if self._base_fingerprint is not None:
            return self._base_fingerprint
        digest = hashlib.sha256()
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                continue
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:2048], flat[-2048:]]) if flat.numel() > 4096 else flat
            digest.update(name.replace("base_layer.", "").encode())
            digest.update(str(tuple(p.shape)).encode())
            digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
        self._base_fingerprint = digest.hexdigest()[:16]
        return self._base_fingerprint

    def save_lora(self, name: str, path: str | Path) -> Path:
        """Save adapter ``name`` as safetensors; its LoRA config goes into the file's metadata."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if name not in self.lora_names():
            raise OpdkitError(
                f"no LoRA adapter named {name!r} (have: {', '.join(self.lora_names()) or 'none'})"
            )
        config = self.transformer.peft_config[name]
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        metadata = {
            "format": _LORA_FORMAT,
            "base_fingerprint": self.base_fingerprint(),
            "rank": str(config.r),
            "alpha": str(config.lora_alpha),
            "dropout": str(config.lora_dropout),
            "target_modules": json.dumps(sorted(config.target_modules)),
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out), metadata=metadata)
        return out

    def load_lora(self, path: str | Path, name: str = "default") -> str:
        """Load a LoRA saved by :meth:`save_lora` as adapter ``name`` (created if absent).

        Returns the adapter name. The adapter becomes the active one.
        """
        from peft.utils import set_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file

        file = Path(path)
        if not file.is_file():
            raise OpdkitError(f"LoRA file {str(file)!r} does not exist")
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(file), device=str(self.device))
        except Exception as exc:
            raise OpdkitError(
                f"cannot read LoRA file {str(file)!r}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        if metadata.get("format") != _LORA_FORMAT:
            raise OpdkitError(
                f"LoRA file {str(file)!r} was not written by opdkit (no {_LORA_FORMAT} metadata)"
            )
        trained_on = metadata.get("base_fingerprint")
        if trained_on is not None and trained_on != self.base_fingerprint():
            raise OpdkitError(
                f"LoRA file {str(file)!r} was trained on another base model (base fingerprint {trained_on}, "
                f"this base {self.base_fingerprint()}); retrain it on this base"
            )
        if name not in self.lora_names():
            self.add_lora(
                name,
                rank=int(metadata["rank"]),
                alpha=int(float(metadata["alpha"])),
                dropout=float(metadata.get("dropout", 0.0)),
                target_modules=json.loads(metadata["target_modules"]),
            )
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise OpdkitError(
                f"LoRA file {str(file)!r} does not fit this transformer: {len(unexpected)} unexpected keys "
                f"(first: {unexpected[0]})"
            )
        self.set_adapter(name)
        return name

    def merge_lora(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights and remove it (e.g. to export a model)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name not in self.lora_names():
            raise OpdkitError(
                f"no LoRA adapter named {name!r} (have: {', '.join(self.lora_names()) or 'none'})"
            )
        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[name])
        active = self.active_adapters()
        remaining = [n for n in self.lora_names() if n != name]
        if remaining and name in active:
            # peft would switch to another adapter itself, with a warning; say which one here
            self.set_adapter([n for n in active if n != name] or remaining[0])
        self.transformer.delete_adapters(name)
        self._base_fingerprint = None  # the base weights changed

    # -- checks --------------------------------------------------------------------------------
    def _check_dimensions(self) -> None:
        """Fail early, in one line, when encoders and transformer do not fit together."""
        config = self.transformer.config
        joint = int(config.joint_attention_dim)
        clip_hidden = 0
        clip_projection = 0
        for encoder, kind in zip(self.text_encoders, self.encoder_kinds, strict=True):
            if kind == "clip":
                clip_hidden += int(encoder.config.hidden_size)
                clip_projection += int(encoder.config.projection_dim)
            elif kind == "t5":
                if int(encoder.config.d_model) != joint:
                    raise OpdkitError(
                        f"T5 d_model {encoder.config.d_model} != transformer joint_attention_dim {joint}"
                    )
            else:
                raise OpdkitError(f"unknown text encoder kind {kind!r}")
        if clip_hidden > joint:
            raise OpdkitError(f"CLIP hidden sizes sum to {clip_hidden} > joint_attention_dim {joint}")
        if clip_projection != int(config.pooled_projection_dim):
            raise OpdkitError(
                f"CLIP projection sizes sum to {clip_projection} != pooled_projection_dim "
                f"{config.pooled_projection_dim}"
            )
        expected_channels = int(self.vae.config.latent_channels) if self.vae is not None else 3
        if int(config.in_channels) != expected_channels:
            what = "VAE latent channels" if self.vae is not None else "3 (pixel space, no VAE)"
            raise OpdkitError(f"transformer in_channels {config.in_channels} != {what} {expected_channels}")


def _encoder_kind(encoder: Any) -> str:
    """``"clip"`` for a model returning ``text_embeds`` (CLIPTextModelWithProjection), else ``"t5"``."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if isinstance(encoder, CLIPTextModelWithProjection):
        return "clip"
    if isinstance(encoder, T5EncoderModel):
        return "t5"
    raise OpdkitError(
        f"unsupported text encoder {type(encoder).__name__} (expected CLIPTextModelWithProjection or T5EncoderModel)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------------------------
# loading

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
                    f"cannot download {repo_id!r} from the Hugging Face hub: {type(exc).__name__}: {_first_line(exc)}"
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
        raise OpdkitError(f"{what}: {str(file)!r} is not valid JSON: {_first_line(exc)}") from exc
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
            f"{type(exc).__name__}: {_first_line(exc)}"
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
) -> FlowModel:
    """Load an SD3-family model (SD3.5, tiny test pipelines, the shapes model) from a pipeline dir.

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

    Raises:
        OpdkitError: one line naming the path and component when something is missing/broken.
    """
    root = _resolve_path(path)
    index = _read_json(root / "model_index.json", f"model {str(path)!r}")
    extra = _read_json(root / OPDKIT_CONFIG, "opdkit config") if (root / OPDKIT_CONFIG).exists() else {}
    torch_dtype = parse_dtype(dtype)
    encoder_dtype = torch_dtype if text_dtype is None else parse_dtype(text_dtype)

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
        if _encoder_kind(encoder) != kind:
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
    return model.to(device=device)
