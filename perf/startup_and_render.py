"""Two small latencies a user feels (not a test): `opdkit --help` and shapes-world rendering.

- ``opdkit --help`` wall time in a fresh interpreter (best and median of ``--rounds``), against
  a bare ``python -c pass`` measured in the same rounds: the ratio is what opdkit adds. The help
  path imports no torch (tests/test_cli.py checks that); this measures what is left.
- ``render_batch`` time per image over every task tag (ground truth for pretraining: it runs
  every step, so it must stay negligible next to a ~0.3 s training step).

Usage::

    python perf/startup_and_render.py            # 5 rounds, 210 renders
    python perf/startup_and_render.py --rounds 9 --per-tag 100
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-tag", type=int, default=30, help="prompts per task tag to render")
    args = parser.parse_args()

    bare, helps = [], []
    for _ in range(args.rounds):  # interleaved, so both see the same machine load
        bare.append(wall([sys.executable, "-c", "pass"]))
        helps.append(wall([sys.executable, "-m", "opdkit.cli", "--help"]))

    from opdkit.shapes import prompts
    from opdkit.shapes.render import render_batch

    records = prompts.generate_prompts(args.per_tag, seed=0, unique=False)
    render_batch(records, seed=0)  # warm caches
    per_image = []
    for seed in range(1, args.rounds + 1):
        start = time.perf_counter()
        render_batch(records, seed=seed)
        per_image.append((time.perf_counter() - start) / len(records))

    print("| measure | best | median |")
    print("|---|---|---|")
    print(f"| `python -c pass` (s) | {min(bare):.3f} | {statistics.median(bare):.3f} |")
    print(f"| `opdkit --help` (s) | {min(helps):.3f} | {statistics.median(helps):.3f} |")
    print(f"| render, ms per image ({len(records)} images, all tags) | {1e3 * min(per_image):.3f} | {1e3 * statistics.median(per_image):.3f} |")
    print(
        f"ratio `opdkit --help` / bare interpreter: {min(helps) / min(bare):.1f} (best), "
        f"{statistics.median(helps) / statistics.median(bare):.1f} (median; the best is the steadier on a loaded machine)"
    )


if __name__ == "__main__":
    main()
