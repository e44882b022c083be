"""Qwen-Image as a flow model: a Qwen2.5-VL text encoder, masked prompts, true CFG, its video VAE.

:class:`QwenImageModel` wraps diffusers' ``QwenImageTransformer2DModel``, the Qwen2.5-VL
language model that encodes prompts, and ``AutoencoderKLQwenImage`` behind the interface of
:class:`~opdkit.models.flow_model.FlowModel`. What differs from SD3:

* prompts are wrapped in the pipeline's chat template; the encoder's last hidden states of the
  template's prefix tokens are dropped, the rest kept per prompt (variable length), so a
  :class:`~opdkit.models.flow_model.Cond` carries an attention mask;
* guidance is true CFG against a negative prompt (" " by default, as the model card's
  examples) with diffusers' renormalization: the guided velocity of each 2x2 patch is rescaled
  to the norm of the conditional one (:meth:`QwenImageModel.guide`);
* the VAE is a (causal, one-frame) video VAE with per-channel latent mean and std.
"""

from __future__ import annotations

from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.models.adapters import SD3_LORA_TARGETS
from opdkit.models.flow_model import Cond
from opdkit.models.packed import PackedFlowModel, pack_latents, unpack_latents

# diffusers' QwenImagePipeline: the chat template its prompts are encoded in (the text before
# "{}" is dropped from the states), its longest prompt and its default token cap per prompt.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TOKENIZER_MAX_LENGTH = 1024
QWEN_MAX_SEQUENCE_LENGTH = 512
NEGATIVE_PROMPT = " "
# The joint-attention projections of both streams and both MLPs.
QWEN_IMAGE_LORA_TARGETS: tuple[str, ...] = (
    *SD3_LORA_TARGETS,
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


class QwenImageModel(PackedFlowModel):
    """Qwen-Image transformer + Qwen2.5-VL text encoder + Qwen-Image VAE.

    Attributes (beyond :class:`~opdkit.models.flow_model.FlowModel`'s):
        negative_prompt: the prompt of CFG's unconditional branch (:meth:`uncond`).
    """

    family = "qwen-image"
    lora_targets = QWEN_IMAGE_LORA_TARGETS
    pipeline_class = "QwenImagePipeline"

    def __init__(
        self,
        transformer: Any,
        text_encoder: Any,
        tokenizer: Any,
        vae: Any,
        *,
        negative_prompt: str = NEGATIVE_PROMPT,
        world: str = "sd3",
        max_sequence_length: int = QWEN_MAX_SEQUENCE_LENGTH,
        scheduler_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.negative_prompt = negative_prompt
        super().__init__(
            transformer, [text_encoder], [tokenizer], vae, world=world, max_sequence_length=max_sequence_length,
            encoder_kinds=["qwen"], scheduler_config=scheduler_config, extra_config=extra_config,
        )  # fmt: skip
        self.shift = self.resolution_shift()
        # The template's prefix, in tokens: what diffusers hard-codes as 34 for Qwen's tokenizer,
        # counted here so that any tokenizer (a tiny test one too) drops exactly the prefix.
        prefix = PROMPT_TEMPLATE.split("{}")[0]
        self.template_drop = len(tokenizer(prefix).input_ids)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of temporal down-sampling stages), 8 for Qwen-Image."""
        return 2 ** len(self.vae.temperal_downsample)

    def _encode(self, texts: list[str]) -> Cond:
        """Last hidden states of the templated prompts minus the prefix, (B, L, D), L the longest kept.

        Each row keeps its own tokens (at most :attr:`max_sequence_length`), zero-padded at the
        end; the mask marks them.
        """
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        enc_device = next(encoder.parameters()).device
        tokens = tokenizer(
            [PROMPT_TEMPLATE.format(t) for t in texts],
            max_length=TOKENIZER_MAX_LENGTH + self.template_drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(enc_device)
        states = encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        rows = [
            row[keep.bool()][self.template_drop :][: self.max_sequence_length]
            for row, keep in zip(states, tokens.attention_mask, strict=True)
        ]
        length = max(len(r) for r in rows)
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - len(r))) for r in rows])
        mask = torch.stack([torch.arange(length, device=enc_device) < len(r) for r in rows]).long()
        pooled = torch.zeros(len(texts), 0, device=self.device, dtype=self.dtype)
        return Cond(embeds.to(device=self.device, dtype=self.dtype), pooled, mask.to(self.device))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor:
        """Velocity ``v = eps - x0`` of (B, C, h, w) latents at ``sigma`` (scalar or (B,), in [0, 1]).

        Packs 2x2 patches into tokens; the text mask keeps padding out of the joint attention.
        Returns (B, C, h, w) in the dtype of ``x``.
        """
        batch, _, height, width = x.shape
        if len(cond) != batch:
            raise ValueError(f"velocity: x has batch {batch} but cond has {len(cond)}")
        device, dtype = self.device, self.dtype
        mask = cond.mask.to(device) if cond.mask is not None else None
        out = self.transformer(
            hidden_states=pack_latents(x.to(device=device, dtype=dtype)),
            encoder_hidden_states=cond.prompt_embeds.to(device=device, dtype=dtype),
            encoder_hidden_states_mask=mask,
            timestep=self._sigma_batch(sigma, batch),  # sigma, as the pipeline's t / 1000
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).to(x.dtype)

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
        """True CFG with QwenImagePipeline's renormalization, on (B, C, h, w) velocities.

        ``g = v_u + cfg (v_c - v_u)``, then each 2x2 patch's g (its 4C packed features) is
        scaled to the norm of the same patch of ``v_c``: guidance turns the prediction, it does
        not lengthen it.
        """
        height, width = v_cond.shape[-2:]
        cond_tokens, guided = pack_latents(v_cond), pack_latents(v_uncond + cfg * (v_cond - v_uncond))
        scale = cond_tokens.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)
        return unpack_latents(guided * scale, height, width)

    # -- images ---------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE config's per-channel latent mean and std, (1, C, 1, 1, 1) like ``like``."""
        config = self.vae.config
        shape = (1, int(config.z_dim), 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]: ``z = x * std + mean``, one frame."""
        z = x.to(device=self.vae.device, dtype=self.vae.dtype)[:, :, None]
        mean, std = self._latent_stats(z)
        images = self.vae.decode(z * std + mean, return_dict=False)[0][:, :, 0].float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents ``(z - mean) / std`` (B, C, h, w), model dtype."""
        pixels = images.to(device=self.device, dtype=torch.float32) * 2.0 - 1.0
        dist = self.vae.encode(pixels.to(self.vae.dtype)[:, :, None], return_dict=False)[0]
        z = dist.sample(generator) if sample else dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std)[:, :, 0].to(self.dtype)

    # -- saving and checks ------------------------------------------------------------------------
    def pipeline_components(self) -> dict[str, Any]:
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoders[0],
                "tokenizer": self.tokenizers[0]}  # fmt: skip

    def opdkit_config(self) -> dict[str, Any]:
        return {"negative_prompt": self.negative_prompt}

    def _check_dimensions(self) -> None:
        """Text width = joint_attention_dim, 4 x VAE z_dim = in_channels."""
        config = self.transformer.config
        encoder = self.text_encoders[0]
        text = getattr(encoder.config, "text_config", encoder.config)
        if int(text.hidden_size) != int(config.joint_attention_dim):
            raise OpdkitError(
                f"text encoder hidden size {text.hidden_size} != transformer joint_attention_dim {config.joint_attention_dim}"
            )
        if self.vae is None:
            raise OpdkitError("a Qwen-Image model needs its VAE")
        if 4 * int(self.vae.config.z_dim) != int(config.in_channels):
            raise OpdkitError(
                f"transformer in_channels {config.in_channels} != 4 x VAE z_dim {self.vae.config.z_dim} (2x2 packing)"
            )
