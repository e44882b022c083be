"""``method: pretrain`` — flow-matching pretraining on rendered (prompt, image) pairs.

This is how the shapes world's base model is made (``recipes/shapes/pretrain.yaml``). Each step
draws ``train.batch_size`` prompt records, renders ground truth for them, and regresses the
velocity target v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps, with sigma drawn
logit-normal (SD3's training density) and then shifted like the sampling schedule
(``train.sigma_shift``, default the model's shift), so the high-noise steps that decide the
layout are trained as often as they are sampled. The text encoder trains with the transformer (it starts
random); ``train.cond_dropout`` of the prompts are replaced by "" so classifier-free guidance works.

Everything random in step ``k`` comes from generators seeded by (seed, k), so a resumed run
repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.checkpoint import load_module_state, load_training_state, save_training_state
from opdkit.data.sources import load_prompts
from opdkit.errors import OpdkitError
from opdkit.policy import EMA, scheduled_lr
from opdkit.recipe import dump_recipe
from opdkit.registry import models
from opdkit.rundir import RunDir
from opdkit.sampling import shift_sigmas

if TYPE_CHECKING:
    import torch

    from opdkit.models.flow_model import FlowModel
    from opdkit.recipe import LoadedRecipe


def flow_matching_loss(model: Any, x0: torch.Tensor, cond: Any, generator: torch.Generator, sigma_shift: float) -> torch.Tensor:
    """Rectified-flow loss ``mean ||v(x_t, sigma) - (eps - x0)||^2`` on clean samples ``x0``.

    ``x0``: (B, C, h, w) in model space; ``cond``: their conditioning. sigma in [0, 1] is drawn
    logit-normal(0, 1) and shifted toward high noise like the sampling schedule; ``x_t = (1 -
    sigma) x0 + sigma eps``. ``generator`` (CPU) draws sigma, then eps. Returns a 0-dim tensor.
    """
    import torch

    sigma = shift_sigmas(torch.sigmoid(torch.randn(len(x0), generator=generator)), sigma_shift).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * eps
    v = model.velocity(x_t, sigma, cond)
    return torch.nn.functional.mse_loss(v.float(), (eps - x0).float())


def trained_modules(model: FlowModel) -> dict[str, torch.nn.Module]:
    """What pretraining trains and checkpoints: the transformer and every text encoder, by name."""
    modules: dict[str, torch.nn.Module] = {"transformer": model.transformer}
    for i, encoder in enumerate(model.text_encoders):
        modules[f"text_encoder_{i}"] = encoder
    return modules


def run(loaded: LoadedRecipe, out_dir: str | Path, resume: bool = False) -> Path:
    """Pretrain; returns the directory of the final model (``<out_dir>/model``)."""
    import numpy as np
    import torch

    recipe = loaded.recipe
    train = recipe.train
    rundir = RunDir(out_dir)
    rundir.prepare(dump_recipe(recipe), resume)
    torch.manual_seed(train.seed)

    model = models.build(recipe.model.type, recipe.model.builder_params())
    if model.world != "shapes":
        raise OpdkitError(f"{loaded.path}: method pretrain renders shapes-world images; model {recipe.model.type!r} is {model.world!r}")
    # Rendering and every random draw stay on the CPU (so a seed means the same batches anywhere);
    # the model trains on the GPU when there is one.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device)
    from opdkit.shapes.render import render_batch

    records = load_prompts(recipe.prompts)
    by_tag: list[list[dict]] | None = None
    if recipe.prompts.balance_tags:
        grouped: dict[str, list[dict]] = {}
        for record in records:
            grouped.setdefault(str(record.get("tag")), []).append(record)
        by_tag = [grouped[t] for t in sorted(grouped)]
    modules = trained_modules(model)
    for module in modules.values():
        module.train()
        module.requires_grad_(True)
    named = [(f"{key}.{name}", p) for key, m in modules.items() for name, p in m.named_parameters()]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    # An EMA of the weights samples far cleaner than the raw weights of a small, high-lr model.
    ema = EMA([n for n, _ in named], params, train.ema.decay, train.ema.every) if train.ema else None

    start = 0
    elapsed_before = 0.0
    latest = rundir.latest()
    if resume and latest is not None:
        state = load_training_state(latest[1], modules, optimizer)
        if ema is not None and (latest[1] / "ema.safetensors").is_file():
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(latest[1] / "ema.safetensors")))
        elif ema is not None:  # EMA switched on for a resumed run: start it from the weights
            ema = EMA([n for n, _ in named], params, ema.decay, ema.every)
        start = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rundir.truncate_metrics(start)
    resolution = recipe.sampler.resolution
    sigma_shift = train.sigma_shift if train.sigma_shift is not None else model.shift

    def save(step: int, elapsed: float) -> None:
        extra = {"ema": ema.state_dict()} if ema is not None else None
        save_training_state(
            rundir.checkpoint_dir(step), modules, optimizer, {"step": step, "elapsed_s": elapsed}, extra_tensors=extra
        )
        rundir.commit_checkpoint(step, keep=train.keep_checkpoints)

    from opdkit.progress import progress_bar

    t0 = time.perf_counter()
    step = start
    with progress_bar(f"pretrain {loaded.path.stem}", total=train.max_steps, completed=start) as bar:
        while step < train.max_steps:
            step += 1
            rng = np.random.default_rng([train.seed, step])
            if by_tag is not None:  # every task tag equally often, whatever its share of prompts
                tags = rng.integers(0, len(by_tag), size=train.batch_size)
                batch = [by_tag[t][int(rng.integers(0, len(by_tag[t])))] for t in tags]
            else:
                batch = [records[i] for i in rng.integers(0, len(records), size=train.batch_size)]
            images = render_batch(batch, seed=int(rng.integers(2**31)), size=resolution, sides=train.object_sides)
            x0 = model.encode_images(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
            drop = rng.random(len(batch)) < train.cond_dropout
            prompts = ["" if d else r["prompt"] for r, d in zip(batch, drop, strict=True)]
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            with torch.enable_grad():
                cond = model.encode_prompts(prompts, grad=True)
                loss = flow_matching_loss(model, x0, cond, gen, sigma_shift)
            lr = scheduled_lr(train, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                if train.max_grad_norm is not None
                else torch.tensor(float("nan"))
            )
            optimizer.step()
            if ema is not None:
                # EMA warm-up: early averages would otherwise keep a large share of the random init
                ema.decay = min(train.ema.decay, (1.0 + step) / (10.0 + step))
                ema.update(params, step)
            elapsed = elapsed_before + time.perf_counter() - t0
            value = loss.item()
            if not math.isfinite(value):
                raise OpdkitError(f"{loaded.path}: loss became {value} at step {step}; lower train.lr")
            if step % train.log_every == 0 or step == train.max_steps:
                rundir.log({"step": step, "loss": value, "grad_norm": float(grad_norm), "lr": lr, "seconds": round(elapsed, 3)})
            bar.update(step, loss=value)
            out_of_time = train.max_minutes is not None and elapsed >= 60.0 * train.max_minutes
            if step % train.checkpoint_every == 0 or step == train.max_steps or out_of_time:
                save(step, elapsed)
            if out_of_time:
                break

    final = rundir.root / "model"
    with ema.applied(params) if ema is not None else contextlib.nullcontext():
        model.save_pretrained(final)
    return final


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, step: int | None = None, use_ema: bool = True) -> Path:
    """Write a pretrain checkpoint (default: the latest) as a loadable pipeline directory.

    Used to pick the base model among a run's checkpoints (e.g. stop early to keep it imperfect).
    """
    from opdkit.recipe import load_recipe

    rundir = RunDir(run_dir)
    loaded = load_recipe(rundir.root / "recipe.yaml")
    model = models.build(loaded.recipe.model.type, loaded.recipe.model.builder_params())
    modules = trained_modules(model)
    if step is None:
        latest = rundir.latest()
        if latest is None:
            raise OpdkitError(f"{rundir.root}: no checkpoint yet")
        directory = latest[1]
    else:
        directory = rundir.checkpoint_dir(step)
    load_training_state(directory, modules, None)
    if use_ema and (directory / "ema.safetensors").is_file():  # the EMA weights are the model to use
        from safetensors.torch import load_file

        shadow = load_file(str(directory / "ema.safetensors"))
        for key, module in modules.items():
            load_module_state(module, {k[len(key) + 1 :]: v for k, v in shadow.items() if k.startswith(f"{key}.")})
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
