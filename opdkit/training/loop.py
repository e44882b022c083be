"""The one training loop (over 500 lines: everything a method must not repeat lives here, in functions under 80 lines).

Every method (pretrain, GRPO, OPD) runs on it; none has a loop of its own.

What the loop owns, written once:

* **set-up**: the seed, the base model, accelerate (data parallel; on a machine without CUDA the
  processes talk gloo), the run directory (refused if it holds a run unless resuming, locked
  while a process trains in it);
  ``train.fsdp`` shards the trained modules over the processes (:mod:`opdkit.training.fsdp`);
* **precision**: ``train.precision`` bf16/fp16 autocasts the forward passes where the device
  supports it, fp16 with a gradient scaler; fp32 master weights always (:func:`autocast_dtype`);
* **optimisation** (:class:`Optimization`): backward through the scaler, gradients averaged over
  processes (by hand, or by FSDP's reduce-scatter), clipped by their global norm, AdamW, the EMA
  after each optimizer step; the learning-rate schedule;
* **bookkeeping**: checkpoint and resume (weights, optimizer, EMA, counters), ``metrics.jsonl``,
  TensorBoard, sample grids, the progress bar, the time budget (``train.max_minutes``, decided by
  rank 0 for everyone), a divergence check;
* **the end**: the method's final weights, then the recipe's ``eval`` benchmarks on the main
  process only, into ``<run>/results/step_<N>/``.

A method (:class:`Method`) says what it sets up, what one step does (make a batch, compute a
loss, call :meth:`Optimization.backward` and :meth:`Optimization.step`) and what it saves. Step
``k``'s randomness is seeded by ``(train.seed, k)`` (its prompts, noises, and torch's global RNG
for what draws from it, such as LoRA dropout), so a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from opdkit.errors import OpdkitError
from opdkit.rundir import (
    LOCK_FILE,
    TRAINING_HOLDER,
    RunDir,
    append_jsonl,
    check_out_folder,
    folder_lock,
    read_jsonl,
    rewrite_jsonl,
)
from opdkit.training import fsdp
from opdkit.training.trainable import EMA, parameters_sha256

if TYPE_CHECKING:
    from opdkit.recipe import LoadedRecipe


@dataclass
class RunContext:
    """What a method sees of the run: the recipe, the model, the processes, the run folder.

    ``resuming`` is True when a checkpoint will be restored after :meth:`Method.setup`: work
    done once per run (a cold start) must not be redone then.
    """

    loaded: LoadedRecipe
    model: Any
    accelerator: Any
    rundir: RunDir
    resuming: bool
    precision: torch.dtype | None = None  # autocast dtype, None for fp32

    @property
    def recipe(self) -> Any:
        return self.loaded.recipe

    @property
    def train(self) -> Any:
        return self.loaded.recipe.train

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward passes' precision context (a no-op in fp32)."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.precision)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every process concatenated (rank order), on the CPU."""
        if self.world == 1 or values.numel() == 0:
            return values.cpu()
        return self.accelerator.gather(values.to(self.device)).cpu()


@dataclass
class Setup:
    """What a method trains. ``modules`` are checkpointed by name (their parameters that require
    grad); ``names`` and ``params`` are what the optimizer and the EMA see, aligned. ``frozen``:
    modules the steps run without grad on every process alike (the reference copy), sharded with
    the trained ones under ``train.fsdp``, which also refills ``params`` in place."""

    modules: dict[str, torch.nn.Module]
    names: list[str]
    params: list[torch.nn.Parameter]
    frozen: list[torch.nn.Module] = field(default_factory=list)


@dataclass
class StepResult:
    """One step's outcome. ``record``: its metrics (a ``loss`` key is required; the loop adds
    ``step``, ``lr`` and ``seconds``); ``bar``: the values the progress bar shows; ``drawn``: the
    prompts and seeds of this rank (logged per rank under data parallelism); ``grid``: writes a
    sample grid to the path given, called on ``train.sample_every`` steps."""

    record: dict[str, Any]
    bar: dict[str, float]
    drawn: Any = None
    grid: Callable[[Path], None] | None = None


class Method(Protocol):
    """A training method: one short file under :mod:`opdkit.methods`."""

    name: str

    def setup(self, ctx: RunContext) -> Setup:
        """Make the model trainable and load what the steps need (teachers, rewards, prompts)."""
        ...

    def step(self, step: int, ctx: RunContext, optim: Optimization) -> StepResult:
        """One training step: batch, loss, backward, optimizer step(s)."""
        ...

    def finish(self, ctx: RunContext, optim: Optimization, step: int) -> Path:
        """Write the final weights (main process) and return the folder to evaluate."""
        ...


# ----------------------------------------------------------------------------------------------
# precision and optimisation


def autocast_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the loop autocasts to ``dtype`` on ``device``: CUDA only. On a CPU autocast is slow
    and makes the PPO ratio drift from 1 (flow_grpo issue #104), so the run stays in fp32."""
    return device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.is_bf16_supported())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``; None (fp32) with a warning where
    it is not supported. Master weights and every SDE/log-prob computation stay fp32."""
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not autocast_supported(device, dtype):
        warnings.warn(f"train.precision {precision} is not supported on {device}; training in fp32", stacklevel=2)
        return None
    return dtype


def average_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` across processes, in one flat buffer.

    Every rank then holds the same gradient, so identical optimizers keep identical weights
    without wrapping the model in DDP. A parameter without a gradient counts as zero.
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


@dataclass
class Optimization:
    """The optimizer side of a step, the same for every method.

    :meth:`backward` accumulates a loss's gradient (scaled for fp16); :meth:`step` averages the
    gradients over processes, unscales and clips them (``train.max_grad_norm``), steps AdamW,
    clears the gradients and folds the weights into the EMA. ``steps`` counts optimizer steps
    over the whole run (GRPO and OPD take several per training step). ``sharded``: the
    parameters are FSDP shards, whose backward has averaged the gradients already.
    """

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Any
    ema: EMA | None
    max_grad_norm: float | None
    world: int
    steps: int = 0
    sharded: bool = False

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the gradient norm before clipping, shape (1,)."""
        if not self.sharded:
            average_gradients(self.params, self.world)
        self.scaler.unscale_(self.optimizer)
        if self.sharded:  # the norm over every process's shards
            norm = fsdp.gradient_norm(self.params, self.max_grad_norm)
        elif self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # fp16: a gradient with inf/nan skips AdamW and lowers the scale; the weights did not move,
        # so the EMA and its cadence do not either
        if scale is None or self.scaler.get_scale() >= scale:
            self.steps += 1
            if self.ema is not None:
                self.ema.update(self.params, self.steps)
        return norm.detach().reshape(1).float()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


# Trained weights beyond this have diverged (LoRA factors are ~1e-2, full weights ~1).
MAX_ABS_WEIGHT = 1e4


def check_weights(
    params: Sequence[torch.Tensor], step: int, lr: float, where: Any, sharded: torch.device | None = None
) -> None:
    """Stop a run whose trained weights became non-finite or absurdly large, naming the step.
    ``sharded``: the device of FSDP-sharded ``params`` (every process then checks every shard)."""
    with torch.no_grad():  # one device sync, not one per tensor
        if sharded is not None:
            largest = fsdp.largest_abs(params, sharded)
        else:
            maxima = [p.detach().abs().max().float() for p in params if p.numel()]
            largest = float(torch.stack(maxima).max()) if maxima else 0.0
    if not math.isfinite(largest) or largest > MAX_ABS_WEIGHT:
        raise OpdkitError(
            f"{where}: the trained weights diverged at step {step} (max |w| {largest:.3g}); lower train.lr "
            f"(now {lr:g}) or set train.max_grad_norm"
        )


def seed_global_rng(seed: int, step: int) -> None:
    """Seed torch's global RNG (every device) for step ``step`` of a run seeded ``seed``.

    Rollouts draw their noise from their own generators; what still draws from the global RNG
    (LoRA dropout) would otherwise continue from wherever the process's earlier draws left it,
    which a resumed run cannot repeat.
    """
    import numpy as np

    torch.manual_seed(int(np.random.SeedSequence([seed, step, 0x6C6F6F70]).generate_state(1)[0]))


def scheduled_lr(train: Any, step: int) -> float:
    """The learning rate of (1-based) ``step``: a linear warm-up over ``train.warmup_steps``, then
    ``train.lr`` held (``lr_decay: constant``) or falling to 0 at ``train.lr_decay_steps``
    (default ``train.max_steps``) along a cosine (``lr_decay: cosine``)."""
    if train.lr_decay == "cosine" and step > train.warmup_steps:
        horizon = train.lr_decay_steps or train.max_steps
        done = (step - train.warmup_steps) / max(1, horizon - train.warmup_steps)
        return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return train.lr * (min(1.0, step / train.warmup_steps) if train.warmup_steps else 1.0)


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
# the loop


def run(
    method: Method, loaded: LoadedRecipe, out_dir: str | Path, *, resume: bool = False, evaluate: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train ``loaded`` with ``method`` into ``out_dir``; returns the folder of the final model.

    The folder is locked from before its checks until the run and its eval end, so a second
    training into it (the same command twice, a ``--resume`` while the first still runs, an
    ``--overwrite``) is refused at once instead of interleaving its files with this run's.
    """
    with run_lock(Path(out_dir)):
        return _run(method, loaded, out_dir, resume=resume, evaluate=evaluate, overwrite=overwrite)


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` (creating ``root``) in the main process: global rank 0, by ``RANK``,
    read before the process group exists; the other ranks of a distributed run share the folder."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    check_out_folder(root)
    created = [folder for folder in [root, *root.parents] if not folder.exists()]  # innermost first
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(root, TRAINING_HOLDER, "wait for it to finish, or pass another --out"):
        try:
            yield
        except BaseException:
            # a run refused or failed before it wrote anything leaves no folder behind
            if created and [p.name for p in root.iterdir()] == [LOCK_FILE]:
                (root / LOCK_FILE).unlink()
                # up to the first folder another run has written to meanwhile, which stays; an
                # OSError here must not hide the run's own error
                with contextlib.suppress(OSError):
                    for folder in created:
                        folder.rmdir()
            raise


def _run(
    method: Method, loaded: LoadedRecipe, out_dir: str | Path, *, resume: bool, evaluate: bool, overwrite: bool
) -> Path:
    from accelerate import Accelerator

    from opdkit.registry import models

    recipe, train = loaded.recipe, loaded.recipe.train
    # The model is built before the process group exists: transformers' save_pretrained (which
    # builders such as shapes_new use) writes only on rank 0 once torch.distributed is up.
    torch.manual_seed(train.seed)
    model = models.build(recipe.model.type, recipe.model.builder_params())
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rundir = open_run_dir(out_dir, recipe, model, resume=resume, overwrite=overwrite, accelerator=accelerator)
    model.to(device=accelerator.device)
    ctx = RunContext(loaded, model, accelerator, rundir, resuming=resume and rundir.latest() is not None)
    ctx.precision = autocast_dtype(train.precision, ctx.device)

    setup = method.setup(ctx)
    sharded = fsdp.wanted(train, ctx.world)
    if sharded:  # before the optimizer and the EMA see the parameters
        fsdp.shard(setup, ctx.device)
    optimizer = torch.optim.AdamW(setup.params, lr=train.lr, weight_decay=train.weight_decay)
    ema = EMA(setup.names, setup.params, train.ema.decay, train.ema.every, train.ema.warmup) if train.ema else None
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == torch.float16)
    optim = Optimization(setup.params, optimizer, scaler, ema, train.max_grad_norm, ctx.world, sharded=sharded)
    start, elapsed_before = restore(ctx, setup, optim, resume=resume)
    rank_log = rundir.root / "ranks" / f"rank_{ctx.rank}.jsonl" if ctx.world > 1 else None
    if rank_log is not None:
        rewrite_jsonl(rank_log, [r for r in read_jsonl(rank_log) if int(r.get("step", 0)) <= start and "weights_sha256" not in r])

    step = _train_steps(method, ctx, setup, optim, start, elapsed_before, rank_log)

    final = method.finish(ctx, optim, step)
    if rank_log is not None:  # of the full weights (gathered where sharded)
        weights = fsdp.gathered(dict(zip(setup.names, setup.params, strict=True)))
        append_jsonl(rank_log, {"step": step, "weights_sha256": parameters_sha256(list(weights.values()))})
    accelerator.wait_for_everyone()
    if evaluate and recipe.eval.benchmarks and ctx.main:
        from opdkit.runs import is_run_dir

        # a run folder with final/ loads as a model (base + adapter); pretraining writes a pipeline
        evaluate_run(rundir.root if is_run_dir(rundir.root) else final, rundir, step, recipe.eval)
    # The other ranks do not wait for rank 0's eval: at SD3.5-M's size it outlasts the process
    # group's timeout (NCCL's default is 10 minutes), whose watchdog would abort the waiting ranks
    # and the launcher then rank 0's eval. Nothing after this point is collective.
    return final


def _train_steps(
    method: Method, ctx: RunContext, setup: Setup, optim: Optimization, start: int, elapsed_before: float,
    rank_log: Path | None,
) -> int:  # fmt: skip
    """Steps ``start + 1 .. train.max_steps`` (or until the time budget); returns the last step."""
    from opdkit.progress import progress_bar

    train, loaded = ctx.train, ctx.loaded
    board = TensorBoardLog(ctx.rundir.root / "tensorboard", purge_step=start + 1) if ctx.main else None
    t0 = time.perf_counter()
    step = start
    with contextlib.ExitStack() as stack:
        label = f"{method.name} {loaded.path.stem}"
        bar = stack.enter_context(progress_bar(label, total=train.max_steps, completed=start)) if ctx.main else None
        if board is not None:
            stack.callback(board.close)
        while step < train.max_steps:
            step += 1
            lr = scheduled_lr(train, step)
            optim.set_lr(lr)
            seed_global_rng(train.seed, step)
            result = method.step(step, ctx, optim)
            elapsed = elapsed_before + time.perf_counter() - t0
            record = {"step": step, **result.record, "lr": lr, "seconds": round(elapsed, 3)}
            if not math.isfinite(record["loss"]):
                raise OpdkitError(f"{loaded.path}: loss became {record['loss']} at step {step}; lower train.lr")
            check_weights(setup.params, step, train.lr, loaded.path, ctx.device if optim.sharded else None)
            if rank_log is not None and result.drawn is not None:
                append_jsonl(rank_log, {"step": step, "prompt_indices": result.drawn.indices, "seeds": result.drawn.seeds})
            if ctx.main:
                if step % train.log_every == 0 or step == train.max_steps:
                    ctx.rundir.log(record)
                    assert board is not None
                    board.log(record, step)
                sample_every = getattr(train, "sample_every", 0)
                if result.grid is not None and sample_every and step % sample_every == 0:
                    result.grid(ctx.rundir.samples / f"step_{step:06d}.png")
                assert bar is not None
                bar.update(step, **result.bar)
            stop = out_of_time(ctx.accelerator, train.max_minutes, elapsed)
            if step % train.checkpoint_every == 0 or step == train.max_steps or stop:
                save_checkpoint(ctx, setup, optim, step=step, elapsed=elapsed)
            if stop:
                if step < train.max_steps:
                    # said aloud: a run ended by the clock ends at a step that depends on the machine's speed
                    warnings.warn(f"{loaded.path}: train.max_minutes ({train.max_minutes:g}) spent at step {step} of "
                                  f"{train.max_steps}; the run ends there", stacklevel=1)  # fmt: skip
                break
    return step


# ----------------------------------------------------------------------------------------------
# run folder: open, checkpoint, restore, evaluate


def open_run_dir(out_dir: str | Path, recipe: Any, model: Any, *, resume: bool, overwrite: bool, accelerator: Any) -> RunDir:
    """The run folder, after every check that keeps runs apart (:meth:`RunDir.check_start`: a
    folder holding a run is refused unless resuming or ``overwrite``; a resumed run must keep its
    recipe, but for the keys that extend it, and its base weights).

    Every rank checks (so every rank stops, not only the one that writes); rank 0 writes.
    """
    from opdkit.recipe import dump_recipe
    from opdkit.training.teachers import teacher_weights

    rundir = RunDir(out_dir)
    resolved = recipe.model_dump(mode="json")
    base = model.base_fingerprint() if hasattr(model, "base_fingerprint") else "unknown"
    specs = getattr(recipe, "teachers", None) or []
    entry = rundir.check_start(
        resolved, base, resume=resume, overwrite=overwrite, read_recipe=_legacy_recipe,
        teachers=lambda: teacher_weights(specs),
    )  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rundir.prepare(dump_recipe(recipe), resume, recipe=resolved, entry=entry, overwrite=overwrite)
    accelerator.wait_for_everyone()
    return rundir


def _legacy_recipe(path: Path) -> dict[str, Any]:
    """The resolved recipe of a run made before ``run.json`` existed, in today's schema."""
    import yaml

    from opdkit.recipe import parse_recipe

    try:
        return parse_recipe(yaml.safe_load(path.read_text(encoding="utf-8")), lenient=True).model_dump(mode="json")
    except Exception as exc:  # an unreadable recipe cannot be checked, so the run is not resumed
        raise OpdkitError(f"{path}: cannot read the run's recipe to check --resume ({type(exc).__name__})") from None


def save_checkpoint(ctx: RunContext, setup: Setup, optim: Optimization, *, step: int, elapsed: float) -> None:
    """Rank 0 writes a complete checkpoint (weights, optimizer, EMA, counters) atomically; all ranks
    sync. Sharded, every rank first helps gather the full state: the files do not depend on the
    number of processes, so a run resumes on any."""
    from opdkit.checkpoint import trainable_state_dict, write_training_state

    if not (ctx.main or optim.sharded):
        ctx.accelerator.wait_for_everyone()
        return
    if optim.sharded:
        weights, optimizer_state = fsdp.full_training_state(setup.modules, optim.optimizer)
    else:
        weights = {name: trainable_state_dict(module) for name, module in setup.modules.items()}
        optimizer_state = optim.optimizer.state_dict()
    ema = fsdp.gathered(optim.ema.state_dict()) if optim.ema is not None else None
    if ctx.main:
        write_training_state(
            ctx.rundir.checkpoint_dir(step), weights, optimizer_state,
            {"step": step, "elapsed_s": elapsed, "optimizer_steps": optim.steps,
             **({"grad_scaler": optim.scaler.state_dict()} if optim.scaler.is_enabled() else {})},
            extra_tensors={"ema": ema} if ema is not None else None,
        )  # fmt: skip
        ctx.rundir.commit_checkpoint(step, keep=ctx.train.keep_checkpoints)
    ctx.accelerator.wait_for_everyone()


def restore(ctx: RunContext, setup: Setup, optim: Optimization, *, resume: bool) -> tuple[int, float]:
    """Load the last checkpoint when resuming and cut the metrics back to its step, so that a
    resumed run appends exactly what an uninterrupted one would have written. Returns (step,
    elapsed seconds); (0, 0.0) for a fresh run."""
    from opdkit.checkpoint import load_training_state, read_training_state

    latest = ctx.rundir.latest()
    if not (resume and latest is not None):
        if resume and ctx.main:  # killed before its first checkpoint: start over, metrics too
            ctx.rundir.truncate_metrics(0)
        return 0, 0.0
    if optim.sharded:  # every rank reads the full state and keeps its shard
        weights, optimizer_state, state = read_training_state(latest[1], setup.modules, with_optimizer=True)
        fsdp.load_full_training_state(setup.modules, weights, optim.optimizer, optimizer_state)
    else:
        state = load_training_state(latest[1], setup.modules, optim.optimizer)
    step = int(state["step"])
    # checkpoints of one optimizer step per training step may predate the counter
    optim.steps = int(state.get("optimizer_steps", step))
    if optim.scaler.is_enabled() and isinstance(state.get("grad_scaler"), dict):  # fp16's loss scale so far
        optim.scaler.load_state_dict(state["grad_scaler"])
    if optim.ema is not None:
        ema_file = latest[1] / "ema.safetensors"
        if ema_file.is_file():
            from safetensors.torch import load_file

            optim.ema.load_state_dict(load_file(str(ema_file)))
        else:  # EMA switched on for a resumed run: it starts from the restored weights
            optim.ema.shadow = [p.detach().clone().float() for p in setup.params]
    if ctx.main:
        ctx.rundir.truncate_metrics(step)
    return step, float(state.get("elapsed_s", 0.0))


def out_of_time(accelerator: Any, max_minutes: float | None, elapsed: float) -> bool:
    """Rank 0's clock decides for everyone (ranks must stop at the same step)."""
    if max_minutes is None:
        return False
    flag = torch.tensor([1.0 if elapsed >= 60.0 * max_minutes else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        flag = broadcast(flag, from_process=0)
    return bool(flag.item() > 0)


def evaluate_run(model_dir: Path, rundir: RunDir, step: int, spec: Any) -> list[dict[str, Any]]:
    """The recipe's ``eval`` block on the final weights, into ``<run>/results/step_<N>/<run name>/``.

    Results belong to the run and to the weights of its last step: a run resumed for more steps
    evaluates into a new step folder and keeps the earlier results beside it.
    """
    from rich.console import Console

    from opdkit.eval.runner import run_evals

    console = Console(highlight=False, soft_wrap=True)
    out = rundir.root / "results" / f"step_{step:06d}"

    def report(summary: dict[str, Any]) -> None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
        console.print(f"eval {summary['bench']} · {summary['model']}: {metrics}", markup=False)

    return run_evals(list(spec.benchmarks), str(model_dir), out_dir=out, name=rundir.root.resolve().name,
                     samples=spec.samples_per_prompt, limit=spec.limit, bench_params=dict(spec.params),
                     on_result=report)  # fmt: skip


class TensorBoardLog:
    """Scalars to TensorBoard event files when ``tensorboard`` is installed (else nothing);
    ``OPDKIT_TENSORBOARD=0`` turns it off."""

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
