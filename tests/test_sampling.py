"""Schedules, CFG, Euler and Flow-GRPO SDE steps, full samplers (CPU, fp32)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from opdkit.sampling import (
    euler_step,
    guided_velocity,
    make_generators,
    sample_ode,
    sample_sde,
    sd3_sigmas,
    sde_step_with_logprob,
)

# -- a toy model implementing the sampler protocol -------------------------------------------------


@dataclass
class ToyCond:
    value: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def cat(self, other: ToyCond) -> ToyCond:
        return ToyCond(torch.cat([self.value, other.value]))


class ToyModel:
    """v = 0.3 * x * (1 + sigma) + cond; conditioning = prompt length; counts forwards."""

    shift = 3.0
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode_prompts(self, prompts: Sequence[str]) -> ToyCond:
        return ToyCond(torch.tensor([float(len(p)) for p in prompts]))

    def uncond(self, batch_size: int) -> ToyCond:
        return ToyCond(torch.zeros(batch_size))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (2, resolution // 4, resolution // 4)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: ToyCond) -> torch.Tensor:
        self.calls.append(x.shape[0])
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0]).view(-1, 1, 1, 1)
        return 0.3 * x * (1 + s) + cond.value.view(-1, 1, 1, 1)


class ConstantVelocity:
    shift = 3.0
    device = torch.device("cpu")

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v

    def encode_prompts(self, prompts: Sequence[str]) -> ToyCond:
        return ToyCond(torch.zeros(len(prompts)))

    def uncond(self, batch_size: int) -> ToyCond:
        return ToyCond(torch.zeros(batch_size))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return tuple(self.v.shape[1:])  # type: ignore[return-value]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: ToyCond) -> torch.Tensor:
        return self.v.expand_as(x)


# -- schedule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10, 40])
def test_sigmas_match_diffusers_scheduler(shift: float, steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler: Any = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift)
    assert ours.shape == (steps + 1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:-1] * 1000, scheduler.timesteps.float(), atol=1e-3, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and bool((ours[1:] < ours[:-1]).all())


# -- single steps ----------------------------------------------------------------------------------


def test_euler_on_constant_velocity_lands_exactly() -> None:
    x0 = torch.randn(3, 2, 4, 4)
    eps = torch.randn(3, 2, 4, 4)
    model = ConstantVelocity(eps - x0)
    out = sample_ode(model, ["a", "b", "c"], steps=7, resolution=0, noise=eps)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # A single step with per-sample sigmas.
    x = euler_step(eps, eps - x0, torch.ones(3), torch.zeros(3))
    torch.testing.assert_close(x, x0)


def _design_mean_std(
    x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, a: float
) -> tuple[torch.Tensor, float]:
    """The SDE step's formulas written out independently with python floats."""
    dt = sigma_next - sigma
    s_t = a * math.sqrt(sigma / (1 - sigma))
    mean = x * (1 + s_t**2 * dt / (2 * sigma)) + v * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s_t * math.sqrt(-dt)


def test_sde_logprob_equals_normal_mean_over_dims() -> None:
    torch.manual_seed(0)
    x, v = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    step = sde_step_with_logprob(x, v, 0.8, 0.6, noise_level=0.7, noise=torch.Generator().manual_seed(1))
    mean, std = _design_mean_std(x, v, 0.8, 0.6, 0.7)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.std, torch.full((4,), std))
    expected = torch.distributions.Normal(mean, std).log_prob(step.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step.log_prob, expected)
    assert step.log_prob.shape == (4,)


def test_pooled_logprob_is_the_density_of_the_block_means_of_the_noise() -> None:
    torch.manual_seed(0)
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    full = sde_step_with_logprob(x, v, 0.8, 0.6, noise_level=0.7, noise=torch.Generator().manual_seed(1))
    pooled = sde_step_with_logprob(
        x, v, 0.8, 0.6, noise_level=0.7, noise=torch.Generator().manual_seed(1), logprob_pool=4
    )
    # The sampler is unchanged: same draw, same mean and std.
    assert torch.equal(pooled.prev_sample, full.prev_sample) and torch.equal(pooled.mean, full.mean)
    std = float(full.std[0])
    z = torch.nn.functional.avg_pool2d((full.prev_sample - full.mean) / std, 4) * 4  # (4, 3, 2, 2)
    expected = (torch.distributions.Normal(0.0, 1.0).log_prob(z) - math.log(std)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(pooled.log_prob, expected)
    again = sde_step_with_logprob(x, v, 0.8, 0.6, noise_level=0.7, prev_sample=pooled.prev_sample, logprob_pool=4)
    assert torch.equal(again.log_prob, pooled.log_prob)  # ratio exactly 1 with unchanged weights
    with pytest.raises(ValueError, match="logprob_pool 3 does not divide the state's 8x8 grid"):
        sde_step_with_logprob(x, v, 0.8, 0.6, noise_level=0.7, logprob_pool=3)


def test_pooled_score_function_estimates_a_low_frequency_gradient_with_less_noise() -> None:
    # Reward = a block-constant (low-frequency) linear function of the next state. The policy
    # gradient E[R grad_mean log pi] points along the reward's weights; with the log-prob of the
    # 4x4 block means the per-draw noise of the estimate lives in 16x fewer dimensions.
    gen = torch.Generator().manual_seed(0)
    n, std = 256, 0.5
    weights = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, generator=gen), scale_factor=4.0)
    mean = torch.nn.Parameter(torch.zeros(1, 3, 16, 16))
    draws = (std * torch.randn(n, 3, 16, 16, generator=gen)).detach()
    reward = (draws * weights).sum(dim=(1, 2, 3))
    advantage = reward - reward.mean()
    cosines = {}
    for pool in (1, 4):
        from opdkit.sampling import gaussian_log_prob

        log_prob = gaussian_log_prob(draws, mean.expand_as(draws), torch.tensor(std), pool)
        grad = torch.autograd.grad((advantage * log_prob).mean(), mean)[0]
        cosines[pool] = float(torch.nn.functional.cosine_similarity(grad.flatten(), weights.flatten(), dim=0))
    assert cosines[4] > 0.85 and 0.0 < cosines[1] < cosines[4] - 0.3


def test_sde_given_noise_and_prev_sample_consistent() -> None:
    torch.manual_seed(0)
    x, v, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sampled = sde_step_with_logprob(x, v, 0.5, 0.3, 0.7, noise=z)
    torch.testing.assert_close(sampled.prev_sample, sampled.mean + sampled.std.view(-1, 1, 1, 1) * z)
    # Scoring the sampled x' under the same v reproduces the log-prob, and gradients reach v.
    v_grad = v.clone().requires_grad_(True)
    scored = sde_step_with_logprob(x, v_grad, 0.5, 0.3, 0.7, prev_sample=sampled.prev_sample)
    torch.testing.assert_close(scored.prev_sample, sampled.prev_sample)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob)
    scored.log_prob.sum().backward()
    assert v_grad.grad is not None and v_grad.grad.abs().sum() > 0
    # The sample is the most likely under its own v (z = 0 gives the maximum density).
    at_mean = sde_step_with_logprob(x, v, 0.5, 0.3, 0.7, prev_sample=sampled.mean)
    assert bool((at_mean.log_prob > sampled.log_prob).all())


def test_sde_at_sigma_one_uses_next_sigma_in_denominator() -> None:
    x, v = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    sigmas = sd3_sigmas(10, 3.0)
    step = sde_step_with_logprob(x, v, sigmas[0], sigmas[1], 0.7, noise=torch.zeros_like(x))
    s_t = 0.7 * math.sqrt(1.0 / (1 - sigmas[1].item()))  # numerator sigma stays 1
    dt = (sigmas[1] - sigmas[0]).item()
    torch.testing.assert_close(step.std, torch.full((2,), s_t * math.sqrt(-dt)))
    assert torch.isfinite(step.log_prob).all() and torch.isfinite(step.mean).all()


def test_sde_per_sample_sigmas_and_small_noise_limit() -> None:
    x, v = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    sig, nxt = torch.tensor([0.9, 0.4]), torch.tensor([0.7, 0.2])
    step = sde_step_with_logprob(x, v, sig, nxt, 0.7, noise=torch.zeros_like(x))
    for i in range(2):
        one = sde_step_with_logprob(x[i : i + 1], v[i : i + 1], sig[i].item(), nxt[i].item(), 0.7)
        torch.testing.assert_close(step.mean[i : i + 1], one.mean)
    # As the noise level goes to 0 the SDE mean becomes the Euler step.
    tiny_noise = sde_step_with_logprob(x, v, sig, nxt, 1e-4, noise=torch.zeros_like(x))
    torch.testing.assert_close(tiny_noise.mean, euler_step(x, v, sig, nxt), atol=1e-6, rtol=0)


def test_guided_velocity_is_one_batched_forward() -> None:
    model = ToyModel()
    x = torch.randn(3, 2, 4, 4)
    cond, uncond = model.encode_prompts(["a", "bb", "ccc"]), model.uncond(3)
    v = guided_velocity(model, x, 0.5, cond, uncond, cfg=4.5)
    assert model.calls == [6]
    v_c, v_u = model.velocity(x, 0.5, cond), model.velocity(x, 0.5, uncond)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u))
    model.calls.clear()
    torch.testing.assert_close(guided_velocity(model, x, 0.5, cond, uncond, cfg=1.0), v_c)
    assert model.calls == [3]


# -- full runs ---------------------------------------------------------------------------------------


def test_sample_ode_deterministic_and_batch_independent() -> None:
    model = ToyModel()
    prompts = ["a red cube", "two dogs", "x"]
    a = sample_ode(model, prompts, steps=5, cfg=3.0, resolution=16, seed=11)
    b = sample_ode(model, prompts, steps=5, cfg=3.0, resolution=16, seed=11)
    c = sample_ode(model, prompts, steps=5, cfg=3.0, resolution=16, seed=12)
    assert a.shape == (3, 2, 4, 4) and torch.equal(a, b) and not torch.allclose(a, c)
    # Sample 1 has seed 12 in batch a; alone with seed 12 it is the same image.
    alone = sample_ode(model, ["two dogs"], steps=5, cfg=3.0, resolution=16, seed=[12])
    torch.testing.assert_close(alone[0], a[1])


def test_sample_sde_trajectory_window_and_logprobs() -> None:
    model = ToyModel()
    prompts = ["a", "bb"]
    traj = sample_sde(model, prompts, steps=6, cfg=2.0, resolution=16, seed=[3, 4], sde_window=(1, 4))
    assert traj.states.shape == (7, 2, 2, 4, 4) and traj.log_probs.shape == (6, 2)
    assert traj.sde_steps.tolist() == [False, True, True, True, False, False]
    assert bool((traj.log_probs[~traj.sde_steps] == 0).all())
    assert bool((traj.log_probs[traj.sde_steps] != 0).all())
    torch.testing.assert_close(traj.sigmas, sd3_sigmas(6, 3.0))
    cond, uncond = model.encode_prompts(prompts), model.uncond(2)
    for t in range(6):
        v = guided_velocity(model, traj.states[t], traj.sigmas[t], cond, uncond, 2.0)
        s, s_next = traj.sigmas[t], traj.sigmas[t + 1]
        if traj.sde_steps[t]:
            scored = sde_step_with_logprob(traj.states[t], v, s, s_next, 0.7, prev_sample=traj.states[t + 1])
            torch.testing.assert_close(scored.log_prob, traj.log_probs[t])
        else:
            torch.testing.assert_close(euler_step(traj.states[t], v, s, s_next), traj.states[t + 1])
    # Same seeds -> same trajectory; one sample alone reproduces its row.
    again = sample_sde(model, prompts, steps=6, cfg=2.0, resolution=16, seed=[3, 4], sde_window=(1, 4))
    assert torch.equal(again.states, traj.states)
    alone = sample_sde(model, ["bb"], steps=6, cfg=2.0, resolution=16, seed=[4], sde_window=(1, 4))
    torch.testing.assert_close(alone.states[:, 0], traj.states[:, 1])
    with pytest.raises(ValueError, match="sde_window"):
        sample_sde(model, prompts, steps=6, resolution=16, sde_window=(4, 9))


def test_make_generators() -> None:
    gens = make_generators(5, 2)
    again = make_generators([5, 6], 2)
    assert torch.equal(torch.randn(3, generator=gens[1]), torch.randn(3, generator=again[1]))
    with pytest.raises(ValueError, match="seeds"):
        make_generators([1, 2, 3], 2)


def test_samplers_on_tiny_sd3(tmp_path: Path) -> None:
    """Integration with the real adapter: shapes, determinism, batch independence."""
    from opdkit.models import load_flow_model
    from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

    model = load_flow_model(build_tiny_sd3_pipeline(tmp_path / "pipe", with_t5=False))
    prompts = ["a red cube", "a blue sphere"]
    x0 = sample_ode(model, prompts, steps=3, cfg=4.5, resolution=32, seed=[0, 1])
    assert x0.shape == (2, 4, 32, 32) and torch.isfinite(x0).all()
    alone = sample_ode(model, prompts[1:], steps=3, cfg=4.5, resolution=32, seed=[1])
    torch.testing.assert_close(alone[0], x0[1], atol=1e-4, rtol=1e-4)
    traj = sample_sde(model, prompts, steps=3, cfg=4.5, resolution=32, seed=[0, 1])
    assert traj.states.shape == (4, 2, 4, 32, 32) and torch.isfinite(traj.log_probs).all()
    torch.testing.assert_close(traj.states[0], sample_sde(model, prompts, steps=3, seed=[0, 1]).states[0])
    assert model.decode(traj.x0).shape == (2, 3, 32, 32)
