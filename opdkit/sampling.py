"""Samplers for SD3-convention flow models: schedule, CFG, Euler ODE and Flow-GRPO SDE steps.

Pure functions on tensors plus a model adapter (anything with ``velocity``, ``encode_prompts``,
``uncond``, ``latent_shape``, ``shift``, ``device``; :class:`opdkit.models.FlowModel` is one).
This module belongs to the engine's base and imports no plug-in.

Conventions (SD3's): sigma in [0, 1], 1 = pure noise; ``x_sigma = (1 - sigma) x0 + sigma
eps``; velocity ``v = eps - x0``; a step goes from ``sigma`` to ``sigma_next < sigma`` with
``dt = sigma_next - sigma < 0``.

Determinism: samplers take per-sample seeds. Sample ``i`` draws its initial noise and every SDE
noise from its own CPU ``torch.Generator`` seeded with ``seeds[i]``, so its result depends on its
seed and prompt only, not on batch size, position or device (up to the floating-point effects
of batching inside the network).

Log-probabilities of SDE steps are the Gaussian log-density **averaged over dimensions** (C*h*w),
as flow_grpo does, not summed: the per-step value is then O(1) whatever the resolution, which
keeps the PPO clip range and KL weights resolution-independent. Multiply by ``C*h*w`` to get the
exact log-density.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

__all__ = [
    "SdeStep",
    "Trajectory",
    "VelocityModel",
    "euler_step",
    "guided_velocity",
    "initial_noise",
    "make_generators",
    "model_sigmas",
    "sample_ode",
    "sample_sde",
    "sd3_sigmas",
    "sde_step_with_logprob",
    "shift_sigmas",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# A batch-wide generator, one generator per sample, or nothing (global RNG).
Generators = torch.Generator | Sequence[torch.Generator] | None


class VelocityModel(Protocol):
    """What the samplers need from a model adapter (``opdkit.models.FlowModel`` fits).

    The conditioning object is opaque here; it must support ``len()`` and ``cond.cat(other)``
    (batch concatenation), which CFG uses to run both branches in one forward. Optional: a
    ``sigmas(steps, shift=, resolution=)`` method (:func:`model_sigmas`) and a
    ``guide(v_cond, v_uncond, cfg)`` method (:func:`guided_velocity`) replace the SD3 schedule
    and plain CFG.
    """

    shift: float

    @property
    def device(self) -> torch.device: ...

    def encode_prompts(self, prompts: Sequence[str]) -> Any: ...

    def uncond(self, batch_size: int) -> Any: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any) -> torch.Tensor: ...

    def latent_shape(self, resolution: int) -> tuple[int, int, int]: ...


# ----------------------------------------------------------------------------------------------
# schedule


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` (keeps 0 and 1)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sd3_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The noise levels of an SD3 sampling run: (steps + 1,) float32, from 1 down to 0.

    Matches diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``
    (static shifting): the scheduler's training grid ends at ``sigma_min = shift'(1 / T)`` (the
    shifted smallest training sigma); inference sigmas are ``linspace(1, sigma_min, steps)``,
    shifted again, with a final 0 appended.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid_min = shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32), shift).item()
    base = torch.linspace(1.0, grid_min, steps, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


# ----------------------------------------------------------------------------------------------
# single steps


def _per_sample(value: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Scalar or (B,) -> float32 (B, 1, 1, ...) broadcastable against ``like`` (B, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"sigma has {t.numel()} values for a batch of {batch}")
    return t.view(batch, *([1] * (like.ndim - 1)))


def guided_velocity(
    model: VelocityModel,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    cond: Any,
    uncond: Any | None,
    cfg: float,
    detach_uncond: bool = False,
) -> torch.Tensor:
    """Classifier-free-guided velocity ``v_u + cfg * (v_c - v_u)``, (B, C, h, w).

    With ``cfg != 1`` both branches run in ONE batched forward (x twice, cond then uncond);
    with ``cfg == 1`` (or no ``uncond``) only the conditional branch runs. ``detach_uncond``
    stops the gradient through ``v_u`` (the values are unchanged).
    """
    if cfg == 1.0 or uncond is None:
        return model.velocity(x, sigma, cond)
    batch = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    sig = sig.expand(batch) if sig.numel() == 1 else sig
    v = model.velocity(torch.cat([x, x]), torch.cat([sig, sig]), cond.cat(uncond))
    v_cond, v_uncond = v.chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    guide = getattr(model, "guide", None)  # a family's own combination (Qwen-Image renormalizes)
    if guide is not None:
        return guide(v_cond, v_uncond, cfg)
    return v_uncond + cfg * (v_cond - v_uncond)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """Deterministic (ODE) step ``x + v * (sigma_next - sigma)``; sigmas scalar or (B,)."""
    batch = x.shape[0]
    dt = _per_sample(sigma_next, batch, x) - _per_sample(sigma, batch, x)
    return (x.float() + v.float() * dt).to(x.dtype)


class SdeStep(NamedTuple):
    """Result of :func:`sde_step_with_logprob`.

    Attributes:
        prev_sample: (B, C, h, w) float32 next state x' (the given one when ``prev_sample`` was
            passed).
        log_prob: (B,) float32 log pi(x' | x), Gaussian log-density averaged over dimensions.
        mean: (B, C, h, w) float32 mean of the transition (differentiable w.r.t. ``v``).
        std: (B,) float32 standard deviation of the transition, ``s_t * sqrt(-dt)``.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _draw_noise(shape: torch.Size, noise: torch.Tensor | Generators, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` (B, ...) from a tensor, generator(s) or the global RNG."""
    if isinstance(noise, torch.Tensor):
        if noise.shape != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32)
    if noise is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    if isinstance(noise, torch.Generator):
        return torch.randn(shape, generator=noise, device=noise.device, dtype=torch.float32).to(device)
    generators = list(noise)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device)


def sde_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    noise: torch.Tensor | Generators = None,
    prev_sample: torch.Tensor | None = None,
    sigma_max: torch.Tensor | float | None = None,
    logprob_pool: int = 1,
) -> SdeStep:
    """One Flow-GRPO SDE step from ``sigma`` to ``sigma_next`` and its log-probability.

    With ``a = noise_level`` and ``dt = sigma_next - sigma``::

        s_t  = a * sqrt(sigma / (1 - sigma))          # (1 - sigma) uses sigma_max when sigma == 1
        mean = x * (1 + s_t^2 dt / (2 sigma)) + v * (1 + s_t^2 (1 - sigma) / (2 sigma)) * dt
        x'   = mean + s_t * sqrt(-dt) * z,  z ~ N(0, I)

    As in flow_grpo, only the ``1 - sigma`` denominator is patched at sigma == 1 (by default
    with ``sigma_next``, which in a schedule starting at 1 is the first sigma below 1).
    Everything is computed in float32.

    Args:
        x: (B, C, h, w) current state.
        v: (B, C, h, w) velocity at (x, sigma); gradients flow to ``mean`` and ``log_prob``.
        sigma, sigma_next: scalars or (B,) noise levels, ``0 <= sigma_next < sigma <= 1``.
        noise_level: ``a`` (> 0; 0.7 in Flow-GRPO/Flow-OPD).
        noise: the z to use (tensor like x), a generator, one generator per sample, or None
            (global RNG). Ignored when ``prev_sample`` is given.
        prev_sample: if given, no sampling: its log-probability under this step is computed
            (the PPO ratio's numerator/denominator). It is treated as data (detached).
        sigma_max: value replacing sigma in ``1 - sigma`` where sigma == 1 (default sigma_next).
        logprob_pool: log-prob of the k x k block means of the noise only (:func:`gaussian_log_prob`).

    Returns:
        :class:`SdeStep` (prev_sample, log_prob (B,), mean, std (B,)).
    """
    batch = x.shape[0]
    x32, v32 = x.float(), v.float()
    s = _per_sample(sigma, batch, x32)
    s_next = _per_sample(sigma_next, batch, x32)
    dt = s_next - s
    # sigma == 1 would divide by zero in s_t; flow_grpo substitutes the first sigma below 1.
    s_below = _per_sample(sigma_max if sigma_max is not None else sigma_next, batch, x32)
    s_denominator = torch.where(s >= 1.0, s_below, s)
    std_t = noise_level * torch.sqrt(s / (1.0 - s_denominator))
    mean = x32 * (1.0 + std_t**2 / (2.0 * s) * dt) + v32 * (1.0 + std_t**2 * (1.0 - s) / (2.0 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        sample = mean + std * _draw_noise(x32.shape, noise, x32.device)
    else:
        sample = prev_sample.float()
    log_prob = gaussian_log_prob(sample.detach(), mean, std, logprob_pool)
    return SdeStep(sample, log_prob, mean, std.reshape(batch))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """log N(sample; mean, std^2 I) averaged over dimensions (the SDE step's log-prob convention).

    With ``pool = k > 1`` it is the log-density of the step's noise averaged over k x k blocks:
    ``z = k * avg_pool_k((sample - mean) / std)``, which is N(0, I) on the (C, h/k, w/k) block grid
    when the step's noise is white. The sampler is unchanged (white noise, same marginals); only
    the policy's score function is restricted to the low-frequency part of the noise, see
    ``sampler.logprob_pool`` in docs/grpo.md.

    Args:
        sample, mean: (B, C, h, w).
        std: (B, 1, 1, 1) (or anything broadcasting to the sample).
        pool: block size k (h and w divisible by k).

    Returns:
        (B,) float32; differentiable w.r.t. ``mean`` (and ``sample`` unless detached).
    """
    if pool == 1:
        # The mean over dims (not the sum) is the documented choice: it is flow_grpo's, and keeps
        # the PPO ratio's scale independent of resolution.
        log_density = -((sample - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    else:
        h, w = sample.shape[-2:]
        if h % pool or w % pool:
            raise ValueError(f"logprob_pool {pool} does not divide the state's {h}x{w} grid")
        z = torch.nn.functional.avg_pool2d((sample - mean) / std, pool) * pool
        log_density = -(z**2) / 2.0 - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


# ----------------------------------------------------------------------------------------------
# full runs


@dataclass
class Trajectory:
    """A sampled SDE (or mixed SDE/ODE) trajectory, what GRPO trains on.

    Attributes:
        states: (T + 1, B, C, h, w) float32; ``states[0]`` is the initial noise, ``states[t + 1]``
            the result of step t, ``states[T]`` the final sample x0.
        log_probs: (T, B) float32 log pi(states[t + 1] | states[t]) (mean over dims); 0 at
            deterministic (ODE) steps outside the SDE window.
        sigmas: (T + 1,) float32 schedule, 1 -> 0.
        sde_steps: (T,) bool, True where step t was stochastic (the trainable steps).
    """

    states: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sde_steps: torch.Tensor

    @property
    def x0(self) -> torch.Tensor:
        """(B, C, h, w) final samples in model space (decode with the model adapter)."""
        return self.states[-1]


def make_generators(seeds: int | Sequence[int], batch_size: int) -> list[torch.Generator]:
    """One CPU generator per sample; an int seed gives samples seeds ``seed, seed + 1, ...``."""
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(batch_size)]
    seeds = list(seeds)
    if len(seeds) != batch_size:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch_size}")
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(
    shape: Sequence[int], generators: Generators, device: torch.device | str, batch_size: int | None = None
) -> torch.Tensor:
    """Initial noise (B, *shape) float32 on ``device``.

    Per-sample generators give each row its own stream; a single generator or None needs
    ``batch_size``.
    """
    if isinstance(generators, torch.Generator) or generators is None:
        if batch_size is None:
            raise ValueError("batch_size is required with a single generator")
        full = torch.Size([batch_size, *shape])
    else:
        full = torch.Size([len(list(generators)), *shape])
    return _draw_noise(full, generators, torch.device(device))


def model_sigmas(model: VelocityModel, steps: int, shift: float | None, resolution: int) -> torch.Tensor:
    """The sigma schedule of a sampling run, (steps + 1,) float32 from 1 to 0.

    A model with a ``sigmas(steps, shift=, resolution=)`` method chooses its own (FLUX and
    Qwen-Image shift by the image's token count); otherwise :func:`sd3_sigmas` with ``shift``
    (default ``model.shift``).
    """
    own = getattr(model, "sigmas", None)
    if own is not None:
        return own(steps, shift=shift, resolution=resolution)
    return sd3_sigmas(steps, model.shift if shift is None else shift)


def _prepare(
    model: VelocityModel,
    prompts: Sequence[str] | None,
    cond: Any | None,
    uncond: Any | None,
    cfg: float,
    seed: int | Sequence[int] | torch.Generator,
    resolution: int,
    noise: torch.Tensor | None,
) -> tuple[Any, Any | None, Generators, torch.Tensor]:
    if cond is None:
        if prompts is None:
            raise ValueError("give prompts or cond")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        cond = model.encode_prompts(list(prompts))
    batch = len(cond)
    if cfg != 1.0 and uncond is None:
        uncond = model.uncond(batch)
    generators: Generators = seed if isinstance(seed, torch.Generator) else make_generators(seed, batch)
    if noise is None:
        x = initial_noise(model.latent_shape(resolution), generators, model.device, batch)
    else:
        x = noise.to(device=model.device, dtype=torch.float32)
    return cond, uncond, generators, x


@torch.no_grad()
def sample_ode(
    model: VelocityModel,
    prompts: Sequence[str] | None = None,
    *,
    steps: int = 20,
    cfg: float = 1.0,
    shift: float | None = None,
    resolution: int = 32,
    seed: int | Sequence[int] | torch.Generator = 0,
    cond: Any | None = None,
    uncond: Any | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic Euler sampling; returns x0 (B, C, h, w) float32 in model space.

    Args:
        model: the adapter.
        prompts: B prompts (or pass ``cond``).
        steps: Euler steps.
        cfg: guidance weight (1 = no guidance, one forward per step).
        shift: schedule shift (default: the model's, see :func:`model_sigmas`).
        resolution: image side in pixels.
        seed: int (sample i uses seed + i), per-sample seeds, or one batch-wide generator.
        cond, uncond: precomputed conditioning (uncond defaults to ``model.uncond``: the empty
            prompt, or the family's negative prompt).
        noise: (B, C, h, w) initial noise to start from instead of drawing it from ``seed``
            (the SDE noise of :func:`sample_sde` still comes from ``seed``).
    """
    cond, uncond, _, x = _prepare(model, prompts, cond, uncond, cfg, seed, resolution, noise)
    sigmas = model_sigmas(model, steps, shift, resolution).to(x.device)
    for i in range(steps):
        v = guided_velocity(model, x, sigmas[i], cond, uncond, cfg)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_sde(
    model: VelocityModel,
    prompts: Sequence[str] | None = None,
    *,
    steps: int = 10,
    cfg: float = 1.0,
    shift: float | None = None,
    resolution: int = 32,
    noise_level: float = 0.7,
    seed: int | Sequence[int] | torch.Generator = 0,
    sde_window: tuple[int, int] | None = None,
    cond: Any | None = None,
    uncond: Any | None = None,
    noise: torch.Tensor | None = None,
    logprob_pool: int = 1,
) -> Trajectory:
    """Flow-GRPO rollout: SDE steps with log-probs (ODE steps outside ``sde_window``).

    Args:
        steps: total steps T.
        noise_level: SDE noise level ``a``.
        sde_window: ``(start, end)``: only steps ``start <= t < end`` are stochastic (a training
            window); None = every step.
        logprob_pool: see :func:`sde_step_with_logprob`.
        (others as in :func:`sample_ode`)

    Returns:
        :class:`Trajectory` with states (T+1, B, ...), log_probs (T, B), sigmas, sde_steps.
    """
    cond, uncond, generators, x = _prepare(model, prompts, cond, uncond, cfg, seed, resolution, noise)
    sigmas = model_sigmas(model, steps, shift, resolution).to(x.device)
    start, end = sde_window if sde_window is not None else (0, steps)
    if not 0 <= start < end <= steps:
        raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start < end <= steps ({steps})")
    sde_steps = torch.zeros(steps, dtype=torch.bool)
    sde_steps[start:end] = True
    states = [x]
    log_probs = []
    for i in range(steps):
        v = guided_velocity(model, x, sigmas[i], cond, uncond, cfg)
        if sde_steps[i]:
            step = sde_step_with_logprob(
                x, v, sigmas[i], sigmas[i + 1], noise_level, noise=generators, logprob_pool=logprob_pool
            )
            x, log_prob = step.prev_sample, step.log_prob
        else:
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
            log_prob = torch.zeros(x.shape[0], device=x.device)
        states.append(x)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(states), torch.stack(log_probs), sigmas, sde_steps.to(x.device))
