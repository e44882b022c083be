"""What ``train.gradient_checkpointing`` buys and costs (not a test): memory and time per update.

Builds one SD3-architecture transformer shaped like SD3.5 at 512 px in miniature (16 latent
channels, 64x64 latents, patch 2, so 1,024 image tokens, plus 77 text tokens), adds a LoRA the way
opdkit trains it, and times a LoRA update (forward with grad, mean loss, backward) with and without
checkpointing. Each mode runs in its own subprocess, so the peak resident memory it reports
(``ru_maxrss`` after the update, minus the peak before it) is that mode's alone. Prints a table
and the ratios checkpointed / plain.

Usage::

    OMP_NUM_THREADS=1 python perf/gradient_checkpointing.py              # 6 layers, width 384, batch 2
    python perf/gradient_checkpointing.py --layers 8 --width 512 --batch 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(layers: int, width: int, batch: int, checkpointing: bool, threads: int, repeats: int) -> dict[str, float]:
    """One mode, in this process: seconds per update (fastest) and the update's extra peak MiB."""
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    heads = width // 64
    transformer = SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=256,
        caption_projection_dim=width, pooled_projection_dim=128, pos_embed_max_size=64,
    )  # fmt: skip
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    latents = torch.randn(batch, 16, 64, 64)
    text = torch.randn(batch, 77, 256)
    pooled = torch.randn(batch, 128)
    timestep = torch.full((batch,), 500.0)

    def update() -> None:
        out = transformer(
            hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
            timestep=timestep, return_dict=False,
        )[0]  # fmt: skip
        out.square().mean().backward()

    with torch.no_grad():  # warm the allocator's and kernels' first-call costs out of the peak
        transformer(hidden_states=latents[:1], encoder_hidden_states=text[:1], pooled_projections=pooled[:1],
                    timestep=timestep[:1], return_dict=False)  # fmt: skip
    before = peak_rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in transformer.parameters())
    return {"seconds": min(times), "extra_peak_mib": peak_rss_mib() - before, "params_m": params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384, help="multiple of 64 (head dim 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.layers, args.width, args.batch, args.child == "checkpointed", args.threads, args.repeats)
        print(json.dumps(result))
        return
    rows = {}
    for mode in ("plain", "checkpointed"):
        command = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(
        f"SD3 transformer {args.layers} layers, width {args.width} ({rows['plain']['params_m']:.1f}M params), "
        f"LoRA r16, batch {args.batch} x 1,024 image + 77 text tokens, {args.threads} thread(s)"
    )
    print("| mode | s/update | update's extra peak RSS (MiB) |")
    print("|---|---|---|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['seconds']:.2f} | {row['extra_peak_mib']:.0f} |")
    plain, ckpt = rows["plain"], rows["checkpointed"]
    print(
        f"ratios checkpointed / plain: time {ckpt['seconds'] / plain['seconds']:.2f}, "
        f"extra memory {ckpt['extra_peak_mib'] / max(plain['extra_peak_mib'], 1e-9):.2f}"
    )


if __name__ == "__main__":
    main()
