"""What the policy-gradient trainers share (GRPO now, OPD next): rollouts, losses, KL, rewards, EMA.

Both :mod:`opdkit.grpo` and :mod:`opdkit.opd` import this module; neither imports the other.
Everything here works on a :class:`~opdkit.models.flow_model.FlowModel` (or anything with the
same ``encode_prompts``/``uncond``/``velocity``/``decode`` surface) and plain tensors.

The pieces, in the order a training step uses them:

* :func:`step_prompts` — which prompt records and per-image seeds step ``k`` uses, the same on
  every rank and on resume (seeded by ``(seed, k)``); each rank takes whole groups.
* :func:`rollout` — SDE sampling of a batch of images in fixed micro-batches, storing every state
  and the log-probability of every stochastic transition (:class:`Rollout`).
* :func:`transition` — the log-probability (and Gaussian mean) of a stored transition under the
  *current* weights. It runs exactly the code path and batching of the rollout, so before the
  first update the PPO ratio is exactly 1 (bit for bit on CPU fp32).
* :class:`WeightedReward` — R = sum_k w_k r_k over the recipe's reward plug-ins.
* :func:`group_advantages` — (R - group mean) / (group or batch std + 1e-4), clipped.
* :func:`clipped_policy_loss` — PPO's clipped surrogate per sample.
* :func:`gaussian_kl` — KL between two SDE transitions with the same variance, in the two
  scalings of DESIGN §3 (``flow_grpo`` and ``exact``).
* :func:`setup_trainable` / :class:`Trainable` — LoRA (peft) or full fine-tuning, and the
  reference policy (the base with adapters disabled, or a frozen copy).
* :class:`EMA`, :func:`average_gradients`, :func:`precision_context` — the training plumbing.
* :func:`save_final`, :func:`save_rollout_grid`, :func:`out_of_time`, :class:`TensorBoardLog` —
  the run directory's final weights, image grids, time limit and event files.

Log-probabilities are Gaussian log-densities **averaged over dimensions** (C*h*w), as in
flow_grpo and :mod:`opdkit.sampling`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from opdkit.errors import OpdkitError
from opdkit.rundir import atomic_path, atomic_write_json
from opdkit.sampling import (
    SdeStep,
    gaussian_log_prob,
    guided_velocity,
    initial_noise,
    make_generators,
    sample_sde,
    sde_step_with_logprob,
)

if TYPE_CHECKING:
    from opdkit.recipe import LoraSpec, RewardSpec
    from opdkit.rundir import RunDir

__all__ = [
    "ADAPTER",
    "EMA",
    "RewardScores",
    "Rollout",
    "RunStart",
    "StepPrompts",
    "TensorBoardLog",
    "Trainable",
    "WeightedReward",
    "average_gradients",
    "clipped_policy_loss",
    "encode_unique",
    "end_of_step",
    "finish_run",
    "gaussian_kl",
    "group_advantages",
    "open_run_dir",
    "out_of_time",
    "parameters_sha256",
    "precision_context",
    "restore_run",
    "rollout",
    "save_checkpoint",
    "save_final",
    "save_rollout_grid",
    "scheduled_lr",
    "setup_trainable",
    "shared_noise_seeds",
    "step_prompts",
    "summarize",
    "transition",
]

# Name of the trained LoRA adapter on the policy's transformer.
ADAPTER = "default"
KlScaling = Literal["flow_grpo", "exact"]


# ----------------------------------------------------------------------------------------------
# prompts of a step


@dataclass
class StepPrompts:
    """The prompts and image seeds of one training step, for one rank.

    Attributes:
        indices: prompt indices (into the prompt list) of this rank's prompts, (B_local,).
        records: the records, each repeated ``group_size`` times in a row, (B_local * G,).
        seeds: one initial/SDE noise seed per image, aligned with ``records``.
    """

    indices: list[int]
    records: list[dict[str, Any]]
    seeds: list[int]


def step_prompts(
    records: Sequence[dict[str, Any]],
    *,
    seed: int,
    step: int,
    batch_size: int,
    group_size: int,
    rank: int = 0,
    world_size: int = 1,
    balance_tags: bool = False,
) -> StepPrompts:
    """Draw step ``step``'s ``batch_size`` prompts (distinct when possible) and image seeds.

    Every rank draws the same global batch from ``numpy.random.default_rng([seed, step])`` and
    keeps its contiguous share of whole groups, so a run's samples do not depend on the number
    of ranks and a resumed run draws exactly what an uninterrupted one would.

    With ``balance_tags`` the batch is spread evenly over the records' task tags (in a random
    tag order per step) instead of following the prompt set's proportions: a prompt set that
    is 85% OCR then still trains every task.
    """
    import numpy as np

    if batch_size % world_size:
        raise OpdkitError(
            f"train.batch_size ({batch_size} prompts) must be divisible by the number of processes ({world_size})"
        )
    rng = np.random.default_rng([seed, step])

    def pick(pool: np.ndarray, count: int) -> np.ndarray:
        if len(pool) >= count:
            return pool[rng.permutation(len(pool))[:count]]
        return pool[rng.integers(0, len(pool), size=count)]  # fewer prompts than needed: repeat

    if balance_tags:
        by_tag: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_tag.setdefault(str(record.get("tag")), []).append(i)
        tags = [sorted(by_tag)[j] for j in rng.permutation(len(by_tag))]
        counts = [batch_size // len(tags) + (1 if j < batch_size % len(tags) else 0) for j in range(len(tags))]
        chosen = np.concatenate(
            [pick(np.asarray(by_tag[tag]), count) for tag, count in zip(tags, counts, strict=True) if count]
        )
    else:
        chosen = pick(np.arange(len(records)), batch_size)
    seeds = rng.integers(0, 2**62, size=(batch_size, group_size))
    per_rank = batch_size // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    indices = [int(i) for i in chosen[mine]]
    return StepPrompts(
        indices=indices,
        records=[records[i] for i in indices for _ in range(group_size)],
        seeds=[int(s) for s in seeds[mine].reshape(-1)],
    )


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Rollout:
    """SDE samples of a batch, everything a policy update needs.

    Attributes:
        records: prompt records, one per image (N).
        seeds: per-image seeds (N).
        cond: conditioning of the N images (rows of a group share one encoding).
        states: (T + 1, N, C, h, w) float32; ``states[t + 1]`` is the result of step t.
        log_probs: (T, N) float32 log pi_old(states[t + 1] | states[t]) (mean over dims); 0 at
            deterministic steps.
        sigmas: (T + 1,) float32 schedule, 1 -> 0.
        sde_steps: (T,) bool, the stochastic (= trained) steps.
        images: (N, 3, H, W) float32 in [0, 1] on the CPU, the decoded final samples.
        micro_batch: images per forward pass; :func:`transition` must use the same chunks.
        cfg: guidance weight used.
        noise_level: SDE noise level ``a`` used.
        logprob_pool: block size of the log-probs (``sampler.logprob_pool``; 1 = every dimension).
    """

    records: list[dict[str, Any]]
    seeds: list[int]
    cond: Any
    states: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sde_steps: torch.Tensor
    images: torch.Tensor
    micro_batch: int
    cfg: float
    noise_level: float
    logprob_pool: int = 1

    def __len__(self) -> int:
        return int(self.states.shape[1])

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    @property
    def trained_steps(self) -> list[int]:
        """Indices t of the stochastic steps, in sampling order."""
        return [int(t) for t in torch.nonzero(self.sde_steps.cpu()).flatten()]

    def chunks(self) -> list[slice]:
        """The micro-batches (row slices) the rollout was sampled in."""
        n = len(self)
        return [slice(i, min(i + self.micro_batch, n)) for i in range(0, n, self.micro_batch)]


def encode_unique(model: Any, prompts: Sequence[str]) -> Any:
    """Encode each distinct prompt once and gather rows (a GRPO group shares one prompt)."""
    unique: dict[str, int] = {}
    rows = [unique.setdefault(p, len(unique)) for p in prompts]
    cond = model.encode_prompts(list(unique))
    if len(unique) == len(prompts):
        return cond
    return cond[torch.tensor(rows, device=cond.prompt_embeds.device)]


@torch.no_grad()
def rollout(
    model: Any,
    records: Sequence[dict[str, Any]],
    seeds: Sequence[int],
    *,
    steps: int,
    cfg: float,
    noise_level: float,
    resolution: int,
    shift: float | None = None,
    window: tuple[int, int] | None = None,
    micro_batch: int | None = None,
    decode: bool = True,
    noise_seeds: Sequence[int] | None = None,
    logprob_pool: int = 1,
) -> Rollout:
    """Sample one image per (record, seed) with the Flow-GRPO SDE sampler, in micro-batches.

    Steps inside ``window`` ([start, stop), default all) are stochastic and get a log-prob;
    the others are Euler steps. Image ``i`` depends only on its prompt and ``seeds[i]``.

    Args:
        model: the policy (LoRA active, if any).
        records: prompt records (``prompt`` key), one per image.
        seeds: one seed per image.
        steps, cfg, noise_level, resolution, shift: sampler settings (see
            :func:`opdkit.sampling.sample_sde`).
        window: stochastic steps [start, stop).
        micro_batch: images per forward pass (default: all).
        decode: decode the final samples to ``images`` (else ``images`` is empty).
        noise_seeds: one seed per image for the initial noise x_1 (default: drawn from
            ``seeds``, before the SDE noise); equal seeds give equal starts, see
            :func:`shared_noise_seeds`.
        logprob_pool: log-probs of the k x k block means of the SDE noise
            (:func:`opdkit.sampling.gaussian_log_prob`).
    """
    n = len(records)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} records")
    if noise_seeds is not None and len(noise_seeds) != n:
        raise ValueError(f"{len(noise_seeds)} noise seeds for {n} records")
    micro = min(micro_batch or n, n)
    cond = encode_unique(model, [r["prompt"] for r in records])

    def start_noise(rows_seeds: list[int]) -> torch.Tensor:
        shape = model.latent_shape(resolution)
        return initial_noise(shape, make_generators(rows_seeds, len(rows_seeds)), model.device, len(rows_seeds))

    states, log_probs, images = [], [], []
    traj = None
    for start in range(0, n, micro):
        rows = slice(start, min(start + micro, n))
        traj = sample_sde(
            model,
            cond=cond[rows],
            uncond=model.uncond(rows.stop - rows.start) if cfg != 1.0 else None,
            steps=steps,
            cfg=cfg,
            shift=shift,
            resolution=resolution,
            noise_level=noise_level,
            seed=list(seeds[rows]),
            sde_window=window,
            noise=None if noise_seeds is None else start_noise(list(noise_seeds[rows])),
            logprob_pool=logprob_pool,
        )
        states.append(traj.states)
        log_probs.append(traj.log_probs)
        if decode:
            images.append(model.decode(traj.x0).float().cpu())
    assert traj is not None
    return Rollout(
        records=list(records),
        seeds=[int(s) for s in seeds],
        cond=cond,
        states=torch.cat(states, dim=1) if len(states) > 1 else states[0],
        log_probs=torch.cat(log_probs, dim=1) if len(log_probs) > 1 else log_probs[0],
        sigmas=traj.sigmas,
        sde_steps=traj.sde_steps,
        images=torch.cat(images) if images else torch.empty(0),
        micro_batch=micro,
        cfg=cfg,
        noise_level=noise_level,
        logprob_pool=logprob_pool,
    )


def shared_noise_seeds(seeds: Sequence[int], group_size: int) -> list[int]:
    """Initial-noise seeds that give every image of a group its group's one starting noise.

    Derived from the group's first image seed but different from it, so that image's SDE noise
    (drawn from its own seed) is not the starting noise again.
    """
    first = [int(seeds[i - i % group_size]) for i in range(len(seeds))]
    return [(s * 6364136223846793005 + 1442695040888963407) % 2**62 for s in first]


def transition(model: Any, batch: Rollout, t: int, rows: slice) -> SdeStep:
    """Re-score stored transition ``t`` of rows ``rows`` under the model's current weights.

    Runs the rollout's own code path (one CFG-batched forward, the same rows, the same sigma
    tensor), so with unchanged weights the result equals the stored log-prob exactly. Gradients
    flow to ``log_prob`` and ``mean`` when grad mode is on.

    Returns:
        :class:`~opdkit.sampling.SdeStep` with log_prob (n,), mean (n, C, h, w), std (n,).
    """
    x = batch.states[t, rows]
    n = x.shape[0]
    uncond = model.uncond(n) if batch.cfg != 1.0 else None
    v = guided_velocity(model, x, batch.sigmas[t], batch.cond[rows], uncond, batch.cfg)
    return sde_step_with_logprob(
        x, v, batch.sigmas[t], batch.sigmas[t + 1], batch.noise_level, prev_sample=batch.states[t + 1, rows],
        logprob_pool=batch.logprob_pool,
    )


# ----------------------------------------------------------------------------------------------
# losses


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
    centred = groups - (groups.mean(dim=1, keepdim=True) if group_size > 1 else r.mean())
    if std == "group":
        scale = groups.std(dim=1, unbiased=False, keepdim=True)
    elif std == "batch":
        scale = r.std(unbiased=False)
    else:
        raise ValueError(f"unknown advantage std {std!r} (expected 'group' or 'batch')")
    return (centred / (scale + eps)).clamp(-clip, clip).reshape(-1)


# ----------------------------------------------------------------------------------------------
# rewards


@dataclass
class RewardScores:
    """Scores of a batch: the weighted total and every named part.

    Attributes:
        total: (N,) float32 ``sum_k w_k * r_k``.
        parts: ``label -> (N,)`` for each reward's score, and ``label/key -> (N,)`` for the
            other keys a reward returned (sub-scores, logged only).
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class WeightedReward:
    """R = sum_k weight_k * r_k over the recipe's ``rewards`` (plug-ins built once).

    A reward plug-in returns ``(images (N, 3, H, W) in [0, 1], prompts, records) -> {"score":
    (N,), ...}``. Labels (``name`` or the plug-in name) must be unique: they name the logged
    metrics. A reward with ``tags`` scores only the images whose prompt record has one of those
    tags (an OCR reward on sign prompts only); the others get 0 in the total and NaN in
    :attr:`RewardScores.parts` (so logged means cover only the images it scored).
    """

    def __init__(self, specs: Sequence[RewardSpec], build: Any = None) -> None:
        if build is None:
            from opdkit.registry import rewards

            build = rewards.build
        self.labels = [spec.label for spec in specs]
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            raise OpdkitError(
                f"rewards: labels must be unique to be logged apart, {', '.join(repeated)} repeated; "
                "give each a distinct 'name'"
            )
        self.weights = [float(spec.weight) for spec in specs]
        self.tags = [set(spec.tags) if spec.tags is not None else None for spec in specs]
        self.functions = [build(spec.type, spec.params) for spec in specs]

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> RewardScores:
        n = images.shape[0]
        total = torch.zeros(n, dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for label, weight, tags, fn in zip(self.labels, self.weights, self.tags, self.functions, strict=True):
            rows = [i for i, r in enumerate(records) if tags is None or r.get("tag") in tags]
            if not rows:
                parts[label] = torch.full((n,), math.nan)
                continue
            if len(rows) == n:
                out = fn(images, prompts, records)
            else:
                out = fn(images[rows], [prompts[i] for i in rows], [records[i] for i in rows])
            if not isinstance(out, dict) or "score" not in out:
                raise OpdkitError(f"reward {label!r} must return a dict with a 'score' tensor")
            index = torch.tensor(rows)
            for key, value in out.items():
                value = torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1)
                if value.numel() != len(rows):
                    raise OpdkitError(f"reward {label!r}: {key!r} has {value.numel()} values for {len(rows)} images")
                full = torch.full((n,), math.nan).index_copy(0, index, value)
                if key == "score":
                    if not bool(torch.isfinite(value).all()):
                        raise OpdkitError(f"reward {label!r} returned a non-finite score")
                    parts[label] = full
                    total = total + weight * torch.nan_to_num(full, nan=0.0)
                else:
                    parts[f"{label}/{key}"] = full
        return RewardScores(total, parts)


# ----------------------------------------------------------------------------------------------
# trainable parameters, reference policy, EMA


@dataclass
class Trainable:
    """What is trained and how to run the reference policy.

    Attributes:
        names: parameter names (in ``model.transformer.named_parameters()``), aligned with
            ``params``.
        params: the trained parameters (LoRA adapter weights, or the whole transformer).
        lora: True for a LoRA run (adapter :data:`ADAPTER`), False for full fine-tuning.
        frozen: full fine-tuning only: a frozen copy of the initial transformer (the reference).
    """

    names: list[str]
    params: list[torch.nn.Parameter]
    lora: bool
    frozen: Any | None = None

    @contextlib.contextmanager
    def reference(self, model: Any) -> Iterator[None]:
        """Inside the block the model computes the reference policy (the base model).

        LoRA: adapters disabled. Full fine-tuning: the frozen copy is swapped in.
        """
        if self.lora:
            with model.adapters_disabled():
                yield
            return
        trained = model.transformer
        model.transformer = self.frozen
        try:
            yield
        finally:
            model.transformer = trained

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``name -> tensor`` (detached views) of the trained parameters."""
        return {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}


def setup_trainable(model: Any, lora: LoraSpec | None, gradient_checkpointing: bool = False) -> Trainable:
    """Make the policy trainable: add a LoRA adapter (peft) or unfreeze the whole transformer.

    Text encoders and VAE stay frozen. LoRA's ``A`` is drawn from the global torch RNG (seed it
    first); ``B`` starts at zero, so the policy starts equal to the reference.
    ``gradient_checkpointing`` switches on diffusers' per-block activation recomputation (it
    acts only in forwards that record a graph; no-grad rollouts are unchanged).
    """
    transformer = model.transformer
    transformer.requires_grad_(False)
    if gradient_checkpointing:
        if not hasattr(transformer, "enable_gradient_checkpointing"):
            raise OpdkitError(f"train.gradient_checkpointing: {type(transformer).__name__} does not support it")
        transformer.enable_gradient_checkpointing()
    if lora is not None:
        if not float(lora.alpha).is_integer():
            raise OpdkitError(f"train.lora.alpha must be a whole number (adapter files store it so), got {lora.alpha}")
        try:
            model.add_lora(
                ADAPTER,
                rank=lora.rank,
                alpha=int(lora.alpha),
                target_modules=list(lora.targets),
                dropout=lora.dropout,
            )
        except ValueError as exc:  # peft: no module matched the targets
            first = str(exc).strip().splitlines()[0]
            raise OpdkitError(f"train.lora.targets {lora.targets} matched no module of the transformer ({first})") from None
        model.set_adapter(ADAPTER)
        named = [(n, p) for n, p in transformer.named_parameters() if "lora_" in n and f".{ADAPTER}." in n + "."]
        if not named:
            raise OpdkitError(f"train.lora.targets {lora.targets} matched no module of the transformer")
        for _, p in named:
            p.requires_grad_(True)
        return Trainable([n for n, _ in named], [p for _, p in named], lora=True)
    dtype = next(transformer.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):
        warnings.warn(
            f"full fine-tuning of a {str(dtype).removeprefix('torch.')} transformer: AdamW steps below 1/256 "
            "of a weight round away; load the model in float32 and set train.precision instead",
            stacklevel=2,
        )
    frozen = copy.deepcopy(transformer).eval().requires_grad_(False)
    transformer.requires_grad_(True)
    named = list(transformer.named_parameters())
    return Trainable([n for n, _ in named], [p for _, p in named], lora=False, frozen=frozen)


class EMA:
    """Exponential moving average of parameters, updated every ``every`` optimizer steps.

    ``shadow <- decay * shadow + (1 - decay) * param`` on optimizer steps that are multiples of
    ``every`` (Flow-OPD: decay 0.9 every 8 steps). The shadow is what gets evaluated.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.nn.Parameter], decay: float, every: int) -> None:
        self.names = list(names)
        self.decay = float(decay)
        self.every = int(every)
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter], optimizer_step: int) -> bool:
        """Fold the parameters in if ``optimizer_step`` (1-based) is a multiple of ``every``."""
        if optimizer_step % self.every:
            return False
        for shadow, p in zip(self.shadow, params, strict=True):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise OpdkitError(f"EMA state lacks {len(missing)} parameters (first: {missing[0]})")
        # onto the device of the weights (a checkpoint loads on the CPU; training may run on a GPU)
        self.shadow = [
            state[n].detach().float().to(old.device, copy=True) for n, old in zip(self.names, self.shadow, strict=True)
        ]

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into ``params`` (restored on exit)."""
        saved = [p.detach().clone() for p in params]
        for p, shadow in zip(params, self.shadow, strict=True):
            p.copy_(shadow)
        try:
            yield
        finally:
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


# ----------------------------------------------------------------------------------------------
# plumbing


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``bf16``/``fp16`` where the device supports it; fp32 otherwise.

    On a CPU, low precision is refused with a warning and the run stays in fp32: CPU autocast
    is slow and makes the PPO ratio drift from 1 (flow_grpo issue #104). Master weights and
    every SDE/log-prob computation stay fp32 in all cases (:mod:`opdkit.sampling` upcasts).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    supported = device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.is_bf16_supported())
    if not supported:
        warnings.warn(
            f"train.precision {precision} is not supported on {device}; training in fp32", stacklevel=2
        )
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def average_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` across processes, in one flat buffer.

    Every rank then holds the same gradient, so identical optimizers keep identical weights.
    A parameter without a gradient counts as zero.
    """
    if world_size <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def parameters_sha256(params: Sequence[torch.Tensor]) -> str:
    """Hex SHA-256 of the parameters' bytes (to compare weights across ranks or runs)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def summarize(values: torch.Tensor) -> dict[str, float | None]:
    """mean / std (population) / min / max of a tensor's non-NaN values; None for each when there are none."""
    v = values.detach().float().reshape(-1)
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


# ----------------------------------------------------------------------------------------------
# run plumbing shared by the trainers (final weights, grids, time limit, TensorBoard)


def open_run_dir(out_dir: str | Path, recipe_yaml: str, *, resume: bool, accelerator: Any) -> RunDir:
    """The run directory; a previous run there is an error unless resuming.

    Every rank checks (so every rank stops, not only the one that writes); rank 0 writes the
    resolved recipe.
    """
    from opdkit.rundir import RunDir

    rundir = RunDir(out_dir)
    latest = rundir.latest()
    if not resume and latest is not None:
        raise OpdkitError(
            f"{rundir.root}: holds a previous run (checkpoint at step {latest[0]}); "
            "pass --resume to continue it or --out to start elsewhere"
        )
    if accelerator.is_main_process:
        rundir.prepare(recipe_yaml, resume)
    accelerator.wait_for_everyone()
    return rundir


@dataclass
class RunStart:
    """Where a GRPO / OPD run starts: step 0, or the last checkpoint's step when resuming."""

    step: int
    elapsed_s: float
    optimizer_steps: int
    rank_log: Path | None  # per-rank log of prompts and seeds under data parallelism
    board: TensorBoardLog | None  # rank 0 only


def restore_run(
    rundir: RunDir, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, ema: EMA | None,
    *, resume: bool, accelerator: Any,
) -> RunStart:  # fmt: skip
    """Load the last checkpoint (weights, optimizer, EMA) when resuming, and cut every log back to
    its step so that a resumed run appends exactly what an uninterrupted one would have written."""
    from opdkit.checkpoint import load_training_state
    from opdkit.rundir import read_jsonl, rewrite_jsonl

    main = accelerator.is_main_process
    start, elapsed, optimizer_steps = 0, 0.0, 0
    latest = rundir.latest()
    if resume and latest is not None:
        state = load_training_state(latest[1], modules, optimizer)
        start, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        optimizer_steps = int(state.get("optimizer_steps", 0))
        if ema is not None:
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(latest[1] / "ema.safetensors")))
        if main:
            rundir.truncate_metrics(start)
    rank_log = None
    if accelerator.num_processes > 1:
        rank_log = rundir.root / "ranks" / f"rank_{accelerator.process_index}.jsonl"
        kept = [r for r in read_jsonl(rank_log) if int(r.get("step", 0)) <= start and "weights_sha256" not in r]
        rewrite_jsonl(rank_log, kept)
    board = TensorBoardLog(rundir.root / "tensorboard", purge_step=start + 1) if main else None
    return RunStart(start, elapsed, optimizer_steps, rank_log, board)


def save_checkpoint(
    rundir: RunDir, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, ema: EMA | None,
    *, step: int, elapsed: float, optimizer_steps: int, keep: int, accelerator: Any,
) -> None:  # fmt: skip
    """Rank 0 writes a complete checkpoint (weights, optimizer, EMA, trainer state) atomically; all ranks sync."""
    if accelerator.is_main_process:
        from opdkit.checkpoint import save_training_state

        save_training_state(
            rundir.checkpoint_dir(step), modules, optimizer,
            {"step": step, "elapsed_s": elapsed, "optimizer_steps": optimizer_steps},
            extra_tensors={"ema": ema.state_dict()} if ema is not None else None,
        )  # fmt: skip
        rundir.commit_checkpoint(step, keep=keep)
    accelerator.wait_for_everyone()


def scheduled_lr(train: Any, step: int) -> float:
    """The learning rate of (1-based) ``step`` for every method: a linear warm-up over
    ``train.warmup_steps``, then ``train.lr`` held (``lr_decay: constant``) or falling to 0 at
    ``train.lr_decay_steps`` (default ``train.max_steps``) along a cosine (``lr_decay: cosine``)."""
    if train.lr_decay == "cosine" and step > train.warmup_steps:
        horizon = train.lr_decay_steps or train.max_steps
        done = (step - train.warmup_steps) / max(1, horizon - train.warmup_steps)
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return train.lr * (min(1.0, step / train.warmup_steps) if train.warmup_steps else 1.0)


def end_of_step(
    step: int, record: dict[str, Any], elapsed: float, *, train: Any, accelerator: Any, rundir: Any,
    board: TensorBoardLog | None, bar: Any, rank_log: Path | None, drawn: Any, save: Any,
    grid: tuple[Rollout, torch.Tensor, int] | None, bar_fields: dict[str, float],
) -> bool:
    """What GRPO and OPD do after each update: rank log, metrics, TensorBoard, sample grid
    (``grid`` = rollout, per-image score, group size; drawn only on ``sample_every`` steps),
    progress bar, checkpoint (``save(step, elapsed)``). Returns True when the run is out of time.
    """
    if rank_log is not None:
        from opdkit.rundir import append_jsonl

        append_jsonl(rank_log, {"step": step, "prompt_indices": drawn.indices, "seeds": drawn.seeds})
    if accelerator.is_main_process:
        if step % train.log_every == 0 or step == train.max_steps:
            rundir.log(record)
            assert board is not None
            board.log(record, step)
        if grid is not None and train.sample_every and step % train.sample_every == 0:
            batch, scores, group = grid
            save_rollout_grid(batch, scores, group, rundir.samples / f"step_{step:06d}.png")
        assert bar is not None
        bar.update(step, **bar_fields)
    stop = out_of_time(accelerator, train.max_minutes, elapsed)
    if step % train.checkpoint_every == 0 or step == train.max_steps or stop:
        save(step, elapsed)
    return stop


def finish_run(model: Any, trainable: Any, ema: Any, rundir: Any, step: int, accelerator: Any,
               rank_log: Path | None) -> Path:
    """Write ``final/`` (rank 0), log each rank's weight hash under data parallelism, sync; returns ``final/``."""
    final = rundir.root / "final"
    if accelerator.is_main_process:
        save_final(model, trainable, ema, final, step)
    if rank_log is not None:
        from opdkit.rundir import append_jsonl

        append_jsonl(rank_log, {"step": step, "weights_sha256": parameters_sha256(trainable.params)})
    accelerator.wait_for_everyone()
    return final


def out_of_time(accelerator: Any, max_minutes: float | None, elapsed: float) -> bool:
    """Rank 0's clock decides for everyone (ranks must stop at the same step)."""
    if max_minutes is None:
        return False
    import torch

    flag = torch.tensor([1.0 if elapsed >= 60.0 * max_minutes else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        flag = broadcast(flag, from_process=0)
    return bool(flag.item() > 0)


def save_rollout_grid(batch: Rollout, rewards: torch.Tensor, group_size: int, path: Path) -> None:
    """Up to 8 prompts x 8 images of this rank's rollout, captioned with prompt and a score per image."""
    import torch

    from opdkit.grid import save_grid

    cols = min(group_size, 8)
    picks = [p * group_size + g for p in range(min(len(batch) // group_size, 8)) for g in range(cols)]
    pixels = (batch.images[picks] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    captions = [f"{batch.records[i]['prompt']}\nR {float(rewards[i]):.3f}" for i in picks]
    save_grid(pixels, captions, path, cols=cols)


def save_final(model: Any, trainable: Any, ema: Any, final: Path, step: int) -> None:
    """Write ``final/`` (read by :mod:`opdkit.runs`): ``lora.safetensors`` or
    ``transformer.safetensors`` (EMA weights when present; the raw ones as ``*_online``) and
    ``final.json``."""
    from opdkit.rundir import save_safetensors_atomic

    final.mkdir(parents=True, exist_ok=True)

    def write(suffix: str) -> None:
        if trainable.lora:
            with atomic_path(final / f"lora{suffix}.safetensors") as tmp:
                model.save_lora(ADAPTER, tmp)
        else:
            save_safetensors_atomic(trainable.state_dict(), final / f"transformer{suffix}.safetensors")

    if ema is not None:
        write("_online")
    with ema.applied(trainable.params) if ema is not None else contextlib.nullcontext():
        write("")
    atomic_write_json(
        final / "final.json",
        {"kind": "lora" if trainable.lora else "full", "step": step, "ema": ema is not None, "adapter": ADAPTER},
    )


class TensorBoardLog:
    """Scalars to TensorBoard event files when ``tensorboard`` is installed (else nothing)."""

    def __init__(self, log_dir: Path, purge_step: int) -> None:
        self.writer: Any = None
        if os.environ.get("OPDKIT_TENSORBOARD", "1") == "0":
            return
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        # purge_step drops events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
