"""``method: pretrain`` — flow-matching pretraining on rendered (prompt, image) pairs.

This is how the shapes world's base model is made (``recipes/shapes/pretrain.yaml``). Each step
draws ``train.batch_size`` prompt records, renders ground truth for them, and regresses the
velocity target v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps
(:func:`~opdkit.training.losses.flow_matching_loss`), with sigma drawn logit-normal (SD3's
training density) and then shifted like the sampling schedule (``train.sigma_shift``, default the
model's shift), so the high-noise steps that decide the layout are trained as often as they are
sampled. The text encoder trains with the transformer (it starts random); ``train.cond_dropout``
of the prompts are replaced by "" so classifier-free guidance works. The loop
(:mod:`opdkit.training.loop`) does everything else; the final model, with the EMA weights when
``train.ema`` is set, is a pipeline folder ``<run>/model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opdkit.errors import OpdkitError
from opdkit.training.loop import Optimization, RunContext, Setup, StepResult
from opdkit.training.losses import flow_matching_loss

if TYPE_CHECKING:
    from opdkit.models.flow_model import FlowModel


def trained_modules(model: FlowModel) -> dict[str, torch.nn.Module]:
    """What pretraining trains and checkpoints: the transformer and every text encoder, by name."""
    modules: dict[str, torch.nn.Module] = {"transformer": model.transformer}
    for i, encoder in enumerate(model.text_encoders):
        modules[f"text_encoder_{i}"] = encoder
    return modules


class Pretrain:
    """Flow-matching pretraining of a shapes-world model from scratch, over the shared loop."""

    name = "pretrain"

    def setup(self, ctx: RunContext) -> Setup:
        from opdkit.data.sources import load_prompts

        recipe, model = ctx.recipe, ctx.model
        if model.world != "shapes":
            raise OpdkitError(f"{ctx.loaded.path}: method pretrain renders shapes-world images; model {recipe.model.type!r} is {model.world!r}")
        if ctx.world > 1:
            raise OpdkitError(f"{ctx.loaded.path}: method pretrain runs in one process (it renders its own data)")
        self.records = load_prompts(recipe.prompts)
        self.by_tag: list[list[dict[str, Any]]] | None = None
        if recipe.prompts.balance_tags:
            grouped: dict[str, list[dict[str, Any]]] = {}
            for record in self.records:
                grouped.setdefault(str(record.get("tag")), []).append(record)
            self.by_tag = [grouped[t] for t in sorted(grouped)]
        modules = trained_modules(model)
        for module in modules.values():
            module.train()
            module.requires_grad_(True)
        named = [(f"{key}.{name}", p) for key, m in modules.items() for name, p in m.named_parameters()]
        self.sigma_shift = ctx.train.sigma_shift if ctx.train.sigma_shift is not None else model.shift
        return Setup(modules, [n for n, _ in named], [p for _, p in named])

    def step(self, step: int, ctx: RunContext, optim: Optimization) -> StepResult:
        """Render a batch (everything random seeded by ``(seed, step)``, on the CPU, so a seed means
        the same batches on any device), one flow-matching loss, one optimizer step."""
        import numpy as np

        from opdkit.shapes.render import render_batch

        train, model = ctx.train, ctx.model
        rng = np.random.default_rng([train.seed, step])
        if self.by_tag is not None:  # every task tag equally often, whatever its share of prompts
            tags = rng.integers(0, len(self.by_tag), size=train.batch_size)
            batch = [self.by_tag[t][int(rng.integers(0, len(self.by_tag[t])))] for t in tags]
        else:
            batch = [self.records[i] for i in rng.integers(0, len(self.records), size=train.batch_size)]
        images = render_batch(batch, seed=int(rng.integers(2**31)), size=ctx.recipe.sampler.resolution, sides=train.object_sides)
        x0 = model.encode_images(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
        drop = rng.random(len(batch)) < train.cond_dropout
        prompts = ["" if d else r["prompt"] for r, d in zip(batch, drop, strict=True)]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        with torch.enable_grad(), ctx.autocast():
            cond = model.encode_prompts(prompts, grad=True)
            loss = flow_matching_loss(model, x0, cond, gen, self.sigma_shift)
        optim.backward(loss)
        grad_norm = optim.step()
        value = loss.item()
        return StepResult({"loss": value, "grad_norm": float(grad_norm)}, bar={"loss": value})

    def finish(self, ctx: RunContext, optim: Optimization, step: int) -> Path:
        from opdkit.rundir import atomic_write_json
        from opdkit.runs import PRETRAINED, PRETRAINED_STEP

        final = ctx.rundir.root / PRETRAINED
        if ctx.main:
            import contextlib

            with optim.ema.applied(optim.params) if optim.ema is not None else contextlib.nullcontext():
                ctx.model.save_pretrained(final)
            # written last: a study knows the run finished (and at which step) only once the
            # pipeline is whole, as final/final.json tells it for GRPO and OPD
            atomic_write_json(final / PRETRAINED_STEP, {"step": step})
        return final


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, step: int | None = None, use_ema: bool = True) -> Path:
    """Write a pretrain checkpoint (default: the latest) as a loadable pipeline directory.

    Used to pick the base model among a run's checkpoints (e.g. stop early to keep it imperfect).
    """
    from opdkit.checkpoint import load_module_state, load_training_state
    from opdkit.recipe import load_recipe
    from opdkit.registry import models
    from opdkit.rundir import RunDir

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
            load_module_state(
                module, {k[len(key) + 1 :]: v for k, v in shadow.items() if k.startswith(f"{key}.")}, directory / "ema.safetensors"
            )
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
