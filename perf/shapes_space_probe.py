"""Pixel space at 32 or 48 px, or a tiny autoencoder: what the shapes model should work in (not a test).

The shapes world's issue asks to choose the resolution and "pixel space or a tiny autoencoder"
by measurement. This script measures both sides of that choice on this machine:

1. **Cost.** One pretraining step (text encoder, transformer forward and backward, AdamW) of the
   shipped architecture (4 layers, width 128, batch 32) in three spaces, timed side by side in
   interleaved rounds:

   - ``pixel 32``: 32x32x3 pixels, patch 4, 64 image tokens (the shipped model);
   - ``pixel 48``: 48x48x3 pixels, patch 4, 144 image tokens;
   - ``latent 32``: a tiny ``AutoencoderKL`` (downsampling 4, 4 channels: 8x8x4 latents, the same
     12x compression as SD3.5's VAE at 512 px) encodes each freshly rendered batch, and the
     transformer works on the latents with patch 1 (64 tokens).

   It prints seconds per step and how many steps fit in the issue's 45 minutes; the shipped base
   needs 7,000 steps.

2. **Fidelity.** A latent model can draw no cleaner than its decoder reconstructs. The script
   trains the tiny autoencoder on freshly rendered shapes-world images (reconstruction MSE plus a
   small KL, as a VAE is trained) for ``--vae-minutes`` and scores its reconstructions of clean
   test-split renders with the world's own scorers: GenEval verdict, exact sign reading and
   quality. Pixel space scores 1.0 on all three by construction.

Usage::

    python perf/shapes_space_probe.py                      # 2 threads, VAE trained 5 minutes
    python perf/shapes_space_probe.py --vae-minutes 10 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from opdkit.models.shapes import ShapesModelConfig, make_shapes_modules

SHIPPED = ShapesModelConfig(patch_size=4, num_layers=4, num_heads=4, head_dim=32, max_prompt_tokens=16)
BASE_STEPS = 7000  # steps of the shipped base (recipes/shapes/pretrain.yaml)
BUDGET_S = 45 * 60  # the cap on pretraining on this 2-core machine


def tiny_vae() -> torch.nn.Module:
    """AutoencoderKL with two downsamplings (32x32x3 -> 8x8x4); ~0.5M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


@functools.cache
def train_records_by_tag() -> dict[str, list[dict]]:
    """The train split grouped by task tag (read once: the VAE loop draws a batch every step)."""
    from opdkit.shapes.prompts import ALL_TAGS, load_split

    records = load_split("train")
    return {t: [r for r in records if r["tag"] == t] for t in ALL_TAGS}


def rendered_batch(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    """``(B, 3, size, size)`` float in [-1, 1]: train-split prompts, every tag equally, rendered."""
    from opdkit.shapes.prompts import ALL_TAGS
    from opdkit.shapes.render import render_batch

    by_tag = train_records_by_tag()
    rng = np.random.default_rng(seed)
    tags = [ALL_TAGS[i] for i in rng.integers(0, len(ALL_TAGS), size=batch)]
    picked = [by_tag[t][int(rng.integers(0, len(by_tag[t])))] for t in tags]
    images = render_batch(picked, seed=int(rng.integers(2**31)), size=size)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_step(space: str, batch: int) -> tuple[Callable[[], None], dict[str, int]]:
    """One pretraining step in ``space`` (see the module docstring) and its sizes."""
    from diffusers import SD3Transformer2DModel

    resolution = 48 if space == "pixel 48" else 32
    config = dataclasses.replace(SHIPPED, resolution=resolution)
    vocabulary = "a photo of sign that says red circle square left".split()
    transformer, text_encoder, tokenizer = make_shapes_modules(vocabulary, config)
    vae = None
    if space == "latent 32":
        vae = tiny_vae().eval().requires_grad_(False)
        # The shipped transformer's own config, moved to 8x8x4 latents at patch 1 (64 tokens).
        latent = {"sample_size": 8, "patch_size": 1, "in_channels": 4, "out_channels": 4, "pos_embed_max_size": 8}
        transformer = SD3Transformer2DModel.from_config({**transformer.config, **latent})
    transformer.train()
    text_encoder.train().requires_grad_(True)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    ids = tokenizer(["a photo of a red circle"] * batch, padding="max_length",
                    max_length=config.max_prompt_tokens, truncation=True, return_tensors="pt").input_ids
    pixels = rendered_batch(batch, seed=0, size=resolution)

    def step() -> None:
        if vae is not None:  # fresh renders every step: the latents cannot be cached
            with torch.no_grad():
                x0 = vae.encode(pixels).latent_dist.sample()
        else:
            x0 = pixels
        out = text_encoder(ids, output_hidden_states=True)
        sigma = torch.sigmoid(torch.randn(batch))
        eps = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        v = transformer(hidden_states=(1 - s) * x0 + s * eps, timestep=sigma * 1000,
                        encoder_hidden_states=out.hidden_states[-2], pooled_projections=out.text_embeds,
                        return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    return step, {"tokens": tokens, "params": sum(p.numel() for p in transformer.parameters())}


def time_spaces(batch: int, rounds: int, steps: int) -> None:
    spaces = ["pixel 32", "pixel 48", "latent 32"]
    steppers = {space: make_step(space, batch) for space in spaces}
    times: dict[str, list[float]] = {space: [] for space in spaces}
    for step, _ in steppers.values():
        step()  # warm-up
    # Interleaved rounds: a burst of outside load hits every space alike.
    for _ in range(rounds):
        for space, (step, _) in steppers.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                times[space].append(time.perf_counter() - start)
    ref = statistics.median(times["pixel 32"])
    print("| space | image tokens | transformer params | s/step median | x pixel 32 | steps in 45 min | "
          f"{BASE_STEPS:,} steps take |")
    print("|---|---|---|---|---|---|---|")
    for space, (_, sizes) in steppers.items():
        med = statistics.median(times[space])
        print(f"| {space} | {sizes['tokens']} | {sizes['params'] / 1e6:.2f}M | {med:.3f} | {med / ref:.2f} "
              f"| {int(BUDGET_S / med):,} | {BASE_STEPS * med / 60:.1f} min |")


def vae_fidelity(minutes: float, batch: int, n_per_tag: int) -> None:
    from opdkit.shapes.detect import score_geneval
    from opdkit.shapes.glyphs import read_text
    from opdkit.shapes.prompts import ALL_TAGS, load_split
    from opdkit.shapes.quality import score_quality
    from opdkit.shapes.render import render_batch

    vae = tiny_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start, step, loss_value = time.perf_counter(), 0, float("nan")
    while time.perf_counter() - start < 60 * minutes:
        step += 1
        x = rendered_batch(batch, seed=1000 + step)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
    vae.eval()
    test = load_split("test")
    records = [r for t in ALL_TAGS for r in [r for r in test if r["tag"] == t][:n_per_tag]]
    clean = render_batch(records, seed=7)
    with torch.no_grad():
        x = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    geneval = [r for r in records if r["tag"] != "ocr"]
    signs = [r for r in records if r["tag"] == "ocr"]
    g_idx = [i for i, r in enumerate(records) if r["tag"] != "ocr"]
    s_idx = [i for i, r in enumerate(records) if r["tag"] == "ocr"]
    verdicts = score_geneval(images[g_idx], geneval)
    reads = [read_text(images[i]) == r["text"] for i, r in zip(s_idx, signs, strict=True)]
    print(f"\ntiny VAE (8x8x4 latents), trained {step} steps ({minutes:g} min, batch {batch}), final loss "
          f"{loss_value:.4f}; reconstructions of {len(records)} clean test renders:")
    print("| images | GenEval verdict | signs read exactly | quality |")
    print("|---|---|---|---|")
    print(f"| clean renders (pixel space) | {np.mean([v['correct'] for v in score_geneval(clean[g_idx], geneval)]):.3f} "
          f"| {np.mean([read_text(clean[i]) == r['text'] for i, r in zip(s_idx, signs, strict=True)]):.3f} "
          f"| {np.mean(score_quality(clean)):.3f} |")
    print(f"| VAE reconstructions | {np.mean([v['correct'] for v in verdicts]):.3f} | {np.mean(reads):.3f} "
          f"| {np.mean(score_quality(images)):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per space and round")
    parser.add_argument("--vae-minutes", type=float, default=5.0)
    parser.add_argument("--per-tag", type=int, default=24, help="test prompts per tag for the fidelity check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    time_spaces(args.batch, args.rounds, args.steps)
    vae_fidelity(args.vae_minutes, args.batch, args.per_tag)


if __name__ == "__main__":
    main()
