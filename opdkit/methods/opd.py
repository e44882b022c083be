"""``method: opd`` — Flow-OPD: distil several task teachers into one student on its own samples.

One step ``k`` (the loop, :mod:`opdkit.training.loop`, does everything else):

1. **Rollout.** The student (the LoRA adapter being trained) samples its own SDE trajectories
   for ``train.batch_size`` prompts x ``group_size`` images (``prompts.balance_tags`` spreads
   them over the task tags), storing every state and log pi_old, as GRPO does.
2. **Routing.** The router plug-in names one teacher per image (per sample, inside the batch).
3. **Loss** of each (micro-batch, trained step) term (:meth:`Opd.term_loss`): the dense
   per-step reverse KL ``KL_t = KL(pi_student(.|x_t) || pi_teacher(.|x_t))`` between the two
   Gaussian transitions at every visited state, the routed teacher's mean computed once with no
   grad (:mod:`opdkit.training.teachers`). ``train.loss_mode``:

   * ``direct`` — minimise ``mean KL_t`` itself (no ratio);
   * ``kl_only`` — advantage ``A_t`` from the KL through the PPO-clipped ratio, as Flow-OPD;
   * ``mixed`` — ``A_t`` plus the group-normalised task reward of the recipe's ``rewards``.

   ``A_t`` is set by ``train.kl_advantage``. ``sampled`` (default): ``-D * k_t`` with ``k_t =
   log pi_old(x_{t+1}|x_t) - log pi_teacher(x_{t+1}|x_t)`` at the state the rollout drew; its
   expected policy gradient is exactly ``grad KL_t``, the weight ``direct`` and MAR carry
   (:func:`~opdkit.training.losses.sampled_kl_advantage`). ``analytic``: ``-KL_t``, as Flow-OPD's
   code; it depends on the state only, so detached (``detach_kl: true``, what the paper
   describes) its expected gradient is zero, and it teaches only with ``detach_kl: false``.
   Regularizers add ``weight * KL(student || anchor)`` on every sample: ``mar`` (Manifold
   Anchor Regularization, anchor = a task-agnostic teacher or the base) and ``ref_kl`` (the base).

Cold start (``init``, :mod:`opdkit.methods.cold_start`): merged teacher adapters, then optional SFT
on teacher samples. Metrics: KL overall, per teacher and per task tag, routing counts, anchor KLs,
ratio stats, task rewards (overall and per tag) when the recipe names any.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError, first_line, prefixed
from opdkit.registry import regularizers, routers
from opdkit.training import fsdp
from opdkit.training.loop import Optimization, RunContext, Setup, StepResult, summarize
from opdkit.training.losses import (
    clipped_policy_loss,
    gaussian_kl,
    group_advantages,
    sampled_kl,
    sampled_kl_advantage,
)
from opdkit.training.onpolicy import (
    OnPolicy,
    group_tags,
    means_by_tag,
    ratio_metrics,
    save_rollout_grid,
    sweep_updates,
)
from opdkit.training.rewards import RewardScores, WeightedReward
from opdkit.training.rollout import transition
from opdkit.training.teachers import BASE, Teacher, frozen_means, load_teachers, routed_teacher_means


class Opd:
    """Flow-OPD over the shared loop."""

    name = "opd"

    def setup(self, ctx: RunContext) -> Setup:
        from opdkit.data.sources import load_prompts
        from opdkit.methods.cold_start import merge_init, sft_cold_start

        recipe, train = ctx.recipe, ctx.train
        self.ctx = ctx
        self.teachers = load_teachers(ctx.model, recipe.teachers, ctx.device, where=ctx.loaded.where)
        self.policy = OnPolicy.create(ctx)  # adds and activates the student adapter
        trainable = self.policy.trainable
        if not trainable.lora and any(t.kind == "lora" for t in self.teachers.values()):
            raise OpdkitError(f"{ctx.loaded.path}: LoRA teachers share the base with a LoRA student; set train.lora")
        if fsdp.wanted(train, ctx.world) and any(t.kind == "base" for t in self.teachers.values()):
            raise OpdkitError(
                f"{ctx.loaded.where('train', 'fsdp')}: a 'base' teacher runs the sharded model only on the processes with "
                "images routed to it, and a sharded forward needs them all; use a full teacher"
            )
        self.init_stats: dict[str, Any] = {}
        if recipe.init is not None:
            error = merge_init(ctx.model, trainable, self.teachers, recipe.init, train.lora.rank, train.lora.alpha)
            if error is not None:
                self.init_stats["init_merge_rel_error"] = error
        with prefixed(ctx.loaded.where("router")):
            self.route = routers.build(recipe.router.type, recipe.router.params)
        self.records = load_prompts(recipe.prompts)
        if recipe.init is not None and recipe.init.sft is not None and not ctx.resuming:
            self.init_stats.update(sft_cold_start(
                ctx.model, trainable, self.teachers, self.route, self.records, recipe.init.sft, recipe.sampler,
                seed=train.seed, balance_tags=recipe.prompts.balance_tags, show_progress=ctx.main,
            ))  # fmt: skip
        self.anchors: list[tuple[str, float, Teacher | None]] = []
        for i, spec in enumerate(recipe.regularizers):
            with prefixed(ctx.loaded.where("regularizers", i)):
                built = regularizers.build(spec.type, spec.params)
            anchor = getattr(built, "anchor", None)
            if not isinstance(anchor, str):
                raise OpdkitError(f"{ctx.loaded.where('regularizers', i)}: its builder must return an object with an 'anchor' name")
            if anchor != BASE and anchor not in self.teachers:
                raise OpdkitError(f"{ctx.loaded.where('regularizers', i)}: anchors to {anchor!r}, which is not a teacher")
            self.anchors.append((f"{spec.type}:{anchor}", spec.weight, self.teachers.get(anchor)))
        self.reward_fn = WeightedReward(recipe.rewards, where=ctx.loaded.where) if recipe.rewards else None
        return self.policy.setup(ctx)

    def step(self, step: int, ctx: RunContext, optim: Optimization) -> StepResult:
        train = ctx.train
        t0 = time.perf_counter()
        decode = self.reward_fn is not None or bool(train.sample_every)
        drawn, batch = self.policy.rollout(ctx, self.records, step, decode=decode)
        try:
            routes = list(self.route(batch.records, list(self.teachers)))
        except OpdkitError:
            raise
        except Exception as exc:  # the router's own failure, named, in one line
            raise OpdkitError(f"{ctx.loaded.where('router')}: {ctx.recipe.router.type!r} raised {first_line(exc)}") from exc
        unknown = sorted({str(r) for r in routes} - set(self.teachers))
        if len(routes) != len(batch) or unknown:
            raise OpdkitError(
                f"{ctx.loaded.where('router')}: {ctx.recipe.router.type!r} returned {len(routes)} routes for {len(batch)} images"
                + (f", naming {', '.join(unknown)}, not a teacher ({', '.join(self.teachers)})" if unknown else "")
            )
        t_rollout = time.perf_counter()

        scores, rewards, self.task_adv = None, None, None
        if self.reward_fn is not None:
            scores = self.reward_fn(batch.images, batch.prompts, batch.records)
            rewards = ctx.gather(scores.total)
            if train.loss_mode == "mixed":
                advantages = group_advantages(rewards, train.group_size, train.adv_std, train.adv_clip)
                self.task_adv = self.policy.my_rows(ctx, advantages)

        self.batch, self.routes = batch, routes
        self.targets: dict[tuple[int, int], torch.Tensor] = {}  # teacher means: fixed per rollout
        self.sampled: dict[tuple[int, int], torch.Tensor] = {}
        self.anchor_targets: dict[tuple[int, int, int], torch.Tensor] = {}
        self.kl_per_image = torch.zeros(len(batch))
        stats = sweep_updates(ctx, optim, batch, self.term_loss)
        t_update = time.perf_counter()

        record = self._metrics(ctx, stats, routes, scores, rewards, group_tags(self.records, drawn))
        if step == 1:
            record.update(self.init_stats)
        record.update(rollout_seconds=round(t_rollout - t0, 3), update_seconds=round(t_update - t_rollout, 3))
        grid_scores = scores.total if scores is not None else -self.kl_per_image
        return StepResult(
            record,
            bar={"kl": record["kl"], "loss": record["loss"]},
            drawn=drawn,
            grid=lambda path: save_rollout_grid(batch, grid_scores, train.group_size, path),
        )

    def term_loss(self, c: int, t: int, rows: slice, epoch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Distillation loss of stored transition ``t`` of micro-batch ``c``, plus the regularizers."""
        model, batch, train = self.ctx.model, self.batch, self.ctx.train
        with self.ctx.autocast():
            new = transition(model, batch, t, rows, train.detach_uncond)
            if (c, t) not in self.targets:
                self.targets[(c, t)] = routed_teacher_means(
                    model, self.policy.trainable, batch, t, rows, self.routes, self.teachers
                )
        dt = batch.sigmas[t + 1] - batch.sigmas[t]
        kl = gaussian_kl(new.mean, self.targets[(c, t)], new.std, dt, train.kl_scaling)
        if train.loss_mode == "direct":
            loss, ratio = kl, torch.exp(new.log_prob.detach() - batch.log_probs[t, rows])
        else:
            loss, ratio = clipped_policy_loss(
                new.log_prob, batch.log_probs[t, rows], self._kl_advantage(c, t, rows, new.std, dt, kl),
                train.clip_range, detach_advantages=train.detach_kl,
            )  # fmt: skip
        extras: dict[str, Any] = {"kl": kl}
        for a, (label, weight, anchor) in enumerate(self.anchors):
            if (c, t, a) not in self.anchor_targets:
                with self.ctx.autocast():
                    self.anchor_targets[(c, t, a)] = frozen_means(
                        model, self.policy.trainable, batch, anchor, t, torch.arange(rows.start, rows.stop)
                    )
            kl_anchor = gaussian_kl(new.mean, self.anchor_targets[(c, t, a)], new.std, dt, train.kl_scaling)
            loss = loss + weight * kl_anchor
            extras[f"kl_anchor/{label}"] = kl_anchor
        if epoch == 0:
            self.kl_per_image[rows] += kl.detach().cpu() / len(batch.trained_steps)
        return loss, ratio, extras

    def _kl_advantage(
        self, c: int, t: int, rows: slice, std: torch.Tensor, dt: torch.Tensor, kl: torch.Tensor
    ) -> torch.Tensor:
        """A_t of ``kl_only`` / ``mixed``: from the sampled estimate or the analytic KL, plus the task advantage."""
        train, batch = self.ctx.train, self.batch
        if train.kl_advantage == "sampled":
            if (c, t) not in self.sampled:  # log pi_old - log pi_teacher at the drawn state: fixed per rollout
                self.sampled[(c, t)] = sampled_kl(
                    batch.log_probs[t, rows], batch.states[t + 1, rows], self.targets[(c, t)], std.detach(), dt,
                    train.kl_scaling, batch.logprob_pool,
                )  # fmt: skip
            adv = sampled_kl_advantage(self.sampled[(c, t)], batch.states[t + 1, rows], batch.logprob_pool, train.adv_clip)
        else:
            adv = (-kl if not train.detach_kl else -kl.detach()).clamp(-train.adv_clip, train.adv_clip)
        return adv + self.task_adv[rows] if self.task_adv is not None else adv

    def _metrics(
        self, ctx: RunContext, stats: dict[str, torch.Tensor], routes: list[str],
        scores: RewardScores | None, rewards: torch.Tensor | None, tags: list[str],
    ) -> dict[str, Any]:  # fmt: skip
        """KL overall, per teacher and per task tag, routing counts, anchors, ratios and task rewards
        (also per tag), over all ranks. ``tags``: the step's B group tags in gathered order."""
        names = list(self.teachers)
        per_image = ctx.gather(self.kl_per_image)
        route_ids = ctx.gather(torch.tensor([names.index(r) for r in routes]))
        record: dict[str, Any] = {"kl": float(ctx.gather(stats["kl"]).mean()), **ratio_metrics(ctx, stats)}
        for i, name in enumerate(names):
            mine = route_ids == i
            record[f"routed/{name}"] = int(mine.sum())
            record[f"kl/{name}"] = float(per_image[mine].mean()) if bool(mine.any()) else None
        group_size = ctx.train.group_size
        record.update(means_by_tag(per_image, group_size, tags, "kl_by_tag"))
        for key, values in stats.items():
            if key.startswith("kl_anchor/"):
                record[key] = float(ctx.gather(values).mean()) if values.numel() else None
        if scores is not None and rewards is not None:
            for name, values in scores.parts.items():
                record[f"reward/{name}/mean"] = summarize(ctx.gather(values))["mean"]
            record["reward"] = float(rewards.mean())
            record.update(means_by_tag(rewards, group_size, tags, "reward_by_tag"))
        return record

    def finish(self, ctx: RunContext, optim: Optimization, step: int) -> Path:
        return self.policy.finish(ctx, optim, step)
