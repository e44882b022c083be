"""Fingerprint of the first training steps of the shipped shapes recipes (not a test).

A restructure of the training code must keep behaviour: this script runs the first ``--steps``
steps of ``train shapes/pretrain``, ``train shapes/grpo_ocr`` and ``distill shapes/opd`` through
the CLI, each into a fresh folder, and prints every logged loss (as ``float.hex``, so equal
means bit-identical) and the SHA-256 of the trained tensors and of the EMA at the last step.
Run it before and after a change and diff the two outputs.

Usage::

    python perf/first_steps.py                 # 3 steps each, a table on stdout
    python perf/first_steps.py --steps 2 --only grpo_ocr
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "pretrain": ["train", "shapes/pretrain"],
    "grpo_ocr": ["train", "shapes/grpo_ocr"],
    "opd": ["distill", "shapes/opd"],
}


def tensors_sha256(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors, in name order (metadata ignored)."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(name: str, steps: int, root: Path) -> dict[str, object]:
    out = root / name
    command = [sys.executable, "-m", "opdkit.cli", *RUNS[name], "--out", str(out), "--no-eval",
               "--set", f"train.max_steps={steps}"]  # fmt: skip
    if name != "pretrain":  # sample grids do not change the numbers; they only cost time
        command += ["--set", "train.sample_every=0"]
    env = {**os.environ, "OPDKIT_TENSORBOARD": "0"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checkpoint = out / "checkpoints" / f"step_{steps:06d}"
    hashes = {p.stem: tensors_sha256(p) for p in sorted(checkpoint.glob("*.safetensors"))}
    return {"losses": [float(m["loss"]).hex() for m in metrics], "weights": hashes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", choices=sorted(RUNS), action="append")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(RUNS):
            result = fingerprint(name, args.steps, Path(tmp))
            print(f"{name}")
            for step, loss in enumerate(result["losses"], start=1):
                print(f"  step {step} loss {loss}")
            for file, sha in result["weights"].items():  # type: ignore[union-attr]
                print(f"  step {args.steps} {file:<24} {sha}")


if __name__ == "__main__":
    main()
