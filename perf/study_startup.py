"""What a finished study costs to check at SD3.5-M's size, with and without remembered facts (not a test).

Each time ``opdkit study`` runs (a re-run to print the table, a ``--dry-run``, a resume after a
crash), it checks every finished row against its weights: a run's ``run.json`` against the base
its recipe loads, a row's results against the weights they were made from, an OPD run against
its teachers. That needs each row's weight fingerprint, which used to mean loading the row's whole
pipeline (and merging a LoRA run's adapter) every time. ``OUT/model_facts.json`` now remembers
each fingerprint with the files it came from (:func:`opdkit.checkpoint.files_stamp`), and a
teacher's tensors are hashed once per process.

This script builds SD3.5-M's transformer from its published config with random weights (2.24B
parameters, saved in bf16 as the published weights are), SD3's VAE and two small CLIP encoders
(``perf/real_size.py``; the real pipeline adds T5-XXL, 4.7B more parameters to load), a LoRA
run on it (rank 32, as the ``sd35m`` recipes, its adapter random so that merging changes the
weights), and a study of two rows: the base as a model row and the run as a recipe row. It then
times, side by side in one process, the facts the study needs of them: with ``model_facts.json``
deleted first (what every invocation did before) and with it present; last, hashing a full
teacher's transformer file once and again.

Usage::

    OMP_NUM_THREADS=2 python perf/study_startup.py --work /tmp/study-startup   # about 10 GB on disk, 12 GB RAM
    python perf/study_startup.py --layers 2 --work /tmp/small                  # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import build_model


def build_world(work: Path, layers: int) -> tuple[Path, Path]:
    """The pipeline folder and a finished LoRA run on it, made once in ``work`` and reused."""
    import yaml

    from opdkit.models.saving import save_flow_model
    from opdkit.recipe import dump_recipe, load_recipe

    pipeline, run = work / "sd35m-like", work / "study" / "runs" / "grpo"
    if not (pipeline / "model_index.json").is_file():
        model = build_model(layers, "cpu")
        model.to(dtype=torch.bfloat16)
        save_flow_model(model, pipeline)
        del model
    if not (run / "final" / "final.json").is_file():
        from opdkit.models.loading import load_flow_model

        recipe_file = work / "grpo.yaml"
        data = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "sd35m" / "grpo_geneval.yaml").read_text())
        data["model"]["path"] = str(pipeline)
        recipe_file.write_text(yaml.safe_dump(data, sort_keys=False))
        loaded = load_recipe(recipe_file, check_plugins=False)
        model = load_flow_model(pipeline, dtype=torch.bfloat16)
        lora = loaded.recipe.train.lora
        model.add_lora("default", rank=lora.rank, alpha=int(lora.alpha), target_modules=lora.targets)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=1e-3)
        (run / "final").mkdir(parents=True, exist_ok=True)
        model.save_lora("default", run / "final" / "lora.safetensors")
        (run / "recipe.yaml").write_text(dump_recipe(loaded.recipe))
        (run / "final" / "final.json").write_text(json.dumps({"kind": "lora", "step": 1, "ema": False, "adapter": "default"}))
        del model
    study_file = work / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "benchmarks": ["geneval"],
        "rows": [{"name": "base", "model": str(pipeline)}, {"name": "grpo", "recipe": str(work / "grpo.yaml")}],
    }, sort_keys=False))  # fmt: skip
    return study_file, pipeline


def facts_of_every_row(study_file: Path, out: Path, remembered: bool) -> dict[str, float]:
    """Seconds for the facts a finished study checks, in a fresh study object (a new invocation)."""
    from opdkit.study import FACTS_FILE, _base_weights, _eval_model, load_study

    if not remembered:
        (out / FACTS_FILE).unlink(missing_ok=True)
    study = load_study(study_file, out=out)
    rows = {row.name: row for row in study.rows}
    seconds = {}
    for what, call in (
        ("base row: its eval model", lambda: _eval_model(study, rows["base"])),
        ("LoRA run: the base its run.json names", lambda: _base_weights(study, rows["grpo"])),
        ("LoRA run: its eval model (adapter merged)", lambda: _eval_model(study, rows["grpo"])),
    ):
        t0 = time.perf_counter()
        call()
        seconds[what] = time.perf_counter() - t0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, the run and the study (reused)")
    parser.add_argument("--layers", type=int, default=24, help="transformer blocks (SD3.5-M: 24)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    from opdkit.checkpoint import tensors_sha256

    t0 = time.perf_counter()
    study_file, pipeline = build_world(args.work, args.layers)
    print(f"model and run ready in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}")
    out = args.work / "study"
    facts_of_every_row(study_file, out, remembered=False)  # warm the page cache and write the memo once
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):  # alternated, so that a slow spell of the machine hits both
        for remembered in (False, True):
            for what, s in facts_of_every_row(study_file, out, remembered).items():
                rows.setdefault(what, {}).setdefault("remembered" if remembered else "loaded", []).append(s)
    transformer_file = next((pipeline / "transformer").glob("*.safetensors"))
    size_gb = transformer_file.stat().st_size / 1e9
    t0 = time.perf_counter()
    tensors_sha256(transformer_file)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tensors_sha256(transformer_file)
    again = time.perf_counter() - t0

    print(f"\n| what a finished study checks (best of {args.repeats}) | loaded every time (s) | remembered (s) | ratio |")
    print("|---|---|---|---|")
    total_loaded = total_remembered = 0.0
    for what, times in rows.items():
        loaded, remembered = min(times["loaded"]), min(times["remembered"])
        total_loaded, total_remembered = total_loaded + loaded, total_remembered + remembered
        print(f"| {what} | {loaded:.2f} | {remembered:.4f} | {loaded / remembered:.0f}x |")
    print(f"| all three | {total_loaded:.2f} | {total_remembered:.4f} | {total_loaded / total_remembered:.0f}x |")
    print(f"\n| full teacher's transformer ({size_gb:.1f} GB) | first hash (s) | again, same process (s) |")
    print("|---|---|---|")
    print(f"| tensors_sha256 | {first:.2f} | {again:.4f} |")
    if args.out is not None:
        result: dict[str, Any] = {"rows": rows, "teacher_hash_s": [first, again], "transformer_gb": size_gb}
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
