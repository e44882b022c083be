"""``method: opd`` — Flow-OPD: distil several task teachers into one student on its own samples.

One training step ``k`` (everything random in it is seeded by ``(train.seed, k)``, so a resumed
run repeats exactly what an uninterrupted one would have done):

1. **Prompts.** ``train.batch_size`` prompts (``group_size`` images each) from the recipe's
   prompt set, spread evenly over the task tags with ``prompts.balance_tags``.
2. **Rollout.** The student (the LoRA adapter being trained) samples its own SDE trajectories,
   storing every state and log pi_old (:func:`opdkit.policy.rollout`, as in GRPO).
3. **Routing.** The router plug-in names one teacher per image (per sample, inside the batch).
4. **Teachers.** At every visited state of the trained steps, the routed teacher's transition mean
   mu_teacher(x_t) is computed with no grad, one batched forward per teacher: LoRA teachers are
   named adapters on the ONE shared base (K teachers cost K adapters, not K models), switched per
   sub-batch; ``full`` teachers are separate transformers; ``base`` is the base with adapters off.
5. **Loss.** Dense per-step reverse KL ``KL_t = KL(pi_student(.|x_t) || pi_teacher(.|x_t))``
   between the two Gaussian transitions (:func:`opdkit.policy.gaussian_kl`, scaling
   ``train.kl_scaling``), used by ``train.loss_mode``:

   * ``kl_only`` — advantage ``A_t = clamp(-k_t, +-adv_clip)`` through the PPO-clipped ratio;
   * ``mixed`` — ``A_t`` plus the group-normalised task reward of the recipe's ``rewards``;
   * ``direct`` — minimise ``mean KL_t`` itself (no ratio).

   ``k_t`` is set by ``train.kl_advantage``. ``sampled`` (default): ``log pi_old(x_{t+1}|x_t) -
   log pi_teacher(x_{t+1}|x_t)`` at the state the rollout drew, whose mean is KL_t and which
   depends on the action, so ``E[A_t grad log pi] = -grad KL_t`` (:func:`opdkit.policy.sampled_kl`;
   the per-token estimator of LLM on-policy distillation). ``analytic``: KL_t itself, as Flow-OPD.
   KL_t depends only on x_t, not on the action, and the score function has mean zero, so with
   ``train.detach_kl: true`` (what the paper describes: "gradients flow only through rho") its
   expected gradient is ZERO. It teaches only with ``detach_kl: false`` (what Flow-OPD's code
   does), where the gradient flows through KL_t itself, i.e. mostly ``direct``. Regularizers add
   ``weight * KL(student || anchor)`` on every sample: ``mar`` (Manifold Anchor Regularization,
   anchor = a task-agnostic teacher or the base) and ``ref_kl`` (the base).
6. **Bookkeeping** as GRPO: ``metrics.jsonl`` (KL per teacher, routing counts, anchor KLs,
   ratio stats, rewards when the recipe names any), grids, checkpoints, ``final/``.

Cold start (``init``): the student's adapter starts from the teachers' LoRA adapters merged on
their weight deltas (:mod:`opdkit.merge`: mean, weighted or TIES), compressed to the student's
rank by truncated SVD when needed; without ``init`` (or with ``method: none``) the student starts
as the base (B = 0). ``init.sft`` then fine-tunes it on teacher samples (:func:`sft_cold_start`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError
from opdkit.prompts import load_prompts
from opdkit.recipe import dump_recipe
from opdkit.registry import models, regularizers, routers, teachers

if TYPE_CHECKING:
    import torch

    from opdkit.policy import Rollout
    from opdkit.recipe import InitSpec, LoadedRecipe, SftSpec, TeacherSpec

BASE = "base"


@dataclass
class Teacher:
    """A loaded teacher. ``adapter``: its LoRA adapter name on the shared base (kind ``lora``);
    ``transformer``: a separate transformer (kind ``full``); neither: the base (kind ``base``)."""

    name: str
    kind: str
    adapter: str | None = None
    transformer: Any = None
    lora_path: Path | None = None


def load_teachers(model: Any, specs: list[TeacherSpec], device: Any) -> dict[str, Teacher]:
    """Build every teacher plug-in and load its weights beside the student on the shared base."""
    from opdkit.models.lora import find_adapter

    loaded: dict[str, Teacher] = {}
    for spec in specs:
        source = teachers.build(spec.type, spec.builder_params())
        kind = getattr(source, "kind", None)
        if kind == "lora":
            path = _adapter_file(source.path, find_adapter)
            adapter = f"teacher_{spec.name}"
            model.load_lora(path, adapter)
            loaded[spec.name] = Teacher(spec.name, "lora", adapter=adapter, lora_path=path)
        elif kind == "full":
            from opdkit.models.loading import load_transformer

            # the teacher's transformer runs on the student's prompt embeddings: its text
            # encoders and VAE are never used, so they are not loaded
            transformer = load_transformer(source.path, dtype=model.dtype, device=device)
            transformer.eval().requires_grad_(False)
            loaded[spec.name] = Teacher(spec.name, "full", transformer=transformer)
        elif kind == "base":
            loaded[spec.name] = Teacher(spec.name, "base")
        else:
            raise OpdkitError(f"teacher {spec.name!r}: plug-in {spec.type!r} returned {source!r}, not a TeacherSource")
    return loaded


def _adapter_file(path: Path | None, find_adapter: Any) -> Path:
    """A GRPO run directory (its final adapter) or an adapter file."""
    if path is None:
        raise OpdkitError("a lora teacher needs a path (run directory or adapter file)")
    from opdkit.runs import final_lora_path, is_run_dir

    return final_lora_path(path) if is_run_dir(path) else find_adapter(path)


@contextlib.contextmanager
def acting_as(model: Any, teacher: Teacher | None, student_adapter: str) -> Iterator[None]:
    """Inside the block the model computes ``teacher`` (None or ``base``: the base model)."""
    if teacher is None or teacher.kind == "base":
        with model.adapters_disabled():
            yield
    elif teacher.kind == "lora":
        model.set_adapter(teacher.adapter)
        try:
            yield
        finally:
            model.set_adapter(student_adapter)  # peft makes the active adapter the trainable one
    else:
        student = model.transformer
        model.transformer = teacher.transformer
        try:
            yield
        finally:
            model.transformer = student


def cold_start(model: Any, trainable: Any, loaded: dict[str, Teacher], init: InitSpec, rank: int, alpha: float) -> float | None:
    """Initialise the student's adapter from the merged teacher deltas; returns the relative
    Frobenius error of the rank-``rank`` compression (0 when exact), None when nothing is merged."""
    import torch

    from opdkit.models.lora import read_lora
    from opdkit.models.merge import merge_loras
    from opdkit.policy import ADAPTER

    if init.method == "none":  # (InitSpec refuses method none with an adapter)
        return None  # no merge: the student adapter stays at B = 0
    if init.adapter is not None:
        from opdkit.models.lora import find_adapter

        sources = [read_lora(_adapter_file(Path(init.adapter).expanduser(), find_adapter))]
        method, weights = "mean", None
    else:
        chosen = init.teachers or [n for n, t in loaded.items() if t.kind == "lora"]
        missing = [n for n in chosen if n not in loaded or loaded[n].kind != "lora"]
        if missing or not chosen:
            raise OpdkitError(f"init: cannot merge {missing or 'no teachers'}: only LoRA teachers can be merged")
        sources = [read_lora(loaded[n].lora_path) for n in chosen]
        method, weights = init.method, init.weights
    exact = merge_loras(sources, method, weights, density=init.density) if method != "ties" else None
    if exact is not None and exact.rank == rank:
        merged = exact  # the concatenated factors fit the student's rank as they are
    else:  # compress (or, for TIES, factorize) to the student's rank by truncated SVD
        merged = merge_loras(sources, method, weights, rank=rank, density=init.density)
    exact = exact or merged
    scale = alpha / rank  # the student adapter multiplies B @ A by alpha / r
    errors, norms = 0.0, 0.0
    with torch.no_grad():
        for module, (a, b) in merged.factors.items():
            layer = model.transformer.get_submodule(module)
            layer.lora_A[ADAPTER].weight.copy_(a.to(layer.lora_A[ADAPTER].weight))
            layer.lora_B[ADAPTER].weight.copy_((b / scale).to(layer.lora_B[ADAPTER].weight))
            errors += float((merged.delta(module) - exact.delta(module)).pow(2).sum())
            norms += float(exact.delta(module).pow(2).sum())
    return math.sqrt(errors / norms) if norms > 0 else 0.0


def teacher_samples(
    model: Any, loaded: dict[str, Teacher], routes: list[str], cond: Any, seeds: list[int], sampler: Any, *, micro_batch: int
) -> torch.Tensor:
    """Image ``i`` drawn by teacher ``routes[i]`` from seed ``seeds[i]`` with the Euler sampler (the
    recipe's steps, CFG, shift and resolution), batched per teacher, no grad. (N, C, h, w) float32."""
    import torch

    from opdkit.policy import ADAPTER
    from opdkit.sampling import sample_ode

    x0: torch.Tensor | None = None
    for name, teacher in loaded.items():
        index = torch.tensor([i for i, r in enumerate(routes) if r == name], dtype=torch.long)
        for chunk in index.split(micro_batch) if len(index) else ():
            with torch.no_grad(), acting_as(model, teacher, ADAPTER):
                images = sample_ode(
                    model, steps=sampler.steps, cfg=sampler.cfg, shift=sampler.shift, resolution=sampler.resolution,
                    seed=[seeds[int(i)] for i in chunk], cond=cond[chunk],
                    uncond=model.uncond(len(chunk)) if sampler.cfg != 1.0 else None,
                )  # fmt: skip
            if x0 is None:
                x0 = torch.empty((len(routes), *images.shape[1:]), dtype=images.dtype, device=images.device)
            x0[chunk] = images
    if x0 is None:
        raise OpdkitError("init.sft: no prompt was routed to a teacher")
    return x0


def sft_cold_start(
    model: Any,
    trainable: Any,
    loaded: dict[str, Teacher],
    route: Any,
    records: list[dict[str, Any]],
    sft: SftSpec,
    sampler: Any,
    *,
    seed: int,
    balance_tags: bool,
    show_progress: bool = False,
) -> dict[str, float]:
    """Fine-tune the student adapter on images its routed teachers draw (cold start by SFT).

    ``sft.samples`` prompts are drawn from ``records`` as step 0 of the run would (training steps
    start at 1), each routed to its teacher; every teacher draws its images with the Euler sampler
    (the recipe's steps, CFG and resolution), one batched pass per teacher. The student then takes
    ``sft.steps`` flow-matching steps (:func:`opdkit.pretrain.flow_matching_loss`) on random
    batches of those images (``sft.cond_dropout`` of them with the empty prompt, so CFG's
    unconditional branch moves with the conditional one), with its own AdamW, which OPD does not
    inherit. Every rank does the same (same seeds), so the ranks start OPD from the same weights.

    Returns ``{"sft_loss_first", "sft_loss_last", "sft_seconds"}`` (mean loss of the first and
    last 10 steps).
    """
    import numpy as np
    import torch

    from opdkit import policy
    from opdkit.progress import progress_bar

    t0 = time.perf_counter()
    drawn = policy.step_prompts(records, seed=seed, step=0, batch_size=sft.samples, group_size=1, balance_tags=balance_tags)
    routes = route(drawn.records, list(loaded))
    cond = policy.encode_unique(model, [r["prompt"] for r in drawn.records])
    x0 = teacher_samples(model, loaded, routes, cond, drawn.seeds, sampler, micro_batch=sft.batch_size)
    params = trainable.params
    optimizer = torch.optim.AdamW(params, lr=sft.lr)
    rng = np.random.default_rng([seed, 0])
    losses: list[float] = []
    model.transformer.train()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress_bar("init.sft", total=sft.steps)) if show_progress else None
        for k in range(1, sft.steps + 1):
            losses.append(_sft_step(model, x0, cond, rng, optimizer, params, sft))
            if bar is not None:
                bar.update(k, loss=losses[-1])
    optimizer.zero_grad(set_to_none=True)
    model.transformer.eval()
    return {
        "sft_loss_first": sum(losses[:10]) / len(losses[:10]),
        "sft_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "sft_seconds": round(time.perf_counter() - t0, 3),
    }


def _sft_step(model: Any, x0: torch.Tensor, cond: Any, rng: Any, optimizer: Any, params: list[Any], sft: SftSpec) -> float:
    """One flow-matching step of the student on a random batch of teacher images; its loss."""
    import torch

    from opdkit.pretrain import flow_matching_loss

    rows = torch.from_numpy(rng.permutation(len(x0))[: sft.batch_size])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    step_cond = cond[rows]
    if sft.cond_dropout > 0:  # these rows learn the teacher's image from the empty prompt
        drop = torch.from_numpy(rng.random(len(rows)) < sft.cond_dropout).to(step_cond.prompt_embeds.device)
        empty = model.uncond(len(rows))
        step_cond = type(step_cond)(
            torch.where(drop.view(-1, 1, 1), empty.prompt_embeds, step_cond.prompt_embeds),
            torch.where(drop.view(-1, 1), empty.pooled, step_cond.pooled),
        )
    loss = flow_matching_loss(model, x0[rows], step_cond, gen, model.shift)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sft.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
    optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise OpdkitError(f"init.sft: loss became {value}; lower init.sft.lr")
    return value


def frozen_means(model: Any, batch: Rollout, teacher: Teacher | None, t: int, index: torch.Tensor) -> torch.Tensor:
    """Transition means of ``teacher`` (None: the base) at stored states ``batch.states[t, index]``.

    One CFG-batched forward, no grad. Returns (len(index), C, h, w) float32.
    """
    import torch

    from opdkit.policy import ADAPTER
    from opdkit.sampling import guided_velocity, sde_step_with_logprob

    with torch.no_grad():
        x = batch.states[t, index]
        uncond = model.uncond(len(index)) if batch.cfg != 1.0 else None
        with acting_as(model, teacher, ADAPTER):
            v = guided_velocity(model, x, batch.sigmas[t], batch.cond[index], uncond, batch.cfg)
        step = sde_step_with_logprob(
            x, v, batch.sigmas[t], batch.sigmas[t + 1], batch.noise_level, prev_sample=batch.states[t + 1, index]
        )
    return step.mean.float()


def routed_teacher_means(
    model: Any, batch: Rollout, t: int, rows: slice, routes: list[str], loaded_teachers: dict[str, Teacher]
) -> torch.Tensor:
    """mu_teacher(x_t) for rows ``rows``, each row from its routed teacher: one batched forward per
    teacher over the rows routed to it (adapters switched per sub-batch). (n, C, h, w) float32."""
    import torch

    out = torch.empty(batch.states[t, rows].shape, dtype=torch.float32, device=batch.states.device)
    for name, teacher in loaded_teachers.items():
        index = torch.tensor([i for i in range(rows.start, rows.stop) if routes[i] == name], dtype=torch.long)
        if len(index):
            out[index - rows.start] = frozen_means(model, batch, teacher, t, index)
    return out


def run(loaded: LoadedRecipe, out_dir: str | Path, resume: bool = False) -> Path:
    """Distil with Flow-OPD; returns the directory of the final weights (``<out_dir>/final``)."""
    import torch
    from accelerate import Accelerator

    from opdkit import policy
    from opdkit.progress import progress_bar

    recipe = loaded.recipe
    train, sampler = recipe.train, recipe.sampler
    if train.loss_mode == "mixed" and not recipe.rewards:
        raise OpdkitError(f"{loaded.path}: train.loss_mode mixed needs 'rewards' (the task reward)")
    torch.manual_seed(train.seed)
    model = models.build(recipe.model.type, recipe.model.builder_params())
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device

    rundir = policy.open_run_dir(out_dir, dump_recipe(recipe), resume=resume, accelerator=accelerator)

    # -- student, teachers, router, anchors -------------------------------------------------------
    model.to(device=device)
    loaded_teachers = load_teachers(model, recipe.teachers, device)
    torch.manual_seed(train.seed)
    trainable = policy.setup_trainable(model, train.lora, train.gradient_checkpointing)  # adds and activates the student adapter
    if not trainable.lora and any(t.kind == "lora" for t in loaded_teachers.values()):
        raise OpdkitError(f"{loaded.path}: LoRA teachers share the base with a LoRA student; set train.lora")
    init_error = None
    if recipe.init is not None:
        assert train.lora is not None
        init_error = cold_start(model, trainable, loaded_teachers, recipe.init, train.lora.rank, train.lora.alpha)
    assert recipe.router is not None
    route = routers.build(recipe.router.type, recipe.router.params)
    teacher_names = list(loaded_teachers)
    records = load_prompts(recipe.prompts)
    sft_stats: dict[str, float] = {}
    if recipe.init is not None and recipe.init.sft is not None and not (resume and rundir.latest() is not None):
        sft_stats = sft_cold_start(
            model, trainable, loaded_teachers, route, records, recipe.init.sft, sampler,
            seed=train.seed, balance_tags=recipe.prompts.balance_tags, show_progress=main,
        )  # fmt: skip
    anchors: list[tuple[str, float, Teacher | None]] = []
    for spec in recipe.regularizers:
        anchor = regularizers.build(spec.type, spec.params).anchor
        if anchor != BASE and anchor not in loaded_teachers:
            raise OpdkitError(f"{loaded.path}: regularizer {spec.type!r} anchors to {anchor!r}, which is not a teacher")
        anchors.append((f"{spec.type}:{anchor}", spec.weight, loaded_teachers.get(anchor)))
    reward_fn = policy.WeightedReward(recipe.rewards) if recipe.rewards else None

    params = trainable.params
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    ema = policy.EMA(trainable.names, params, train.ema.decay, train.ema.every) if train.ema else None
    group = train.group_size
    local_images = train.batch_size // world * group if train.batch_size % world == 0 else 0
    micro = train.micro_batch or local_images
    if local_images == 0 or local_images % micro:
        raise OpdkitError(
            f"{loaded.path}: train.batch_size ({train.batch_size}) must divide by {world} processes and "
            f"train.micro_batch ({micro}) must divide {train.batch_size // max(world, 1) * group} images"
        )
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
        bar = stack.enter_context(progress_bar(f"opd {loaded.path.stem}", total=train.max_steps, completed=start)) if main else None
        if board is not None:
            stack.callback(board.close)
        while step < train.max_steps:
            step += 1
            t_step = time.perf_counter()
            drawn = policy.step_prompts(
                records, seed=train.seed, step=step, batch_size=train.batch_size, group_size=group,
                rank=rank, world_size=world, balance_tags=recipe.prompts.balance_tags,
            )  # fmt: skip
            model.transformer.eval()
            batch = policy.rollout(
                model, drawn.records, drawn.seeds, steps=sampler.steps, cfg=sampler.cfg,
                noise_level=sampler.noise_level, resolution=sampler.resolution, shift=sampler.shift,
                window=window, micro_batch=micro, decode=reward_fn is not None or bool(train.sample_every),
                noise_seeds=policy.shared_noise_seeds(drawn.seeds, group) if sampler.shared_initial_noise else None,
                logprob_pool=sampler.logprob_pool,
            )  # fmt: skip
            routes = route(batch.records, teacher_names)
            t_rollout = time.perf_counter()

            task_adv = None
            scores = None
            if reward_fn is not None:
                scores = reward_fn(batch.images, batch.prompts, batch.records)
                all_rewards = accelerator.gather(scores.total.to(device)).cpu()
                if train.loss_mode == "mixed":
                    adv_all = policy.group_advantages(all_rewards, group, train.adv_std, train.adv_clip)
                    task_adv = adv_all[rank * local_images : (rank + 1) * local_images].to(device)

            lr = policy.scheduled_lr(train, step)
            stats = distill_update(
                model, batch, routes, loaded_teachers, anchors, task_adv, trainable, optimizer, ema, train,
                world=world, lr=lr, optimizer_steps=optimizer_steps,
            )  # fmt: skip
            optimizer_steps = stats.pop("optimizer_steps")
            t_update = time.perf_counter()

            elapsed = elapsed_before + time.perf_counter() - t0
            record = _metrics(step, lr, stats, routes, teacher_names, accelerator, device)
            if scores is not None:
                for name, values in scores.parts.items():
                    values = accelerator.gather(values.to(device)).cpu()
                    record[f"reward/{name}/mean"] = policy.summarize(values)["mean"]
                record["reward"] = float(all_rewards.mean())
            if init_error is not None and step == 1:
                record["init_merge_rel_error"] = init_error
            if step == 1:
                record.update(sft_stats)
            record.update(
                rollout_seconds=round(t_rollout - t_step, 3), update_seconds=round(t_update - t_rollout, 3),
                seconds=round(elapsed, 3),
            )  # fmt: skip
            if not math.isfinite(record["loss"]):
                raise OpdkitError(f"{loaded.path}: loss became {record['loss']} at step {step}; lower train.lr")
            grid_scores = scores.total if scores is not None else -stats["kl_teacher_per_image"]
            if policy.end_of_step(
                step, record, elapsed, train=train, accelerator=accelerator, rundir=rundir, board=board, bar=bar,
                rank_log=rank_log, drawn=drawn, save=save, grid=(batch, grid_scores, group),
                bar_fields={"kl": record["kl"], "loss": record["loss"]},
            ):  # fmt: skip
                break

    return policy.finish_run(model, trainable, ema, rundir, step, accelerator, rank_log)


def distill_update(
    model: Any,
    batch: Rollout,
    routes: list[str],
    loaded_teachers: dict[str, Teacher],
    anchors: list[tuple[str, float, Teacher | None]],
    task_adv: torch.Tensor | None,
    trainable: Any,
    optimizer: torch.optim.Optimizer,
    ema: Any,
    train: Any,
    *,
    world: int,
    lr: float,
    optimizer_steps: int,
) -> dict[str, Any]:
    """``inner_epochs`` passes of distillation updates over one rollout (this rank's rows).

    Teacher and anchor means are computed once per (micro-batch, step) with no grad and reused
    across inner epochs (they do not depend on the student). Returns per-sample statistics as 1-D
    tensors plus ``kl_teacher_per_image`` (N,) and the new ``optimizer_steps``.
    """
    import torch

    from opdkit import policy

    for g in optimizer.param_groups:
        g["lr"] = lr
    params = trainable.params
    chunks = batch.chunks()
    steps = batch.trained_steps
    n = len(batch)

    targets: dict[tuple[int, int], torch.Tensor] = {}
    anchor_targets: dict[tuple[int, int, int], torch.Tensor] = {}

    def teacher_target(c: int, t: int, rows: slice) -> torch.Tensor:
        if (c, t) not in targets:
            targets[(c, t)] = routed_teacher_means(model, batch, t, rows, routes, loaded_teachers)
        return targets[(c, t)]

    sampled: dict[tuple[int, int], torch.Tensor] = {}

    def sampled_estimate(c: int, t: int, rows: slice, std: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        # log pi_old - log pi_teacher at the drawn next state: fixed per rollout, like pi_old
        if (c, t) not in sampled:
            sampled[(c, t)] = policy.sampled_kl(
                batch.log_probs[t, rows], batch.states[t + 1, rows], teacher_target(c, t, rows), std.detach(), dt,
                train.kl_scaling, batch.logprob_pool,
            )  # fmt: skip
        return sampled[(c, t)]

    kl_per_image = torch.zeros(n)
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("kl", "loss", "ratio", "clipped", "ratio_first")}
    anchor_kls: dict[str, list[torch.Tensor]] = {label: [] for label, _, _ in anchors}
    norms: list[torch.Tensor] = []
    updates = math.ceil(len(chunks) / train.grad_accum)
    first_done = False
    model.transformer.train()
    for _epoch in range(train.inner_epochs):
        for u in range(updates):
            members = list(range(u * train.grad_accum, min((u + 1) * train.grad_accum, len(chunks))))
            weight = 1.0 / (len(members) * len(steps))
            update_ratios = []
            for c in members:
                rows = chunks[c]
                for t in steps:
                    new = policy.transition(model, batch, t, rows)
                    dt = batch.sigmas[t + 1] - batch.sigmas[t]
                    kl = policy.gaussian_kl(new.mean, teacher_target(c, t, rows), new.std, dt, train.kl_scaling)
                    if train.loss_mode == "direct":
                        loss = kl
                        ratio = torch.exp(new.log_prob.detach() - batch.log_probs[t, rows])
                    else:
                        if train.kl_advantage == "sampled":
                            adv = -sampled_estimate(c, t, rows, new.std, dt)
                        else:
                            adv = -kl if not train.detach_kl else -kl.detach()
                        adv = adv.clamp(-train.adv_clip, train.adv_clip)
                        if task_adv is not None:
                            adv = adv + task_adv[rows]
                        loss, ratio = policy.clipped_policy_loss(
                            new.log_prob, batch.log_probs[t, rows], adv, train.clip_range, detach_advantages=train.detach_kl
                        )
                    for a, (label, lam, anchor) in enumerate(anchors):
                        key = (c, t, a)
                        if key not in anchor_targets:
                            anchor_targets[key] = frozen_means(model, batch, anchor, t, torch.arange(rows.start, rows.stop))
                        kl_anchor = policy.gaussian_kl(new.mean, anchor_targets[key], new.std, dt, train.kl_scaling)
                        loss = loss + lam * kl_anchor
                        anchor_kls[label].append(kl_anchor.detach())
                    (loss.mean() * weight).backward()
                    stats["kl"].append(kl.detach())
                    stats["loss"].append(loss.detach())
                    stats["ratio"].append(ratio.detach())
                    stats["clipped"].append(((ratio.detach() - 1.0).abs() > train.clip_range).float())
                    update_ratios.append(ratio.detach())
                    if _epoch == 0:
                        kl_per_image[rows] += kl.detach().cpu() / len(steps)
            if not first_done:
                stats["ratio_first"] = update_ratios
                first_done = True
            policy.average_gradients(params, world)
            if train.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            else:
                norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
            norms.append(norm.detach().reshape(1).float())
            if ema is not None:
                ema.update(params, optimizer_steps)
    model.transformer.eval()

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x.float().cpu().reshape(-1) for x in xs]) if xs else torch.zeros(0)

    out: dict[str, Any] = {k: cat(v) for k, v in stats.items()}
    out.update({f"kl_anchor/{label}": cat(v) for label, v in anchor_kls.items()})
    out["grad_norm"] = cat(norms)
    out["kl_teacher_per_image"] = kl_per_image
    out["optimizer_steps"] = optimizer_steps
    return out


def _metrics(
    step: int, lr: float, stats: dict[str, Any], routes: list[str], names: list[str], accelerator: Any, device: Any
) -> dict[str, Any]:
    """One ``metrics.jsonl`` record, gathered over ranks: KL overall and per teacher, routing counts."""
    import torch

    def gather(values: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(values.to(device)).cpu() if accelerator.num_processes > 1 else values

    per_image = gather(stats["kl_teacher_per_image"])
    route_ids = gather(torch.tensor([names.index(r) for r in routes]))
    record: dict[str, Any] = {
        "step": step,
        "kl": float(gather(stats["kl"]).mean()),
        "loss": float(gather(stats["loss"]).mean()),
        "ratio_mean": float(gather(stats["ratio"]).mean()),
        "ratio_min": float(gather(stats["ratio"]).min()),
        "ratio_max": float(gather(stats["ratio"]).max()),
        "ratio_first_max_dev": float((gather(stats["ratio_first"]) - 1.0).abs().max()) if stats["ratio_first"].numel() else 0.0,
        "clip_frac": float(gather(stats["clipped"]).mean()),
        "grad_norm": float(stats["grad_norm"].mean()),
        "lr": lr,
    }
    for i, name in enumerate(names):
        mine = route_ids == i
        record[f"routed/{name}"] = int(mine.sum())
        record[f"kl/{name}"] = float(per_image[mine].mean()) if bool(mine.any()) else None
    for key, values in stats.items():
        if key.startswith("kl_anchor/"):
            record[key] = float(gather(values).mean()) if values.numel() else None
    return record
