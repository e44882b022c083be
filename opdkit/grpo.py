"""``method: grpo`` — Flow-GRPO: reinforce a flow model's own SDE samples with group-relative rewards.

One training step ``k`` (everything random in it is seeded by ``(train.seed, k)``, so a resumed
run repeats exactly what an uninterrupted one would have done):

1. **Prompts.** ``train.batch_size`` prompts drawn from the recipe's prompt set; with several
   processes each rank takes a contiguous share of whole groups.
2. **Rollout.** ``train.group_size`` images per prompt with the Flow-GRPO SDE sampler (steps,
   noise level, CFG, the ``sampler.train_window`` of stochastic steps), in micro-batches of
   ``train.micro_batch`` images, storing every state and log pi_old of every stochastic step.
3. **Rewards.** Each rank scores its own images with the weighted sum of the recipe's reward
   plug-ins; the rewards of all ranks are gathered and group-normalised into advantages
   (group or batch std + 1e-4, clipped to ``train.adv_clip``).
4. **Update.** ``train.inner_epochs`` passes over the stored transitions. For each micro-batch
   (the same rows as in the rollout) and trained step t: recompute log pi_theta with CFG exactly
   as sampled, ratio rho = exp(log pi_theta - log pi_old), PPO-clipped loss, plus
   ``train.kl_beta`` x KL to the reference policy (the base: LoRA disabled, or a frozen copy when
   fine-tuning fully), backward. Gradients accumulate over all trained steps of
   ``train.grad_accum`` micro-batches; then they are averaged across processes, clipped, and
   AdamW steps; the EMA (``train.ema``) follows.
5. **Bookkeeping.** A line of ``metrics.jsonl``; an image grid every ``train.sample_every``
   steps; a checkpoint (trained weights, optimizer, EMA, JSON state) every
   ``train.checkpoint_every`` steps, at the last step and when ``train.max_minutes`` is up.

Run directory (see :mod:`opdkit.rundir`): ``recipe.yaml``, ``metrics.jsonl``,
``samples/step_*.png``, ``checkpoints/``, ``tensorboard/`` (event files, written automatically
when the ``tensorboard`` package is importable; set ``OPDKIT_TENSORBOARD=0`` to turn it off),
``ranks/rank_<r>.jsonl`` (multi-process runs: the prompt indices and seeds each rank sampled, and
a checksum of its final weights), and ``final/`` (read by :mod:`opdkit.runs`):

* LoRA: ``final/lora.safetensors`` (the EMA weights when ``train.ema`` is set, else the trained
  ones) and, with EMA, ``final/lora_online.safetensors`` (the raw trained weights);
* full fine-tuning: ``final/transformer.safetensors`` (and ``transformer_online.safetensors``);
* ``final/final.json``: kind, step, whether EMA weights were saved.

Distributed: the same command under accelerate runs data-parallel, e.g.
``accelerate launch --multi_gpu --num_processes 2 -m opdkit.cli train RECIPE``. On a machine
without CUDA this starts two CPU processes that talk gloo (``accelerate launch --cpu`` alone
starts ONE process unless MPI is configured). Each rank samples and scores whole groups; the
rewards are gathered for the advantages; gradients are all-reduced by hand
(:func:`opdkit.policy.average_gradients`), so the model adapter is never wrapped and every rank
keeps identical weights. FSDP/DeepSpeed configs are not supported by this trainer.

Precision: ``train.precision`` fp16/bf16 autocasts the forward passes on CUDA (fp16 with a
gradient scaler); on a CPU it falls back to fp32 with a warning. The PPO ratio of the first
update is exactly 1 on CPU fp32 (logged as ``ratio_first_max_dev``); LoRA dropout > 0 breaks
that equality (the rollout runs without dropout).

Not done here: the recipe's ``eval`` section is not run during or after training; evaluate a
finished run with ``opdkit eval --bench NAME --model RUN_DIR``. Wall-clock metric fields all
end in ``seconds``.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.data.sources import load_prompts
from opdkit.errors import OpdkitError
from opdkit.recipe import dump_recipe
from opdkit.registry import models

if TYPE_CHECKING:
    import torch

    from opdkit.policy import Rollout
    from opdkit.recipe import LoadedRecipe


def run(loaded: LoadedRecipe, out_dir: str | Path, resume: bool = False) -> Path:
    """Train with Flow-GRPO; returns the directory of the final weights (``<out_dir>/final``)."""
    import torch
    from accelerate import Accelerator

    from opdkit import policy
    from opdkit.progress import progress_bar

    recipe = loaded.recipe
    train, sampler = recipe.train, recipe.sampler
    # The model is built before the process group exists: transformers' save_pretrained (which
    # builders such as shapes_new use) writes only on rank 0 once torch.distributed is up.
    torch.manual_seed(train.seed)
    model = models.build(recipe.model.type, recipe.model.builder_params())
    # On a machine without CUDA, processes started by `accelerate launch` / torchrun talk gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device

    # -- run directory (rank 0 writes; every rank reads the same checkpoint) ---------------------
    rundir = policy.open_run_dir(out_dir, dump_recipe(recipe), resume=resume, accelerator=accelerator)

    # -- model, trainable parameters, optimizer, EMA ----------------------------------------------
    model.to(device=device)
    torch.manual_seed(train.seed)  # LoRA init: identical on every rank
    trainable = policy.setup_trainable(model, train.lora, train.gradient_checkpointing)
    params = trainable.params
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    ema = policy.EMA(trainable.names, params, train.ema.decay, train.ema.every) if train.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16" and device.type == "cuda")

    def autocast() -> Any:
        return policy.precision_context(train.precision, device)

    reward_fn = policy.WeightedReward(recipe.rewards)
    records = load_prompts(recipe.prompts)

    group = train.group_size
    local_images = train.batch_size // world * group if train.batch_size % world == 0 else 0
    micro = train.micro_batch or local_images
    if local_images == 0 or local_images % micro:
        raise OpdkitError(
            f"{loaded.path}: each of {world} processes samples batch_size / {world} x group_size images; "
            f"train.batch_size ({train.batch_size}) must divide by {world} and train.micro_batch ({micro}) "
            f"must divide {train.batch_size // world * group}"
        )
    chunks_per_step = local_images // micro
    updates_per_epoch = math.ceil(chunks_per_step / train.grad_accum)
    window = tuple(sampler.train_window) if sampler.train_window is not None else None

    modules = {"transformer": model.transformer}
    restored = policy.restore_run(rundir, modules, optimizer, ema, resume=resume, accelerator=accelerator)
    start, elapsed_before, optimizer_steps = restored.step, restored.elapsed_s, restored.optimizer_steps
    rank_log, board = restored.rank_log, restored.board

    def save(step: int, elapsed: float) -> None:
        policy.save_checkpoint(
            rundir, modules, optimizer, ema, step=step, elapsed=elapsed, optimizer_steps=optimizer_steps,
            keep=train.keep_checkpoints, accelerator=accelerator,
        )  # fmt: skip

    t0 = time.perf_counter()
    step = start
    with contextlib.ExitStack() as stack:
        bar = (
            stack.enter_context(progress_bar(f"grpo {loaded.path.stem}", total=train.max_steps, completed=start))
            if main
            else None
        )
        if board is not None:
            stack.callback(board.close)
        while step < train.max_steps:
            step += 1
            t_step = time.perf_counter()

            # 1-2. prompts and rollout ------------------------------------------------------------
            drawn = policy.step_prompts(
                records, seed=train.seed, step=step, batch_size=train.batch_size,
                group_size=group, rank=rank, world_size=world, balance_tags=recipe.prompts.balance_tags,
            )  # fmt: skip
            model.transformer.eval()
            with autocast():
                batch = policy.rollout(
                    model, drawn.records, drawn.seeds, steps=sampler.steps, cfg=sampler.cfg,
                    noise_level=sampler.noise_level, resolution=sampler.resolution, shift=sampler.shift,
                    window=window, micro_batch=micro,
                    noise_seeds=policy.shared_noise_seeds(drawn.seeds, group) if sampler.shared_initial_noise else None,
                    logprob_pool=sampler.logprob_pool,
                )  # fmt: skip
            t_rollout = time.perf_counter()

            # 3. rewards and advantages over the gathered groups -----------------------------------
            scores = reward_fn(batch.images, batch.prompts, batch.records)
            all_rewards = accelerator.gather(scores.total.to(device)).cpu()
            all_parts = {k: accelerator.gather(v.to(device)).cpu() for k, v in scores.parts.items()}
            advantages_all = policy.group_advantages(all_rewards, group, train.adv_std, train.adv_clip)
            advantages = advantages_all[rank * local_images : (rank + 1) * local_images].to(device)
            t_reward = time.perf_counter()

            # 4. policy update ----------------------------------------------------------------------
            lr = policy.scheduled_lr(train, step)
            stats = policy_update(
                model, batch, advantages, trainable, optimizer, scaler, ema, autocast, train,
                updates_per_epoch=updates_per_epoch, world=world, lr=lr,
                optimizer_steps=optimizer_steps,
            )  # fmt: skip
            optimizer_steps = stats.pop("optimizer_steps")
            t_update = time.perf_counter()

            # 5. bookkeeping -------------------------------------------------------------------------
            gathered = {k: accelerator.gather(v.to(device)).cpu() if v.numel() else v for k, v in stats.items()}
            elapsed = elapsed_before + time.perf_counter() - t0
            record = _metrics(step, lr, all_rewards, all_parts, advantages_all, gathered, group)
            record.update(
                rollout_seconds=round(t_rollout - t_step, 3),
                reward_seconds=round(t_reward - t_rollout, 3),
                update_seconds=round(t_update - t_reward, 3),
                seconds=round(elapsed, 3),
            )
            if not math.isfinite(record["loss"]):
                raise OpdkitError(f"{loaded.path}: loss became {record['loss']} at step {step}; lower train.lr")
            if policy.end_of_step(
                step, record, elapsed, train=train, accelerator=accelerator, rundir=rundir, board=board, bar=bar,
                rank_log=rank_log, drawn=drawn, save=save, grid=(batch, scores.total, group),
                bar_fields={"reward": record["reward"], "kl": record["kl"] if record["kl"] is not None else 0.0},
            ):  # fmt: skip
                break

    return policy.finish_run(model, trainable, ema, rundir, step, accelerator, rank_log)


# ----------------------------------------------------------------------------------------------
# the update


def policy_update(
    model: Any,
    batch: Rollout,
    advantages: torch.Tensor,
    trainable: Any,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    ema: Any,
    autocast: Any,
    train: Any,
    *,
    updates_per_epoch: int,
    world: int,
    lr: float,
    optimizer_steps: int,
) -> dict[str, Any]:
    """``inner_epochs`` passes of PPO-clipped updates over one rollout (this rank's rows).

    Returns this rank's per-sample statistics as 1-D tensors (``ratio``, ``kl``, ``loss``,
    ``policy_loss``, ``clipped``, ``ratio_first`` — the ratios of the very first update, which
    must all be exactly 1 — and ``grad_norm`` per update), plus the new ``optimizer_steps``.
    """
    import torch

    from opdkit import policy

    params = trainable.params
    for group in optimizer.param_groups:
        group["lr"] = lr
    chunks = batch.chunks()
    steps = batch.trained_steps
    beta = train.kl_beta
    ref_means: dict[tuple[int, int], torch.Tensor] = {}  # the reference is fixed: compute once per step
    ratios, kls, losses, policy_losses, clipped, first, norms = [], [], [], [], [], [], []
    model.transformer.train()
    for _epoch in range(train.inner_epochs):
        for u in range(updates_per_epoch):
            members = list(range(u * train.grad_accum, min((u + 1) * train.grad_accum, len(chunks))))
            # Every (micro-batch, step) term is weighted so the update is the mean over all of them.
            weight = 1.0 / (len(members) * len(steps))
            update_ratios = []
            for c in members:
                rows = chunks[c]
                for t in steps:
                    with autocast():
                        new = policy.transition(model, batch, t, rows)
                        if beta > 0:
                            if (c, t) not in ref_means:
                                with torch.no_grad(), trainable.reference(model):
                                    ref_means[(c, t)] = policy.transition(model, batch, t, rows).mean
                    loss_i, ratio = policy.clipped_policy_loss(
                        new.log_prob, batch.log_probs[t, rows], advantages[rows], train.clip_range
                    )
                    if beta > 0:
                        dt = batch.sigmas[t + 1] - batch.sigmas[t]
                        kl = policy.gaussian_kl(new.mean, ref_means[(c, t)], new.std, dt, train.kl_scaling)
                        total = loss_i + beta * kl
                        kls.append(kl.detach())
                    else:
                        total = loss_i
                    scaler.scale(total.mean() * weight).backward()
                    ratios.append(ratio)
                    update_ratios.append(ratio)
                    losses.append(total.detach())
                    policy_losses.append(loss_i.detach())
                    clipped.append(((ratio - 1.0).abs() > train.clip_range).float())
            if not first:
                first = update_ratios
            # All ranks average their gradients first, so every rank takes the same step.
            policy.average_gradients(params, world)
            scaler.unscale_(optimizer)
            if train.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            else:
                norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
            norms.append(norm.detach().reshape(1).float())
            if ema is not None:
                ema.update(params, optimizer_steps)
    model.transformer.eval()
    cat = lambda xs: torch.cat(xs).float().cpu() if xs else torch.zeros(0)  # noqa: E731
    return {
        "ratio": cat(ratios),
        "ratio_first": cat(first),
        "clipped": cat(clipped),
        "kl": cat(kls),
        "loss": cat(losses),
        "policy_loss": cat(policy_losses),
        "grad_norm": cat(norms),
        "optimizer_steps": optimizer_steps,
    }


# ----------------------------------------------------------------------------------------------
# bookkeeping


def _metrics(
    step: int,
    lr: float,
    rewards: torch.Tensor,
    parts: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    stats: dict[str, torch.Tensor],
    group_size: int,
) -> dict[str, Any]:
    """One ``metrics.jsonl`` record from the gathered (all-rank) values."""
    from opdkit.policy import summarize

    reward = summarize(rewards)
    adv = summarize(advantages)
    ratio = summarize(stats["ratio"])
    groups = rewards.view(-1, group_size)
    record: dict[str, Any] = {
        "step": step,
        "reward": reward["mean"],
        "reward_std": reward["std"],
    }
    for name, values in parts.items():
        summary = summarize(values)
        record[f"reward/{name}/mean"] = summary["mean"]
        record[f"reward/{name}/std"] = summary["std"]
    record.update(
        {
            "adv_mean": adv["mean"],
            "adv_std": adv["std"],
            "adv_min": adv["min"],
            "adv_max": adv["max"],
            "zero_std_groups": float((groups.std(dim=1, unbiased=False) == 0).float().mean()) if group_size > 1 else 0.0,
            "ratio_mean": ratio["mean"],
            "ratio_min": ratio["min"],
            "ratio_max": ratio["max"],
            "ratio_first_max_dev": float((stats["ratio_first"] - 1.0).abs().max()) if stats["ratio_first"].numel() else 0.0,
            "clip_frac": float(stats["clipped"].mean()),
            "kl": float(stats["kl"].mean()) if stats["kl"].numel() else None,
            "policy_loss": float(stats["policy_loss"].mean()),
            "loss": float(stats["loss"].mean()),
            "grad_norm": float(stats["grad_norm"].mean()),
            "lr": lr,
        }
    )
    return record
