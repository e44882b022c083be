"""What the on-policy methods (GRPO and OPD) share, so that neither file copies the other.

* :class:`OnPolicy` — the policy made trainable (LoRA or full), the batch split into
  micro-batches, and the rollout of step ``k`` (prompts, SDE samples with log-probs);
* :func:`sweep_updates` — ``train.inner_epochs`` passes over the stored transitions: for each
  update, every (micro-batch, trained step) term's loss is back-propagated with weight
  ``1 / (micro-batches x steps)`` and then one optimizer step is taken; collects the ratio
  statistics every method logs (:func:`ratio_metrics`);
* :func:`save_final` and :func:`save_rollout_grid` — the run's ``final/`` and sample grids;
* :func:`group_tags` and :func:`means_by_tag` — per-task means of a multi-task step's logs.

The method supplies only its loss of one (micro-batch, step) term.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.rundir import atomic_write_json, save_safetensors_atomic
from opdkit.training.fsdp import gathered
from opdkit.training.loop import Optimization, RunContext, Setup
from opdkit.training.rollout import Rollout, StepPrompts, rollout, shared_noise_seeds, step_prompts
from opdkit.training.trainable import ADAPTER, Trainable, setup_trainable

# (micro-batch index, trained step t, rows, inner epoch) -> (loss (B,), ratio (B,) detached,
# other per-sample statistics to log)
TermLoss = Callable[[int, int, slice, int], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StatLists:
    """Per-sample statistics collected over a step's updates, concatenated at the end."""

    lists: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.lists.setdefault(key, []).append(value.detach())

    def cat(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat([x.float().cpu().reshape(-1) for x in v]) if v else torch.zeros(0) for k, v in self.lists.items()}


@dataclass
class OnPolicy:
    """The trainable policy and the shape of a step's batch on this rank.

    Attributes:
        trainable: what is trained, and the reference policy.
        local_images: images this rank samples per step (its share of prompts x group size).
        micro: images per forward pass.
    """

    trainable: Trainable
    local_images: int
    micro: int

    @classmethod
    def create(cls, ctx: RunContext) -> OnPolicy:
        """Check the batch against the number of processes, then add the trained adapter (LoRA A
        is drawn from the global RNG, seeded here so it is identical on every rank)."""
        train = ctx.train
        world = ctx.world
        local = train.batch_size // world * train.group_size if train.batch_size % world == 0 else 0
        micro = train.micro_batch or local
        if local == 0 or local % micro:
            raise OpdkitError(
                f"{ctx.loaded.path}: each of {world} processes samples batch_size / {world} x group_size images; "
                f"train.batch_size ({train.batch_size}) must divide by {world} and train.micro_batch ({micro}) "
                f"must divide {train.batch_size // world * train.group_size}"
            )
        torch.manual_seed(train.seed)
        trainable = setup_trainable(ctx.model, train.lora, train.gradient_checkpointing)
        return cls(trainable, local, micro)

    def setup(self, ctx: RunContext) -> Setup:
        frozen = [self.trainable.frozen] if self.trainable.frozen is not None else []
        return Setup({"transformer": ctx.model.transformer}, self.trainable.names, self.trainable.params, frozen)

    def rollout(self, ctx: RunContext, records: list[dict[str, Any]], step: int, *, decode: bool = True) -> tuple[StepPrompts, Rollout]:
        """Step ``step``'s prompts for this rank and their SDE samples (no grad, in ``eval`` mode)."""
        train, sampler = ctx.train, ctx.recipe.sampler
        drawn = step_prompts(
            records, seed=train.seed, step=step, batch_size=train.batch_size, group_size=train.group_size,
            rank=ctx.rank, world_size=ctx.world, balance_tags=ctx.recipe.prompts.balance_tags,
        )  # fmt: skip
        ctx.model.transformer.eval()
        window = tuple(sampler.train_window) if sampler.train_window is not None else None
        noise_seeds = shared_noise_seeds(drawn.seeds, train.group_size) if sampler.shared_initial_noise else None
        with ctx.autocast():
            batch = rollout(
                ctx.model, drawn.records, drawn.seeds, steps=sampler.steps, cfg=sampler.cfg,
                noise_level=sampler.noise_level, resolution=sampler.resolution, shift=sampler.shift,
                window=window, micro_batch=self.micro, decode=decode, noise_seeds=noise_seeds,
                logprob_pool=sampler.logprob_pool,
            )  # fmt: skip
        return drawn, batch

    def my_rows(self, ctx: RunContext, values: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a gathered per-image tensor, on the device."""
        return values[ctx.rank * self.local_images : (ctx.rank + 1) * self.local_images].to(ctx.device)

    def finish(self, ctx: RunContext, optim: Optimization, step: int) -> Path:
        final = ctx.rundir.root / "final"
        if ctx.main or optim.sharded:  # sharded weights are gathered by every process
            save_final(ctx.model, self.trainable, optim.ema, final, step, write=ctx.main)
        return final


def update_members(n_chunks: int, grad_accum: int, update: int) -> range:
    """The micro-batches (chunk indices) that optimizer update ``update`` of a sweep accumulates:
    ``grad_accum`` in a row, fewer in the last update."""
    return range(update * grad_accum, min((update + 1) * grad_accum, n_chunks))


def sweep_updates(ctx: RunContext, optim: Optimization, batch: Rollout, term_loss: TermLoss) -> dict[str, torch.Tensor]:
    """``train.inner_epochs`` passes of updates over one rollout (this rank's rows).

    Each update accumulates ``train.grad_accum`` micro-batches; every (micro-batch, trained step)
    term is weighted so that the update is the mean over all of them. Returns this rank's
    per-sample statistics as 1-D tensors: ``loss``, ``ratio``, ``clipped``, ``ratio_first`` (the
    ratios of the very first update, which must all be exactly 1), whatever ``term_loss`` adds,
    and ``grad_norm`` per update.
    """
    train = ctx.train
    chunks = batch.chunks()
    steps = batch.trained_steps
    updates = math.ceil(len(chunks) / train.grad_accum)
    stats = StatLists()
    first: list[torch.Tensor] = []
    norms = []
    ctx.model.transformer.train()
    for epoch in range(train.inner_epochs):
        for u in range(updates):
            members = update_members(len(chunks), train.grad_accum, u)
            weight = 1.0 / (len(members) * len(steps))
            update_ratios = []
            for c in members:
                for t in steps:
                    loss, ratio, extras = term_loss(c, t, chunks[c], epoch)
                    optim.backward(loss.mean() * weight)
                    stats.add("ratio", ratio)
                    stats.add("clipped", ((ratio - 1.0).abs() > train.clip_range).float())
                    stats.add("loss", loss)
                    for key, value in extras.items():
                        stats.add(key, value)
                    update_ratios.append(ratio)
            if not first:
                first = update_ratios
            norms.append(optim.step())
    ctx.model.transformer.eval()
    out = stats.cat()
    out["ratio_first"] = torch.cat([r.float().cpu().reshape(-1) for r in first]) if first else torch.zeros(0)
    out["grad_norm"] = torch.cat(norms).cpu()
    return out


def ratio_metrics(ctx: RunContext, stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Loss, PPO-ratio and gradient metrics of a step, gathered over the processes."""
    ratio = ctx.gather(stats["ratio"])
    first = ctx.gather(stats["ratio_first"])
    return {
        "loss": float(ctx.gather(stats["loss"]).mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "ratio_first_max_dev": float((first - 1.0).abs().max()) if first.numel() else 0.0,
        "clip_frac": float(ctx.gather(stats["clipped"]).mean()),
        "grad_norm": float(ctx.gather(stats["grad_norm"]).mean()),
    }


def group_tags(records: list[dict[str, Any]], drawn: StepPrompts) -> list[str]:
    """The task tag of each of the step's B groups, every rank's, in gathered (rank) order."""
    return [str(records[i].get("tag", "")) for i in drawn.all_indices]


def means_by_tag(values: torch.Tensor, group_size: int, tags: list[str], key: str) -> dict[str, float]:
    """``{key}/TAG``: the mean of ``values`` over the images of TAG's groups, for each tag.

    ``values`` is (B * G,), a group's G images in a row, gathered over ranks; ``tags`` holds the B
    groups' tags in the same order. Empty when the step holds fewer than two tags: a one-task run's
    mean is already logged, and a multi-task run's mean hides which tasks move.
    """
    if len(set(tags)) < 2:
        return {}
    groups = values.reshape(-1, group_size)
    out: dict[str, float] = {}
    for tag in sorted(set(tags)):
        mine = torch.tensor([t == tag for t in tags])
        out[f"{key}/{tag}"] = float(groups[mine].mean())
    return out


def save_rollout_grid(batch: Rollout, scores: torch.Tensor, group_size: int, path: Path) -> None:
    """Up to 8 prompts x 8 images of this rank's rollout, captioned with prompt and a score per image."""
    from opdkit.grid import save_grid

    cols = min(group_size, 8)
    picks = [p * group_size + g for p in range(min(len(batch) // group_size, 8)) for g in range(cols)]
    pixels = (batch.images[picks] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    captions = [f"{batch.records[i]['prompt']}\nR {float(scores[i]):.3f}" for i in picks]
    save_grid(pixels, captions, path, cols=cols)


def save_final(model: Any, trainable: Trainable, ema: Any, final: Path, step: int, write: bool = True) -> None:
    """Write ``final/`` (read by :mod:`opdkit.runs`): ``lora.safetensors`` or
    ``transformer.safetensors`` (EMA weights when present; the raw ones as ``*_online``) and
    ``final.json``. Under ``train.fsdp`` every process calls it to gather the full weights and
    only the one with ``write`` writes."""
    if write:
        final.mkdir(parents=True, exist_ok=True)

    def save(suffix: str) -> None:
        if trainable.lora:
            if write:
                model.save_lora(ADAPTER, final / f"lora{suffix}.safetensors")  # written atomically
            return
        tensors = gathered(trainable.state_dict())
        if write:
            save_safetensors_atomic(tensors, final / f"transformer{suffix}.safetensors")

    if ema is not None:
        save("_online")
    with ema.applied(trainable.params) if ema is not None else contextlib.nullcontext():
        save("")
    if write:
        atomic_write_json(
            final / "final.json",
            {"kind": "lora" if trainable.lora else "full", "step": step, "ema": ema is not None, "adapter": ADAPTER},
        )
