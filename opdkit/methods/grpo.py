"""``method: grpo`` — Flow-GRPO: reinforce a flow model's own SDE samples with group-relative rewards.

One step ``k`` (the loop, :mod:`opdkit.training.loop`, does everything else):

1. **Rollout.** ``train.batch_size`` prompts, ``train.group_size`` images each, sampled with the
   Flow-GRPO SDE sampler; every state and log pi_old of the stochastic steps is kept. With
   several processes each rank takes a contiguous share of whole groups.
2. **Rewards.** Each rank scores its own images with the weighted sum of the recipe's rewards;
   the rewards of all ranks are gathered and group-normalised into advantages
   (:func:`~opdkit.training.losses.group_advantages`).
3. **Loss** of each (micro-batch, trained step) term (:meth:`Grpo.term_loss`): recompute
   log pi_theta with CFG exactly as sampled, the PPO-clipped surrogate, plus ``train.kl_beta``
   x KL to the reference policy (the base: LoRA disabled, or a frozen copy when fine-tuning
   fully). :func:`~opdkit.training.onpolicy.sweep_updates` runs ``inner_epochs`` passes of it.

Run folder: ``final/lora.safetensors`` (EMA weights when ``train.ema`` is set; the raw ones as
``lora_online.safetensors``) or ``final/transformer.safetensors`` for full fine-tuning, and
``final/final.json``; see :mod:`opdkit.runs`. The PPO ratio of the first update is exactly 1 on
CPU fp32 (logged as ``ratio_first_max_dev``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from opdkit.training.loop import Optimization, RunContext, Setup, StepResult, summarize
from opdkit.training.losses import (
    clipped_policy_loss,
    flat_groups,
    gaussian_kl,
    group_advantages,
    kept_sample_weights,
)
from opdkit.training.onpolicy import (
    OnPolicy,
    group_tags,
    means_by_tag,
    ratio_metrics,
    save_rollout_grid,
    sweep_updates,
    update_members,
)
from opdkit.training.rewards import WeightedReward
from opdkit.training.rollout import Rollout, transition


class Grpo:
    """Flow-GRPO over the shared loop."""

    name = "grpo"

    def setup(self, ctx: RunContext) -> Setup:
        from opdkit.data.sources import load_prompts

        self.ctx = ctx
        self.policy = OnPolicy.create(ctx)
        self.reward_fn = WeightedReward(ctx.recipe.rewards, where=ctx.loaded.where)
        self.records = load_prompts(ctx.recipe.prompts)
        return self.policy.setup(ctx)

    def step(self, step: int, ctx: RunContext, optim: Optimization) -> StepResult:
        train = ctx.train
        t0 = time.perf_counter()
        drawn, batch = self.policy.rollout(ctx, self.records, step)
        t_rollout = time.perf_counter()

        scores = self.reward_fn(batch.images, batch.prompts, batch.records)
        rewards = ctx.gather(scores.total)
        parts = {k: ctx.gather(v) for k, v in scores.parts.items()}
        advantages_all = group_advantages(rewards, train.group_size, train.adv_std, train.adv_clip)
        self.advantages = self.policy.my_rows(ctx, advantages_all)
        t_reward = time.perf_counter()

        self.batch, self.ref_means = batch, {}
        stats = sweep_updates(ctx, optim, batch, self.term_loss)
        t_update = time.perf_counter()

        record = _reward_metrics(rewards, parts, advantages_all, train.group_size, group_tags(self.records, drawn))
        record.update(ratio_metrics(ctx, stats))
        kl = ctx.gather(stats["kl"]) if "kl" in stats else torch.zeros(0)
        record["kl"] = float(kl.mean()) if kl.numel() else None
        record["policy_loss"] = float(ctx.gather(stats["policy_loss"]).mean())
        record.update(
            rollout_seconds=round(t_rollout - t0, 3),
            reward_seconds=round(t_reward - t_rollout, 3),
            update_seconds=round(t_update - t_reward, 3),
        )
        return StepResult(
            record,
            bar={"reward": record["reward"], "kl": record["kl"] if record["kl"] is not None else 0.0},
            drawn=drawn,
            grid=lambda path: save_rollout_grid(batch, scores.total, train.group_size, path),
        )

    def term_loss(self, c: int, t: int, rows: slice, epoch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """PPO-clipped loss of stored transition ``t`` of micro-batch ``c`` (+ beta x KL to the reference)."""
        model, batch, train = self.ctx.model, self.batch, self.ctx.train
        with self.ctx.autocast():
            new = transition(model, batch, t, rows, train.detach_uncond)
            if train.kl_beta > 0 and (c, t) not in self.ref_means:  # the reference is fixed: once per step
                with torch.no_grad(), self.policy.trainable.reference(model):
                    self.ref_means[(c, t)] = transition(model, batch, t, rows).mean
        policy_loss, ratio = clipped_policy_loss(new.log_prob, batch.log_probs[t, rows], self.advantages[rows], train.clip_range)
        extras: dict[str, Any] = {"policy_loss": policy_loss}
        total = policy_loss
        if train.kl_beta > 0:
            kl = gaussian_kl(new.mean, self.ref_means[(c, t)], new.std, _dt(batch, t), train.kl_scaling)
            extras["kl"] = kl
            total = policy_loss + train.kl_beta * kl
        if train.drop_zero_advantage:
            total = total * self._kept_weights(c, rows)
        return total, ratio, extras

    def _kept_weights(self, c: int, rows: slice) -> torch.Tensor:
        """:func:`kept_sample_weights` of micro-batch ``c``'s ``rows``, counted over its whole update
        (the ``train.grad_accum`` micro-batches :func:`sweep_updates` sums), so that the update is the
        mean over its kept samples however ``micro_batch`` splits it."""
        chunks, accum = self.batch.chunks(), self.ctx.train.grad_accum
        members = update_members(len(chunks), accum, c // accum)
        start, stop = chunks[members[0]].start, chunks[members[-1]].stop
        return kept_sample_weights(self.advantages[start:stop])[rows.start - start : rows.stop - start]

    def finish(self, ctx: RunContext, optim: Optimization, step: int) -> Path:
        return self.policy.finish(ctx, optim, step)


def _dt(batch: Rollout, t: int) -> torch.Tensor:
    return batch.sigmas[t + 1] - batch.sigmas[t]


def _reward_metrics(
    rewards: torch.Tensor, parts: dict[str, torch.Tensor], advantages: torch.Tensor, group_size: int, tags: list[str]
) -> dict[str, Any]:
    """The reward and advantage part of a ``metrics.jsonl`` record, from all-rank values.

    ``rewards``, ``advantages`` and each part are (B * G,), a group's G images in a row; ``tags``
    is the task tag of each of the B groups. With two or more tags in the prompt set the record
    also holds, per tag, the mean reward (``reward_by_tag/TAG``) and the share of groups whose
    images all scored alike (``zero_std_groups_by_tag/TAG``): a multi-task run's mean hides which
    tasks learn and which never give a gradient.
    """
    reward = summarize(rewards)
    adv = summarize(advantages)
    record: dict[str, Any] = {"reward": reward["mean"], "reward_std": reward["std"]}
    for name, values in parts.items():
        summary = summarize(values)
        record[f"reward/{name}/mean"] = summary["mean"]
        record[f"reward/{name}/std"] = summary["std"]
    # a group whose images all scored alike carries no gradient (groups of one image are not counted)
    flat = flat_groups(rewards, group_size) if group_size > 1 else torch.zeros(len(rewards), dtype=torch.bool)
    record.update(
        adv_mean=adv["mean"], adv_std=adv["std"], adv_min=adv["min"], adv_max=adv["max"],
        zero_std_groups=float(flat.float().mean()),
    )  # fmt: skip
    record.update(means_by_tag(rewards, group_size, tags, "reward_by_tag"))
    record.update(means_by_tag(flat.float(), 1, tags, "zero_std_groups_by_tag"))
    return record
