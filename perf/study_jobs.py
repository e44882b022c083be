"""What ``opdkit study --jobs 2`` buys on this machine (not a test): two rows at once, one thread
each, against the same two rows one after the other with every thread.

It trains the first steps of two shipped recipes (default: the GenEval and OCR teachers of the
shapes study) through ``opdkit train --no-eval``, each into a fresh folder, both ways, in
alternating rounds so that both ways see the same machine state:

- **one at a time**: A then B, each with ``OMP_NUM_THREADS`` = all cores (what ``opdkit study``
  does without ``--jobs``);
- **two at once**: A and B started together, one thread each (what ``--jobs 2`` does on 2 cores).

It prints, per round, each training's wall time both ways and two ratios: **as run** (A + B one
at a time over the two at once, which waits for the slower of the two: unequal rows waste a core at
the end) and **packed** (A + B one at a time over the mean of the two at once: the gain when many
rows keep both cores busy, as in a study of several rows). Last, whether the two ways logged the
same numbers (every loss and reward of ``metrics.jsonl``, the clocks aside): the thread count must
not change results.

Usage::

    python perf/study_jobs.py                               # 2 rounds, 6 + 20 steps
    python perf/study_jobs.py --rounds 3 --a shapes/grpo_quality --a-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def command(recipe: str, steps: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "opdkit.cli", "train", recipe, "--no-eval", "--out", str(out),
            "--set", f"train.max_steps={steps}", "--set", "train.checkpoint_every=1000",
            "--set", "train.sample_every=0"]  # fmt: skip


def start(recipe: str, steps: int, out: Path, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPDKIT_TENSORBOARD="0")
    return subprocess.Popen(command(recipe, steps, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], t0: float) -> float:
    """Waits for the training; the seconds from ``t0`` to its end."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a training failed:\n{err.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - t0


def numbers(run: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="shapes/grpo_geneval")
    parser.add_argument("--a-steps", type=int, default=6)
    parser.add_argument("--b", default="shapes/grpo_ocr")
    parser.add_argument("--b-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from opdkit.study_jobs import available_cores

    cores = available_cores()
    jobs = [(args.a, args.a_steps), (args.b, args.b_steps)]
    print(f"A = {args.a} x {args.a_steps} steps, B = {args.b} x {args.b_steps} steps; {cores} cores")
    print(f"| round | A, B one at a time ({cores} threads) | A, B two at once (1 thread each) | as run | packed |")
    print("|---|---|---|---|---|")
    as_run, packed, same = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            walls: dict[str, list[float]] = {}
            for way in ("sequential", "parallel") if r % 2 == 0 else ("parallel", "sequential"):
                outs = [Path(tmp) / f"{way}{r}_{i}" for i in range(len(jobs))]
                if way == "sequential":
                    walls[way] = []
                    for (recipe, steps), out in zip(jobs, outs, strict=True):
                        t0 = time.perf_counter()
                        walls[way].append(finish(start(recipe, steps, out, cores), t0))
                else:
                    t0 = time.perf_counter()
                    procs = [start(recipe, steps, out, 1) for (recipe, steps), out in zip(jobs, outs, strict=True)]
                    ended: list[float] = [0.0] * len(procs)

                    def wait(i: int, t0: float = t0, procs: list = procs, ended: list = ended) -> None:
                        ended[i] = finish(procs[i], t0)

                    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(len(procs))]
                    for w in waiters:
                        w.start()
                    for w in waiters:
                        w.join()
                    walls[way] = ended
            for i in range(len(jobs)):
                same &= numbers(Path(tmp) / f"sequential{r}_{i}") == numbers(Path(tmp) / f"parallel{r}_{i}")
            seq, par = walls["sequential"], walls["parallel"]
            as_run.append(sum(seq) / max(par))
            packed.append(sum(seq) / (sum(par) / len(par)))
            print(f"| {r + 1} | {seq[0]:.1f} s, {seq[1]:.1f} s | {par[0]:.1f} s, {par[1]:.1f} s "
                  f"| {as_run[-1]:.2f}x | {packed[-1]:.2f}x |")  # fmt: skip
    print(f"\ntwo at once over one at a time: {min(as_run):.2f}-{max(as_run):.2f}x as run, "
          f"{min(packed):.2f}-{max(packed):.2f}x packed; same numbers both ways: {'yes' if same else 'NO'}")  # fmt: skip


if __name__ == "__main__":
    main()
