"""The training objectives as pure tensor functions: no model, no optimizer, no I/O.

Every loss, KL and advantage that a method uses lives here once, each with its formula, so a
researcher changing an objective reads one function. Shapes: B samples, D = C*h*w dimensions of
one SDE state. Log-probabilities are Gaussian log-densities **averaged over dimensions** (as in
flow_grpo and :mod:`opdkit.sampling`); sigma is in [0, 1] with 1 = pure noise and
``dt = sigma_next - sigma < 0``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from opdkit.sampling import gaussian_log_prob, shift_sigmas

KlScaling = Literal["flow_grpo", "exact"]


def flow_matching_loss(model: Any, x0: torch.Tensor, cond: Any, generator: torch.Generator, sigma_shift: float) -> torch.Tensor:
    """Rectified-flow loss ``mean ||v(x_t, sigma) - (eps - x0)||^2`` on clean samples ``x0``.

    ``x0``: (B, C, h, w) in model space; ``cond``: their conditioning. sigma in [0, 1] is drawn
    logit-normal(0, 1) and shifted toward high noise like the sampling schedule; ``x_t = (1 -
    sigma) x0 + sigma eps``. ``generator`` (CPU) draws sigma, then eps. Returns a 0-dim tensor.
    """
    sigma = shift_sigmas(torch.sigmoid(torch.randn(len(x0), generator=generator)), sigma_shift).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * eps
    v = model.velocity(x_t, sigma, cond)
    return torch.nn.functional.mse_loss(v.float(), (eps - x0).float())


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    detach_advantages: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per sample.

    ``rho = exp(log_prob - old_log_prob)``;
    ``loss = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))``.

    Args:
        log_prob: (B,) under the current policy (carries the gradient).
        old_log_prob: (B,) under the sampling policy (data).
        advantages: (B,).
        clip_range: eps (1e-4 in flow_grpo).
        detach_advantages: False lets gradients flow through the advantages too (OPD with
            ``detach_kl: false``, where the advantage is -KL of the current student).

    Returns:
        (loss (B,), ratio (B,) detached).
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    if detach_advantages:
        advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio.detach()


def gaussian_kl(
    mean: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor | float,
    scaling: KlScaling = "flow_grpo",
) -> torch.Tensor:
    """KL between two SDE transitions N(mean, var I) and N(mean_ref, var I), per sample.

    Both transitions come from the same state and sigma, so they share the variance
    ``var = s_t^2 * (-dt)`` (``std`` below is ``sqrt(var)``, as :class:`SdeStep` returns it).

    * ``"exact"``: the exact KL of the two D-dimensional Gaussians, in nats:
      ``||mean - mean_ref||^2 / (2 s_t^2 (-dt))`` (sum over the D = C*h*w dimensions).
    * ``"flow_grpo"``: the scaling of flow_grpo's and Flow-OPD's code,
      ``mean_over_dims((mean - mean_ref)^2) / (2 s_t^2)``, i.e. the exact KL times
      ``(-dt) / D``: averaged over dimensions like our log-probs, and without the step's
      ``1 / (-dt)``. Its magnitude does not grow with resolution, which is why the published
      beta values (0.04, 0.01) are quoted for it.

    Args:
        mean, mean_ref: (B, C, h, w) transition means (policy, reference).
        std: (B,) transition standard deviation ``s_t * sqrt(-dt)``.
        dt: ``sigma_next - sigma`` (< 0), scalar or (B,).
        scaling: ``"flow_grpo"`` or ``"exact"``.

    Returns:
        (B,) float32, >= 0; differentiable w.r.t. both means.
    """
    diff2 = (mean.float() - mean_ref.float()) ** 2
    dims = tuple(range(1, diff2.ndim))
    var = std.float() ** 2  # s_t^2 * (-dt)
    if scaling == "exact":
        return diff2.sum(dim=dims) / (2.0 * var)
    if scaling == "flow_grpo":
        minus_dt = -torch.as_tensor(dt, dtype=torch.float32, device=var.device).reshape(-1)
        return diff2.mean(dim=dims) * minus_dt / (2.0 * var)  # = mean(diff2) / (2 s_t^2)
    raise ValueError(f"unknown KL scaling {scaling!r} (expected 'flow_grpo' or 'exact')")


def sampled_kl(
    log_prob: torch.Tensor,
    sample: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor | float,
    scaling: KlScaling = "flow_grpo",
    pool: int = 1,
) -> torch.Tensor:
    """One-sample estimate of KL(pi || pi_ref) at the action taken: ``log pi(x') - log pi_ref(x')``.

    Its mean over ``x' ~ pi`` is :func:`gaussian_kl` (same ``scaling``). Unlike that analytic KL,
    which depends only on the state x, this estimate depends on the action x', so used as a
    (detached) advantage through the policy ratio it gives the gradient of the KL in expectation:
    ``E[grad log pi(x') * (log pi(x') - log pi_ref(x'))] = grad KL``. A state-only advantage times
    ``grad log pi`` has expectation zero (the score function has mean zero), so the analytic KL as
    a detached advantage teaches nothing but noise. This is the per-token estimator of on-policy
    distillation for language models, applied per SDE step.

    Args:
        log_prob: (B,) log pi(x' | x) from the rollout (the dims-averaged convention of
            :func:`~opdkit.sampling.sde_step_with_logprob`).
        sample: (B, C, h, w) the next state x' that the rollout drew.
        mean_ref: (B, C, h, w) the reference (teacher) transition mean at x.
        std: (B,) transition standard deviation (shared by both policies).
        dt: ``sigma_next - sigma`` (< 0), scalar or (B,).
        scaling: ``"flow_grpo"`` or ``"exact"``, as :func:`gaussian_kl`.
        pool: the rollout's ``logprob_pool`` (``log_prob`` must use the same); with k > 1 the
            estimate is of the KL between the k x k block-mean parts of the two steps.

    Returns:
        (B,) float32 (any sign), no gradient.
    """
    with torch.no_grad():
        std_b = std.float().reshape(-1, *([1] * (sample.ndim - 1)))
        log_ratio = log_prob.float() - gaussian_log_prob(sample.float(), mean_ref.float(), std_b, pool)
        if scaling == "exact":
            return log_ratio * sample[0].numel() / pool**2  # dims-averaged -> summed
        if scaling == "flow_grpo":
            minus_dt = -torch.as_tensor(dt, dtype=torch.float32, device=log_ratio.device).reshape(-1)
            return log_ratio * minus_dt  # exact KL * (-dt) / D, as gaussian_kl
    raise ValueError(f"unknown KL scaling {scaling!r} (expected 'flow_grpo' or 'exact')")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std: Literal["group", "batch"] = "batch",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-normalised advantages ``(R - mean of its group) / (std + eps)``, clipped to +-clip.

    A group whose images all scored alike (:func:`flat_groups`) gets exactly 0: a float32 mean of
    equal values need not equal them (eight 1/3s average to 1/3 + 3e-8), and with ``std: group`` the
    eps would blow that residue up to ~3e-4, a gradient from nothing that ``drop_zero_advantage``
    would keep.

    Args:
        rewards: (N,) with the ``group_size`` images of a prompt in consecutive rows.
        group_size: G. With G == 1 the batch mean is subtracted instead (no group to compare to).
        std: ``"group"`` (each group's own std) or ``"batch"`` (one std over all N rewards,
            flow_grpo's default); population std (ddof 0).
        clip: advantages are clamped to [-clip, clip].
        eps: added to the std (1e-4 as in flow_grpo).

    Returns:
        (N,) float32.
    """
    r = rewards.detach().float().reshape(-1)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards are not whole groups of {group_size}")
    groups = r.view(-1, group_size)
    if group_size > 1:
        centred = groups - groups.mean(dim=1, keepdim=True)
        flat = flat_groups(r, group_size).unsqueeze(1)
    else:  # no group to compare to: the batch is the group
        centred = groups - r.mean()
        flat = r.amax() == r.amin()
    centred = centred.masked_fill(flat, 0.0)
    if std == "group":
        scale = groups.std(dim=1, unbiased=False, keepdim=True)
    elif std == "batch":
        scale = r.std(unbiased=False)
    else:
        raise ValueError(f"unknown advantage std {std!r} (expected 'group' or 'batch')")
    return (centred / (scale + eps)).clamp(-clip, clip).reshape(-1)




def flat_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N / G,) bool: the groups whose ``group_size`` consecutive rewards are all equal (no gradient)."""
    groups = rewards.detach().reshape(-1, group_size)
    return groups.amax(dim=1) == groups.amin(dim=1)


def kept_sample_weights(advantages: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights that drop samples whose advantage is exactly 0: ``w_i = n / kept``
    for a kept sample, 0 for a dropped one, so ``mean(w * loss)`` is the mean over the kept
    samples (all zeros when none is kept). flow_grpo drops such samples from its batch: a group
    whose images all scored alike has no policy gradient, only its KL term.

    Args:
        advantages: (B,).

    Returns:
        (B,) float32.
    """
    keep = (advantages != 0).float()
    return keep * (keep.numel() / keep.sum().clamp(min=1.0))


def sampled_kl_advantage(
    estimate: torch.Tensor, sample: torch.Tensor, pool: int = 1, clip: float = 5.0
) -> torch.Tensor:
    """OPD's per-sample advantage from a :func:`sampled_kl` estimate ``k``: ``A = -D' * clip(k)``.

    Log-probs are means over the D' = D / pool^2 noise dimensions they see, so the policy
    gradient of a detached advantage ``A`` is ``E[A * grad log pi] = -E[k * grad log pi_sum] / D'
    = -grad(KL) / D'``. Multiplying by D' makes the expected gradient of ``-A * rho`` exactly
    ``grad(KL)``: the same weight as minimising KL directly (``loss_mode: direct``) and as MAR,
    which carry the full gradient. ``clip`` bounds ``k`` itself, before the scaling: with
    ``kl_scaling: flow_grpo`` the estimate is per dimension and times ``-dt`` (about 1e-5 on the
    shapes model), so 5 cuts only outliers, as for an analytic KL advantage; with ``exact`` it is
    a sum over the D' dimensions and a clip of 5 can bind and bias the gradient: raise it.

    Args:
        estimate: (B,) the sampled KL estimate ``k`` (:func:`sampled_kl`).
        sample: (B, C, h, w) the next states it was taken at (for D).
        pool: the rollout's ``logprob_pool``.
        clip: bound on ``|k|``.

    Returns:
        (B,) float32, no gradient.
    """
    dims = sample[0].numel() / pool**2
    return -estimate.clamp(-clip, clip) * dims
