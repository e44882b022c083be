"""Time one pretraining step of candidate shapes-model configs on CPU (not a test).

For each candidate (pixel space 32x32x3; patch size, layers, width) this builds the shapes
model's transformer + CLIP text encoder with :func:`opdkit.models.shapes.make_shapes_modules`,
then times full flow-matching training steps: text encoding, logit-normal sigma, transformer
forward, MSE on the velocity target, backward, AdamW over both modules. Prints a table with
parameter counts, seconds per step (fastest and median over interleaved rounds) and how many
steps fit in 30 minutes.

Usage::

    python perf/shapes_model_probe.py                 # default candidates, batch 32, 2 threads
    python perf/shapes_model_probe.py --steps 2 --rounds 3 --batch 32 --threads 2
    python perf/shapes_model_probe.py --only 4x4x128  # patch x layers x width
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from opdkit.models.shapes import ShapesModelConfig, make_shapes_modules

# (patch, layers, width); head_dim 32 so heads = width / 32.
CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (2, 2, 64),
    (2, 4, 128),  # the first probe of the world (2.3M params, 0.86 s/step)
    (2, 6, 128),
    (4, 2, 64),
    (4, 4, 128),
    (4, 6, 128),
    (4, 4, 192),
    (4, 6, 192),
)
WORDS = (
    "a photo of an and the red green blue yellow purple orange white black circle square "
    "triangle star cross heart left right above below to on sign that says two three four"
).split()
PROMPTS = [
    "a photo of a red circle",
    "a photo of a blue square to the left of a green triangle",
    'a sign that says "K7"',
    "a photo of three yellow stars",
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_step(patch: int, layers: int, width: int, batch: int) -> tuple[Callable[[], None], dict[str, int]]:
    """A closure running one training step of this config, and its sizes."""
    config = ShapesModelConfig(patch_size=patch, num_layers=layers, num_heads=width // 32, head_dim=32)
    transformer, text_encoder, tokenizer = make_shapes_modules(WORDS, config)
    transformer.train()
    text_encoder.train().requires_grad_(True)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=config.max_prompt_tokens,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    x0 = torch.rand(batch, 3, config.resolution, config.resolution) * 2 - 1

    def step() -> None:
        out = text_encoder(ids, output_hidden_states=True)
        sigma = torch.sigmoid(torch.randn(batch))  # logit-normal noise levels
        eps = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        v = transformer(
            hidden_states=x_t,
            timestep=sigma * 1000,
            encoder_hidden_states=out.hidden_states[-2],
            pooled_projections=out.text_embeds,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sizes = {
        "transformer": n_params(transformer),
        "text": n_params(text_encoder),
        "tokens": (config.resolution // patch) ** 2,
    }
    return step, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per config and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="configs as PATCHxLAYERSxWIDTH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    candidates: list[tuple[int, int, int]] = list(CANDIDATES)
    if args.only:
        candidates = []
        for spec in args.only:
            patch, layers, width = (int(v) for v in spec.split("x"))
            candidates.append((patch, layers, width))
    print(f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}, 32x32x3 pixel space")
    # The cores are shared with other work: time the configs in interleaved rounds and report
    # the fastest and the median step, so a burst of outside load does not pick the winner.
    steppers = [(spec, *make_step(spec[0], spec[1], spec[2], args.batch)) for spec in candidates]
    times: dict[tuple[int, int, int], list[float]] = {spec: [] for spec, _, _ in steppers}
    for _spec, step, _ in steppers:
        step()  # warm-up: allocator and kernel selection
    for _ in range(args.rounds):
        for spec, step, _ in steppers:
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[spec].append(time.perf_counter() - start)
    print(
        "| patch | layers | width | img tokens | transformer params | text params | s/step min | s/step median | steps/30 min (min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (patch, layers, width), _, sizes in steppers:
        fastest = min(times[(patch, layers, width)])
        median = statistics.median(times[(patch, layers, width)])
        print(
            f"| {patch} | {layers} | {width} | {sizes['tokens']} | {sizes['transformer'] / 1e6:.2f}M "
            f"| {sizes['text'] / 1e6:.2f}M | {fastest:.3f} | {median:.3f} | {int(1800 / fastest)} |"
        )


if __name__ == "__main__":
    main()
