"""What FLUX and Qwen-Image share: 2x2 latent packing, token-count time shift, their pipeline layout.

Both families' transformers take the VAE latents cut into 2x2 patches, one token per patch
(``pack_latents``), and both shift the sigma schedule by the image's token count (diffusers'
``use_dynamic_shifting``). opdkit keeps latents as (B, C, h, w) between parts, so
:class:`PackedFlowModel` packs inside :meth:`velocity` and unpacks the prediction; the samplers
never see tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from opdkit.models.flow_model import FlowModel

# The resolution whose shift :attr:`PackedFlowModel.shift` reports (both families' default side).
DEFAULT_RESOLUTION = 1024


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens, one per 2x2 patch in row-major order.

    A token's 4C features are channel-major then the patch's rows and columns: the order
    diffusers' FLUX and Qwen-Image pipelines use, which the transformers' ``x_embedder`` /
    ``img_in`` weights expect.
    """
    batch, channels, height, width = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent side {height}x{width} must be even to cut 2x2 patches")
    patches = x.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    batch, _, features = tokens.shape
    channels = features // 4
    grid = tokens.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, height, width)


def token_count(resolution: int, vae_factor: int) -> int:
    """Image tokens of a square ``resolution`` px image: (side / vae_factor / 2) ** 2."""
    side = resolution // vae_factor // 2
    return side * side


def dynamic_sigmas(
    scheduler_config: dict[str, Any], steps: int, image_tokens: int, shift: float | None = None
) -> torch.Tensor:
    """The schedule diffusers' FLUX/Qwen-Image pipelines sample with, (steps + 1,) float32, 1 -> 0.

    ``linspace(1, 1/steps, steps)`` handed to the pipeline's own FlowMatchEulerDiscreteScheduler
    with ``mu`` from the image's token count (``calculate_shift`` between the config's
    ``base_shift`` at ``base_image_seq_len`` tokens and ``max_shift`` at ``max_image_seq_len``);
    a config's ``shift_terminal`` (Qwen-Image's 0.02) stretches the end as there. ``shift``
    given (a recipe's ``sampler.shift``) replaces the token-count shift by that static one:
    ``mu = log(shift)``, which is the same map as SD3's ``shift * s / (1 + (shift - 1) s)``.
    """
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    mu: float | None = None
    if config.get("use_dynamic_shifting", False):
        mu = math.log(shift) if shift is not None else _token_mu(config, image_tokens)
    elif shift is not None:  # a static-shift config (FLUX.1-schnell): the recipe's shift replaces it
        config["shift"] = shift
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu, device="cpu")
    return scheduler.sigmas.to(torch.float32)


def _token_mu(config: dict[str, Any], image_tokens: int) -> float:
    """diffusers' ``calculate_shift``: mu linear in the token count between the config's two points."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(
        calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    )


class PackedFlowModel(FlowModel):
    """A family whose transformer works on 2x2-packed latent tokens (FLUX, Qwen-Image).

    Latents stay (B, C, h, w) with ``C = in_channels / 4`` outside :meth:`velocity`. The
    schedule is :func:`dynamic_sigmas` at the sampled resolution; :attr:`shift` is its static
    equivalent at 1024 px (what the SFT cold start's training sigmas use).
    """

    pipeline_class: str = ""  # the diffusers pipeline the folder is written as

    @property
    def latent_channels(self) -> int:
        """C of the (B, C, h, w) latents: the transformer's input features / 4."""
        return int(self.transformer.config.in_channels) // 4

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latents of a square ``resolution`` px image."""
        cell = self.vae_scale_factor * 2
        if resolution % cell:
            raise ValueError(
                f"resolution {resolution} must be a multiple of {cell} (VAE factor x 2x2 packing)"
            )
        side = resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def sigmas(
        self, steps: int, *, shift: float | None = None, resolution: int | None = None
    ) -> torch.Tensor:
        """:func:`dynamic_sigmas` for ``resolution`` px (default 1024), or a static ``shift``."""
        tokens = token_count(resolution or DEFAULT_RESOLUTION, self.vae_scale_factor)
        return dynamic_sigmas(self.scheduler_config, steps, tokens, shift)

    def resolution_shift(self, resolution: int = DEFAULT_RESOLUTION) -> float:
        """The static shift ``exp(mu)`` the token-count shift amounts to at ``resolution`` px."""
        config = self.scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        return math.exp(_token_mu(config, token_count(resolution, self.vae_scale_factor)))

    def _sigma_batch(self, sigma: torch.Tensor | float, batch: int) -> torch.Tensor:
        """Scalar or (B,) sigma -> (B,) float32 on the model device."""
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).reshape(-1)
        return sigma_t.expand(batch) if sigma_t.numel() == 1 else sigma_t

    def pipeline_components(self) -> dict[str, Any]:
        """The diffusers pipeline's components but the scheduler (for :meth:`save_pretrained`)."""
        raise NotImplementedError

    def opdkit_config(self) -> dict[str, Any]:
        """What ``opdkit.json`` keeps for this family beside world and ``max_sequence_length``."""
        return {}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model as its diffusers pipeline folder (plus ``opdkit.json``); no adapters."""
        from opdkit.models.saving import save_family_pipeline

        return save_family_pipeline(self, out_dir)
