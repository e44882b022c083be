"""What reading another benchmark's images buys an eval (not a test): the shapes study's three
benchmarks of one model into one results folder, against shapes-quality alone in a fresh folder.

shapes-quality's prompts are shapes-geneval's followed by shapes-ocr's, so in a folder that
already holds shapes-geneval it reads those images instead of generating them again. Both ways
run in this one process, at the thread count given, in alternating rounds; the script prints each
eval's wall time, the ratio, and whether both ways scored every image the same.

Usage::

    python perf/eval_shared_images.py                    # shapes-base, every prompt, 1 thread
    python perf/eval_shared_images.py --limit 100 --threads 2 --model path/to/run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def timed_eval(bench: str, model: str, out: Path, limit: int | None) -> float:
    from opdkit.eval.runner import run_eval

    t0 = time.perf_counter()
    run_eval(bench, model, out_dir=out, limit=limit, name="m")
    return time.perf_counter() - t0


def scores(out: Path) -> dict[tuple[int, int], float]:
    rows = (json.loads(line) for line in (out / "m" / "shapes-quality.jsonl").read_text().splitlines())
    return {(r["prompt_index"], r["sample_index"]): r["score"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-base")
    parser.add_argument("--limit", type=int, default=None, help="first K prompts of each benchmark (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"{'round':>5} {'quality alone s':>16} {'geneval s':>10} {'quality after geneval s':>24} {'ratio':>6} same")
    for round_ in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as tmp:
            alone, shared = Path(tmp) / "alone", Path(tmp) / "shared"
            t_alone = timed_eval("shapes-quality", args.model, alone, args.limit)
            t_geneval = timed_eval("shapes-geneval", args.model, shared, args.limit)
            t_shared = timed_eval("shapes-quality", args.model, shared, args.limit)
            same = scores(alone) == scores(shared)
            print(f"{round_:>5} {t_alone:>16.1f} {t_geneval:>10.1f} {t_shared:>24.1f} {t_alone / t_shared:>6.2f} {same}")


if __name__ == "__main__":
    main()
