"""GRPO's overhead over the bare transformer work it does (not a test): rollout and update.

Measured side by side in ONE process on the shapes-world model config (pixel space 32x32,
patch 4, 4 layers, width 128, LoRA rank 8), with interleaved rounds so both sides see the same
machine state:

(a) **rollout**: the on-policy rollout of a step (:meth:`opdkit.training.onpolicy.OnPolicy.rollout`: prompt encoding, per-image noise generators,
    CFG, SDE steps with log-probs, decoding) versus the bare transformer forwards of the same
    work (``steps`` forwards of the 2B-row CFG batch, inputs prepared beforehand). Target <= 1.10.
(b) **update**: one GRPO update as the shared loop runs it (:func:`opdkit.training.onpolicy.sweep_updates`
    over :meth:`opdkit.methods.grpo.Grpo.term_loss`, :class:`opdkit.training.loop.Optimization`: re-scoring every trained
    step with CFG, ratio, clipped loss, KL to the reference, backward, gradient clipping, AdamW,
    EMA) versus the bare work: per step one forward+backward of the 2B-row batch (with a plain
    mean loss) plus, when KL is on, one no-grad forward with the adapter disabled, and one AdamW
    step. Target <= 1.20.

Peak resident memory (``ru_maxrss``) is printed after each phase; it only grows, so a phase that
raises it is the one that needed more.

Usage::

    OMP_NUM_THREADS=1 python perf/grpo_overhead.py                  # batch 32, 10 steps, 1 thread
    python perf/grpo_overhead.py --threads 2 --batch 32 --rounds 5 --kl-beta 0
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="images per rollout (prompts x group)")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--kl-beta", type=float, default=0.04)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from opdkit.methods.grpo import Grpo
    from opdkit.recipe import EmaSpec, GrpoTrainSpec, LoraSpec, PromptsSpec, SamplerSpec
    from opdkit.registry import models
    from opdkit.shapes.prompts import load_split
    from opdkit.training.loop import Optimization, RunContext
    from opdkit.training.losses import group_advantages
    from opdkit.training.onpolicy import OnPolicy, sweep_updates
    from opdkit.training.rollout import Rollout
    from opdkit.training.trainable import EMA

    model = models.build(
        "shapes_new", {"patch_size": 4, "num_layers": 4, "num_heads": 4, "head_dim": 32, "seed": 0}
    )
    train = GrpoTrainSpec(
        seed=0, lr=1e-4, batch_size=args.batch // args.group, group_size=args.group, kl_beta=args.kl_beta,
        ema=EmaSpec(decay=0.9, every=1), max_grad_norm=1.0, lora=LoraSpec(rank=8, alpha=16),
    )  # fmt: skip
    sampler = SamplerSpec(steps=args.steps, cfg=args.cfg, noise_level=0.7, resolution=32)
    # the method as the loop drives it: its context, its trainable policy, the shared optimizer step
    loaded: Any = SimpleNamespace(recipe=SimpleNamespace(train=train, sampler=sampler, prompts=PromptsSpec()),
                                  path=Path("grpo_overhead"))  # fmt: skip
    ctx = RunContext(loaded, model, Accelerator(cpu=True), rundir=None, resuming=False)  # type: ignore[arg-type]
    grpo = Grpo()
    grpo.ctx, grpo.policy = ctx, OnPolicy.create(ctx)
    params = grpo.policy.trainable.params
    with torch.no_grad():  # a trained-looking adapter, so the reference differs from the policy
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    optim = Optimization(params, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                         EMA(grpo.policy.trainable.names, params, 0.9, 1), train.max_grad_norm, 1)  # fmt: skip
    trainable = grpo.policy.trainable
    records = load_split("train")
    n = args.batch
    print(f"shapes model: patch 4, 4 layers, width 128, {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M "
          f"params, LoRA {sum(p.numel() for p in params) / 1e3:.0f}k; {n} images, {args.steps} steps, CFG {args.cfg}, "
          f"{args.threads} thread(s)")  # fmt: skip

    def run_rollout() -> Rollout:
        return grpo.policy.rollout(ctx, records, step=1)[1]

    batch = run_rollout()
    cond2 = batch.cond.cat(model.uncond(n))
    x2 = torch.cat([batch.states[0], batch.states[0]])
    hidden, pooled = cond2.prompt_embeds, cond2.pooled

    def bare_forwards() -> None:
        with torch.no_grad():
            for t in range(args.steps):
                sigma = batch.sigmas[t].expand(2 * n) * 1000.0
                model.transformer(hidden_states=x2, timestep=sigma, encoder_hidden_states=hidden,
                                  pooled_projections=pooled, return_dict=False)  # fmt: skip

    advantages = group_advantages(torch.randn(n, generator=torch.Generator().manual_seed(0)), args.group)

    def grpo_update() -> None:
        grpo.batch, grpo.advantages, grpo.ref_means = batch, advantages, {}
        sweep_updates(ctx, optim, batch, grpo.term_loss)

    def bare_update() -> None:
        model.transformer.train()
        for t in range(args.steps):
            sigma = batch.sigmas[t].expand(2 * n) * 1000.0
            out = model.transformer(hidden_states=x2, timestep=sigma, encoder_hidden_states=hidden,
                                    pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
            (out.float().pow(2).mean() / args.steps).backward()
            if args.kl_beta > 0:
                with torch.no_grad(), trainable.reference(model):
                    model.transformer(hidden_states=x2, timestep=sigma, encoder_hidden_states=hidden,
                                      pooled_projections=pooled, return_dict=False)  # fmt: skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.transformer.eval()

    # warm-up (allocator, lazy inits), then interleaved rounds
    bare_forwards()
    bare_update()
    grpo_update()
    times: dict[str, list[float]] = {"rollout": [], "bare forward": [], "grpo update": [], "bare fwd+bwd": []}
    rss: dict[str, float] = {}
    phases: list[tuple[str, Callable[[], Any]]] = [
        ("bare forward", bare_forwards), ("rollout", run_rollout), ("bare fwd+bwd", bare_update), ("grpo update", grpo_update),
    ]  # fmt: skip
    for round_index in range(args.rounds):
        # Alternate which side of each pair runs first, so drifting machine load hits both.
        order = phases if round_index % 2 == 0 else [phases[1], phases[0], phases[3], phases[2]]
        for name, fn in order:
            times[name].append(timed(fn))
            rss[name] = peak_rss_mib()

    print(f"\n{'phase':<14} {'median s':>9} {'min s':>8} {'peak RSS MiB':>13}")
    for name, values in times.items():
        print(f"{name:<14} {statistics.median(values):>9.3f} {min(values):>8.3f} {rss[name]:>13.0f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    kl = f"KL beta {args.kl_beta}: bare includes the reference forward" if args.kl_beta > 0 else "no KL"
    print("\nratios of medians (of minimums: the less load-sensitive estimate on a shared machine)")
    print(f"(a) rollout / bare forward      = {med['rollout'] / med['bare forward']:.3f} "
          f"({low['rollout'] / low['bare forward']:.3f})  target <= 1.10")  # fmt: skip
    print(f"(b) grpo update / bare fwd+bwd  = {med['grpo update'] / med['bare fwd+bwd']:.3f} "
          f"({low['grpo update'] / low['bare fwd+bwd']:.3f})  target <= 1.20; {kl}")  # fmt: skip


if __name__ == "__main__":
    main()
