"""The flow-model interface the trainers, samplers and benchmarks use, and its SD3 implementation.

:class:`FlowModel` wraps a diffusers ``SD3Transformer2DModel`` plus whatever text encoders and
VAE a pipeline directory holds, and exposes the few operations GRPO/OPD/pretraining need, in
plain tensors: :meth:`~FlowModel.encode_prompts`, :meth:`~FlowModel.uncond`,
:meth:`~FlowModel.velocity`, :meth:`~FlowModel.decode`, :meth:`~FlowModel.encode_images`,
:meth:`~FlowModel.latent_shape`; LoRA adapter management comes from
:class:`~opdkit.models.adapters.LoraAdapters`. :class:`Cond` is a batch of text conditioning.

Conventions: ``sigma`` in [0, 1] with 1 = pure noise, ``x_sigma = (1 - sigma) x0 + sigma eps``,
velocity ``v = eps - x0``, transformer timestep ``sigma * 1000``.

Loading and saving pipeline directories lives in :mod:`opdkit.models.loading`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opdkit.errors import OpdkitError
from opdkit.models.adapters import LoraAdapters

# diffusers' StableDiffusion3Pipeline default for the T5 sequence length.
DEFAULT_MAX_SEQUENCE_LENGTH = 256


@dataclass
class Cond:
    """Text conditioning of a batch, as a family's transformer consumes it.

    Attributes:
        prompt_embeds: (B, L, D) token embeddings, D = transformer ``joint_attention_dim``
            (SD3: CLIP penultimate states, channel-concatenated and zero-padded, then T5 tokens
            or zero tokens along L; FLUX: T5 tokens; Qwen-Image: Qwen2.5-VL states).
        pooled: (B, P) pooled embedding, P = ``pooled_projection_dim`` (SD3: concat of CLIP
            ``text_embeds``; FLUX: CLIP's pooled output); (B, 0) for a family without one.
        mask: (B, L) 1 for a real token, 0 for padding, or None when every token is real
            (SD3, FLUX). Rows of different lengths are zero-padded at the end when batched.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def _padded(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds, mask) zero-padded to ``length`` tokens (the mask made explicit)."""
        embeds, mask = self.prompt_embeds, self.mask
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        extra = length - embeds.shape[1]
        if extra:
            embeds = nn.functional.pad(embeds, (0, 0, 0, extra))
            mask = nn.functional.pad(mask, (0, extra))
        return embeds, mask

    def cat(self, other: Cond) -> Cond:
        """Batch-concatenate (used to run cond and uncond in one forward)."""
        if (
            self.mask is None
            and other.mask is None
            and self.prompt_embeds.shape[1] == other.prompt_embeds.shape[1]
        ):
            return Cond(
                torch.cat([self.prompt_embeds, other.prompt_embeds], dim=0),
                torch.cat([self.pooled, other.pooled], dim=0),
            )
        length = max(self.prompt_embeds.shape[1], other.prompt_embeds.shape[1])
        (a, mask_a), (b, mask_b) = self._padded(length), other._padded(length)
        return Cond(torch.cat([a, b]), torch.cat([self.pooled, other.pooled]), torch.cat([mask_a, mask_b]))

    def where(self, rows: torch.Tensor, other: Cond) -> Cond:
        """Row i of ``other`` where ``rows[i]`` (a (B,) bool tensor) is True, else row i of self."""
        if (
            self.mask is None
            and other.mask is None
            and self.prompt_embeds.shape[1] == other.prompt_embeds.shape[1]
        ):
            return Cond(
                torch.where(rows.view(-1, 1, 1), other.prompt_embeds, self.prompt_embeds),
                torch.where(rows.view(-1, 1), other.pooled, self.pooled),
            )
        length = max(self.prompt_embeds.shape[1], other.prompt_embeds.shape[1])
        (a, mask_a), (b, mask_b) = self._padded(length), other._padded(length)
        return Cond(
            torch.where(rows.view(-1, 1, 1), b, a),
            torch.where(rows.view(-1, 1), other.pooled, self.pooled),
            torch.where(rows.view(-1, 1), mask_b, mask_a),
        )

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> Cond:
        """Select batch rows; an int index keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        mask = self.mask[index] if self.mask is not None else None
        return Cond(self.prompt_embeds[index], self.pooled[index], mask)

    def repeat_interleave(self, repeats: int) -> Cond:
        """Each row ``repeats`` times in a row (a GRPO group per prompt)."""
        return Cond(
            self.prompt_embeds.repeat_interleave(repeats, dim=0),
            self.pooled.repeat_interleave(repeats, dim=0),
            self.mask.repeat_interleave(repeats, dim=0) if self.mask is not None else None,
        )

    def expand(self, batch_size: int) -> Cond:
        """A batch of ``batch_size`` copies of a single-row Cond (views, no copy)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a batch of 1, got {len(self)}")
        return Cond(
            self.prompt_embeds.expand(batch_size, -1, -1),
            self.pooled.expand(batch_size, -1),
            self.mask.expand(batch_size, -1) if self.mask is not None else None,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        """Move (and cast the embeddings; the mask keeps its integer dtype)."""
        return Cond(
            self.prompt_embeds.to(device=device, dtype=dtype),
            self.pooled.to(device=device, dtype=dtype),
            self.mask.to(device=device) if self.mask is not None else None,
        )


class FlowModel(LoraAdapters):
    """SD3-architecture flow model with its text encoders and (optional) VAE; the base of every family.

    The other families (:class:`~opdkit.models.flux.FluxModel`,
    :class:`~opdkit.models.qwen_image.QwenImageModel`) subclass it and override the
    text encoding, :meth:`velocity`, :meth:`latent_shape`, :meth:`sigmas` and the checks; the
    device/dtype handling, the VAE transform, the empty-prompt cache and the LoRA management are
    shared.

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
        family: the model family's plug-in name (``"sd3"``, ``"flux"``, ``"qwen-image"``).
        lora_targets: module-name suffixes a recipe's LoRA adapts when it names none
            (``train.lora.targets``); flow_grpo's SD3 attention projections here.
    """

    family: str = "sd3"
    embedded_guidance: bool = False  # guidance is a transformer input (FLUX.1-dev): benchmarks use CFG 1
    negative_prompt: str = ""  # CFG's unconditional branch: the empty prompt, as SD3 samples
    # The local files and folders the weights were loaded from, or None (built in memory, fetched
    # from the hub): a study trusts its remembered fingerprint while they are untouched.
    sources: list[Path] | None = None

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
            list(encoder_kinds) if encoder_kinds is not None else [encoder_kind(e) for e in text_encoders]
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
            if kind == "clip":
                ids = padded_ids(tokenizer, texts, self.clip_max_length, encoder)
                # No attention mask, as in SD3: CLIP is causal, so trailing pads change nothing
                # before the end token, and the pad positions' states are part of the sequence.
                out = encoder(ids, output_hidden_states=True)
                clip_states.append(out.hidden_states[-2].to(device=device, dtype=dtype))
                pooled_parts.append(out.text_embeds.to(device=device, dtype=dtype))
            else:
                ids = padded_ids(tokenizer, texts, self.max_sequence_length, encoder)
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
        """The :attr:`negative_prompt` conditioning (CFG's unconditional branch), cached, as (batch_size, ...).

        The returned tensors are expanded views of one cached row; do not modify them in place.
        """
        if self._uncond_cache is None or self._uncond_cache.prompt_embeds.device != self.device:
            self._uncond_cache = self.encode_prompts([self.negative_prompt])
        return self._uncond_cache.expand(batch_size)

    # -- flow ----------------------------------------------------------------------------------
    def sigmas(
        self, steps: int, *, shift: float | None = None, resolution: int | None = None
    ) -> torch.Tensor:
        """The noise levels of a sampling run, (steps + 1,) float32 from 1 down to 0.

        SD3: :func:`opdkit.sampling.sd3_sigmas` with ``shift`` (default: the scheduler's); the
        resolution does not change it.
        """
        from opdkit.sampling import sd3_sigmas

        return sd3_sigmas(steps, self.shift if shift is None else shift)

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
        """Classifier-free guidance ``v_u + cfg * (v_c - v_u)`` of two (B, C, h, w) velocities."""
        return v_uncond + cfg * (v_cond - v_uncond)

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
        """Write the model as a pipeline directory that :func:`~opdkit.models.loading.load_flow_model` reads.

        See :func:`opdkit.models.saving.save_flow_model`. Refuses a transformer with LoRA
        adapters attached: merge them (:meth:`merge_lora`) or save them separately
        (:meth:`save_lora`).
        """
        from opdkit.models.saving import save_flow_model

        return save_flow_model(self, out_dir)

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


def padded_ids(tokenizer: Any, texts: list[str], length: int, encoder: Any) -> torch.Tensor:
    """Token ids (B, length) of ``texts``: truncated or padded to ``length``, on ``encoder``'s device."""
    ids = tokenizer(
        texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(next(encoder.parameters()).device)


def encoder_kind(encoder: Any) -> str:
    """``"clip"`` for a model returning ``text_embeds`` (CLIPTextModelWithProjection), else ``"t5"``."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if isinstance(encoder, CLIPTextModelWithProjection):
        return "clip"
    if isinstance(encoder, T5EncoderModel):
        return "t5"
    raise OpdkitError(
        f"unsupported text encoder {type(encoder).__name__} (expected CLIPTextModelWithProjection or T5EncoderModel)"
    )
