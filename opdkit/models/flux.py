"""FLUX.1 (dev / schnell) as a flow model: packed latents, rotary ids, the guidance embedding.

:class:`FluxModel` wraps diffusers' ``FluxTransformer2DModel`` with FLUX's CLIP-L (pooled
output only) and T5-XXL encoders and its 16-channel ``AutoencoderKL``, behind the interface of
:class:`~opdkit.models.flow_model.FlowModel`. The transformer predicts the same velocity
``v = eps - x0`` at ``sigma`` (it scales the timestep by 1000 itself).

FLUX.1-dev is guidance-distilled: the transformer takes the guidance scale as an input
(``guidance_embeds`` in its config) instead of running a second, unconditional branch. opdkit
feeds the model's fixed :attr:`FluxModel.guidance` to every forward, in rollouts and in the
log-prob recomputation alike, so the policy whose log-probabilities GRPO and OPD compare is the
guided one; recipes keep ``sampler.cfg: 1`` (see docs/models.md). Schnell has no guidance input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.models.adapters import SD3_LORA_TARGETS
from opdkit.models.flow_model import Cond, padded_ids
from opdkit.models.packed import PackedFlowModel, pack_latents, unpack_latents

# diffusers' FluxPipeline default T5 length (FLUX.1-dev; schnell uses 256).
FLUX_MAX_SEQUENCE_LENGTH = 512
# FLUX.1-dev's recommended guidance scale (diffusers' FluxPipeline default; flow_grpo trains with it).
FLUX_GUIDANCE = 3.5
# The double-stream blocks' joint-attention projections and both feed-forwards: the set
# diffusers' FLUX LoRA training and DanceGRPO adapt. The names match no module of the
# single-stream blocks but their to_q/to_k/to_v.
FLUX_LORA_TARGETS: tuple[str, ...] = (
    *SD3_LORA_TARGETS,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's rotary position ids of a (h/2 x w/2) token grid: (h/2 * w/2, 3) = (0, row, column)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


class FluxModel(PackedFlowModel):
    """FLUX.1 transformer + CLIP-L + T5 + VAE.

    Attributes (beyond :class:`~opdkit.models.flow_model.FlowModel`'s):
        guidance: the guidance scale fed to a guidance-distilled transformer (dev); unused
            when its config has no ``guidance_embeds`` (schnell).
    """

    family = "flux"
    lora_targets = FLUX_LORA_TARGETS
    pipeline_class = "FluxPipeline"

    def __init__(
        self,
        transformer: Any,
        text_encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        vae: Any,
        *,
        guidance: float = FLUX_GUIDANCE,
        world: str = "sd3",
        max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH,
        scheduler_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.guidance = float(guidance)
        super().__init__(
            transformer, text_encoders, tokenizers, vae, world=world, max_sequence_length=max_sequence_length,
            encoder_kinds=["clip", "t5"], scheduler_config=scheduler_config, extra_config=extra_config,
        )  # fmt: skip
        self.shift = self.resolution_shift()

    @property
    def guidance_embeds(self) -> bool:
        """True for a guidance-distilled transformer (FLUX.1-dev)."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    @property
    def embedded_guidance(self) -> bool:  # type: ignore[override]  # a class attribute in the base
        """FLUX.1-dev guides inside the transformer: benchmarks sample it with CFG 1."""
        return self.guidance_embeds

    def _encode(self, texts: list[str]) -> Cond:
        """CLIP's pooled output (B, 768) and T5's last states (B, max_sequence_length, 4096), as FluxPipeline."""
        clip, t5 = self.text_encoders
        clip_tok, t5_tok = self.tokenizers
        ids = padded_ids(clip_tok, texts, int(clip_tok.model_max_length), clip)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        states = t5(padded_ids(t5_tok, texts, self.max_sequence_length, t5), output_hidden_states=False)[0]
        device, dtype = self.device, self.dtype
        return Cond(states.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor:
        """Velocity ``v = eps - x0`` of (B, C, h, w) latents at ``sigma`` (scalar or (B,), in [0, 1]).

        Packs 2x2 patches into tokens, adds the rotary ids (image: (0, row, column); text:
        zeros) and, for dev, the guidance scale; unpacks the prediction. Returns (B, C, h, w)
        in the dtype of ``x``.
        """
        batch, _, height, width = x.shape
        if len(cond) != batch:
            raise ValueError(f"velocity: x has batch {batch} but cond has {len(cond)}")
        device, dtype = self.device, self.dtype
        guidance = (
            torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
            if self.guidance_embeds
            else None
        )
        out = self.transformer(
            hidden_states=pack_latents(x.to(device=device, dtype=dtype)),
            timestep=self._sigma_batch(sigma, batch),  # the transformer multiplies by 1000
            guidance=guidance,
            pooled_projections=cond.pooled.to(device=device, dtype=dtype),
            encoder_hidden_states=cond.prompt_embeds.to(device=device, dtype=dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).to(x.dtype)

    def pipeline_components(self) -> dict[str, Any]:
        clip, t5 = self.text_encoders
        clip_tok, t5_tok = self.tokenizers
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": clip, "tokenizer": clip_tok,
                "text_encoder_2": t5, "tokenizer_2": t5_tok}  # fmt: skip

    def opdkit_config(self) -> dict[str, Any]:
        return {"guidance": self.guidance}

    def _check_dimensions(self) -> None:
        """CLIP width = pooled_projection_dim, T5 width = joint_attention_dim, 4 x VAE channels = in_channels."""
        config = self.transformer.config
        clip, t5 = self.text_encoders
        if int(clip.config.hidden_size) != int(config.pooled_projection_dim):
            raise OpdkitError(
                f"CLIP hidden size {clip.config.hidden_size} != transformer pooled_projection_dim {config.pooled_projection_dim}"
            )
        if int(t5.config.d_model) != int(config.joint_attention_dim):
            raise OpdkitError(
                f"T5 d_model {t5.config.d_model} != transformer joint_attention_dim {config.joint_attention_dim}"
            )
        if self.vae is None:
            raise OpdkitError("a FLUX model needs its VAE")
        if 4 * int(self.vae.config.latent_channels) != int(config.in_channels):
            raise OpdkitError(
                f"transformer in_channels {config.in_channels} != 4 x VAE latent channels {self.vae.config.latent_channels} (2x2 packing)"
            )
