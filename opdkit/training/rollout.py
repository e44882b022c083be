"""On-policy data: which prompts a step uses, SDE rollouts that store every transition, and the
re-scoring of a stored transition under the current weights.

Everything here works on a flow model (``encode_prompts`` / ``uncond`` / ``velocity`` /
``decode``) and plain tensors. :func:`transition` runs exactly the rollout's code path and
batching, so before the first update the PPO ratio is exactly 1 (bit for bit on CPU fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.sampling import (
    SdeStep,
    guided_velocity,
    initial_noise,
    make_generators,
    sample_sde,
    sde_step_with_logprob,
)


@dataclass
class StepPrompts:
    """The prompts and image seeds of one training step, for one rank.

    Attributes:
        indices: prompt indices (into the prompt list) of this rank's prompts, (B_local,).
        all_indices: the prompt indices of the whole step, every rank's in rank order, (B,).
        records: the records, each repeated ``group_size`` times in a row, (B_local * G,).
        seeds: one initial/SDE noise seed per image, aligned with ``records``.
    """

    indices: list[int]
    records: list[dict[str, Any]]
    seeds: list[int]
    all_indices: list[int]


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
        all_indices=[int(i) for i in chosen],
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
            noise=None if noise_seeds is None else start_noise(model, resolution, list(noise_seeds[rows])),
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


def start_noise(model: Any, resolution: int, seeds: list[int]) -> torch.Tensor:
    """Initial noise x_1, one image per seed: (len(seeds), C, h, w) on the model's device."""
    return initial_noise(model.latent_shape(resolution), make_generators(seeds, len(seeds)), model.device, len(seeds))


def shared_noise_seeds(seeds: Sequence[int], group_size: int) -> list[int]:
    """Initial-noise seeds that give every image of a group its group's one starting noise.

    Derived from the group's first image seed but different from it, so that image's SDE noise
    (drawn from its own seed) is not the starting noise again.
    """
    first = [int(seeds[i - i % group_size]) for i in range(len(seeds))]
    return [(s * 6364136223846793005 + 1442695040888963407) % 2**62 for s in first]


def transition(model: Any, batch: Rollout, t: int, rows: slice, detach_uncond: bool = False) -> SdeStep:
    """Re-score stored transition ``t`` of rows ``rows`` under the model's current weights.

    Runs the rollout's own code path (one CFG-batched forward, the same rows, the same sigma
    tensor), so with unchanged weights the result equals the stored log-prob exactly. Gradients
    flow to ``log_prob`` and ``mean`` when grad mode is on; with ``detach_uncond`` not through the
    CFG unconditional branch.

    Returns:
        :class:`~opdkit.sampling.SdeStep` with log_prob (n,), mean (n, C, h, w), std (n,).
    """
    x = batch.states[t, rows]
    n = x.shape[0]
    uncond = model.uncond(n) if batch.cfg != 1.0 else None
    v = guided_velocity(model, x, batch.sigmas[t], batch.cond[rows], uncond, batch.cfg, detach_uncond)
    return sde_step_with_logprob(
        x, v, batch.sigmas[t], batch.sigmas[t + 1], batch.noise_level, prev_sample=batch.states[t + 1, rows],
        logprob_pool=batch.logprob_pool,
    )


