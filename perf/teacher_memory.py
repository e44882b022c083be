"""Memory of K LoRA teachers on one shared base versus K full teacher copies (not a test).

Flow-OPD loads every teacher as a separate full pipeline; opdkit keeps all LoRA teachers as named
adapters on ONE copy of the base weights. This script builds a mid-size SD3-architecture
transformer (default ~150M parameters), then, each in a fresh subprocess so peak RSS is clean:

* ``base``: the base alone;
* ``lora K``: the base + K LoRA teacher adapters (rank 32 on attention projections), loaded the
  way :mod:`opdkit.training.teachers` loads them (``FlowModel.add_lora`` per teacher);
* ``full K``: K full copies of the transformer (what loading K teacher pipelines costs).

It prints a table of peak RSS and the cost per teacher relative to one full copy.

Usage::

    OMP_NUM_THREADS=1 python perf/teacher_memory.py            # K = 1, 2, 4
    python perf/teacher_memory.py --layers 12 --width 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(mode: str, k: int, layers: int, width: int, rank: int) -> dict[str, float]:
    import copy

    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    heads = width // 64
    transformer = SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=width,
        caption_projection_dim=width, pooled_projection_dim=width, pos_embed_max_size=64,
    )  # fmt: skip
    params = sum(p.numel() for p in transformer.parameters())
    keep = [transformer]
    if mode == "lora":
        from opdkit.models.flow_model import FlowModel

        model = FlowModel.__new__(FlowModel)  # only the LoRA methods are used: no text encoders needed
        model.transformer = transformer
        for i in range(k):
            model.add_lora(f"teacher_{i}", rank=rank, alpha=2 * rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    elif mode == "full":
        keep += [copy.deepcopy(transformer) for _ in range(k - 1)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"params_m": params / 1e6, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "K"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.layers, args.width, args.rank)))
        return

    def run(mode: str, k: int) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(k), "--layers", str(args.layers), "--width", str(args.width), "--rank", str(args.rank)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = run("base", 1)
    one_copy = run("full", 2)["peak_mib"] - base["peak_mib"]  # what one more full teacher costs
    print(f"transformer: {base['params_m']:.1f}M parameters; base alone peak RSS {base['peak_mib']:.0f} MiB; one full copy +{one_copy:.0f} MiB")
    print(f"{'K':>3} {'LoRA teachers MiB':>18} {'K full copies MiB':>18} {'per LoRA teacher / full copy':>30}")
    for k in [int(x) for x in args.ks.split(",")]:
        lora = run("lora", k)["peak_mib"]
        full = run("full", k)["peak_mib"] if k > 1 else base["peak_mib"]
        per = (lora - base["peak_mib"]) / k / one_copy
        print(f"{k:>3} {lora:>18.0f} {full:>18.0f} {per:>29.2%}")


if __name__ == "__main__":
    main()
