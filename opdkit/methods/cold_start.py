"""OPD's cold start: the student's adapter begins from its teachers, by merge and optionally SFT.

* :func:`merge_init` — the teachers' LoRA adapters merged on their weight deltas B @ A
  (:mod:`opdkit.models.merge`: mean, weighted or TIES), compressed to the student's rank by truncated
  SVD when needed (``init.method``, ``init.teachers``, ``init.adapter``);
* :func:`sft_cold_start` — then supervised fine-tuning on images the routed teachers draw
  (``init.sft``), by the same flow-matching loss as pretraining.

Both run once, before step 1, and not again when a run resumes.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opdkit.errors import OpdkitError
from opdkit.training.losses import flow_matching_loss
from opdkit.training.rollout import encode_unique, step_prompts
from opdkit.training.teachers import Teacher, adapter_file, teacher_samples
from opdkit.training.trainable import ADAPTER, Trainable

if TYPE_CHECKING:
    from opdkit.recipe import InitSpec, SftSpec


def merge_init(model: Any, trainable: Any, loaded: dict[str, Teacher], init: InitSpec, rank: int, alpha: float) -> float | None:
    """Initialise the student's adapter from the merged teacher deltas; returns the relative
    Frobenius error of the rank-``rank`` compression (0 when exact), None when nothing is merged."""
    from opdkit.models.lora import read_lora
    from opdkit.models.merge import merge_loras

    if init.method == "none":  # (InitSpec refuses method none with an adapter)
        return None  # no merge: the student adapter stays at B = 0
    if init.adapter is not None:
        files = [adapter_file(Path(init.adapter).expanduser())]
        method, weights = "mean", None
        what = f"init: LoRA file {str(files[0])!r}"
    else:
        chosen = init.teachers or [n for n, t in loaded.items() if t.kind == "lora"]
        missing = [n for n in chosen if n not in loaded or loaded[n].kind != "lora"]
        if missing or not chosen:
            raise OpdkitError(f"init: cannot merge {missing or 'no teachers'}: only LoRA teachers can be merged")
        files = [loaded[n].lora_path for n in chosen]
        method, weights = init.method, init.weights
        what = f"init: the merged teachers {', '.join(chosen)}"
    sources = [read_lora(file) for file in files]
    for file, source in zip(files, sources, strict=True):
        # a delta only means something on its own base, and on layers of its shape: refused as
        # load_lora refuses it (the teachers passed that check when they were loaded; init.adapter
        # is read here only), not by a RuntimeError from copy_ below
        model.check_lora_fits(source, f"init: LoRA file {str(file)!r}")
    exact = merge_loras(sources, method, weights, density=init.density) if method != "ties" else None
    if exact is not None and exact.rank == rank:
        merged = exact  # the concatenated factors fit the student's rank as they are
    else:  # compress (or, for TIES, factorize) to the student's rank by truncated SVD
        merged = merge_loras(sources, method, weights, rank=rank, density=init.density)
    exact = exact or merged
    # the merged delta must land on layers the student adapts (train.lora.targets)
    model.check_lora_fits(merged, what, ADAPTER)
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


def sft_cold_start(
    model: Any,
    trainable: Trainable,
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
    ``sft.steps`` flow-matching steps (:func:`~opdkit.training.losses.flow_matching_loss`) on random
    batches of those images (``sft.cond_dropout`` of them with the empty prompt, so CFG's
    unconditional branch moves with the conditional one), with its own AdamW, which OPD does not
    inherit. Every rank does the same (same seeds), so the ranks start OPD from the same weights.

    Returns ``{"sft_loss_first", "sft_loss_last", "sft_seconds"}`` (mean loss of the first and
    last 10 steps).
    """
    import numpy as np

    from opdkit.progress import progress_bar

    t0 = time.perf_counter()
    drawn = step_prompts(records, seed=seed, step=0, batch_size=sft.samples, group_size=1, balance_tags=balance_tags)
    routes = route(drawn.records, list(loaded))
    cond = encode_unique(model, [r["prompt"] for r in drawn.records])
    x0 = teacher_samples(model, trainable, loaded, routes, cond, drawn.seeds, sampler, micro_batch=sft.batch_size)
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
    rows = torch.from_numpy(rng.permutation(len(x0))[: sft.batch_size])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    step_cond = cond[rows]
    if sft.cond_dropout > 0:  # these rows learn the teacher's image from the empty prompt
        drop = torch.from_numpy(rng.random(len(rows)) < sft.cond_dropout).to(step_cond.prompt_embeds.device)
        empty = model.uncond(len(rows))
        step_cond = step_cond.where(drop, empty)
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


