"""``opdkit study --jobs N``: a study's rows run N at a time, each in a process of its own.

Why processes: on the 2-core CPU two single-threaded processes do 1.15-1.30x the work of one
process at two threads (``perf/study_jobs.py`` measures it), and with several
GPUs every row gets a GPU of its own. The numbers do not change: a child runs the very function
the sequential study runs (:func:`opdkit.study.run_row`), and on a CPU a row's training and
evaluation do not depend on the thread count (``tests/test_study.py`` compares both ways).

Scheduling: rows start in file order as slots free up; a row waits until every row its
``teachers`` name has finished. A failed row stops the rows that distil it; the others go on, and
the study then fails with one line per failed or skipped row naming its log. A child's output
goes to ``OUT/logs/ROW.log`` (appended, so a resumed study keeps the earlier attempt's output)
and what it did to ``OUT/logs/ROW.json``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from opdkit.errors import OpdkitError
from opdkit.study import (
    LoadedStudy,
    Row,
    finish_study,
    read_json_object,
    row_label,
    row_summary,
    row_work,
    run_row,
    study_lock,
    train_state,
)


def logs_dir(study: LoadedStudy) -> Path:
    return study.out / "logs"


def run_study_in_processes(study: LoadedStudy, jobs: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """:func:`opdkit.study.run_study` with up to ``jobs`` rows at once; the same table."""
    t0 = time.perf_counter()
    with study_lock(study):
        timings = run_rows_in_processes(study, jobs, echo)
        return finish_study(study, timings, t0, echo, jobs=jobs)


def run_rows_in_processes(
    study: LoadedStudy, jobs: int, echo: Callable[[str], None], status_every_s: float = 300.0
) -> list[dict[str, Any]]:
    """Every row of the study, up to ``jobs`` at once in child processes; returns each row's
    timing entry (as :func:`opdkit.study.run_row` returns it), in the study's row order. While
    rows run, a line every ``status_every_s`` seconds says how far each got."""
    for row in study.rows:  # a folder of another recipe or base is refused before anything starts
        if row.loaded is not None:
            train_state(study, row)
    logs = logs_dir(study)
    logs.mkdir(parents=True, exist_ok=True)
    threads = child_threads(jobs)
    devices = child_devices()
    pending = list(study.rows)
    running: dict[str, tuple[Row, subprocess.Popen[bytes], int, TextIO]] = {}
    free_slots = list(range(jobs))
    done: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}  # row -> why
    exits: queue.Queue[tuple[str, int]] = queue.Queue()
    try:
        while pending or running:
            for row in list(pending):
                needs = set(row.spec.teachers.values())
                lost = sorted(needs & failed.keys())
                if lost:
                    pending.remove(row)
                    failed[row.name] = f"not run: it distils {', '.join(lost)}, which failed"
                    echo(f"{row_label(study, row)}: {failed[row.name]}")
                elif needs <= done.keys() and not _has_work(study, row):  # no process for a row that is done
                    pending.remove(row)
                    done[row.name] = run_row(study, row, echo)
                elif needs <= done.keys() and free_slots:
                    pending.remove(row)
                    slot = free_slots.pop(0)
                    device = devices[slot % len(devices)] if devices else None
                    proc, log = _start_child(study, row, threads, device, exits)
                    running[row.name] = (row, proc, slot, log)
                    on = f", GPU {device}" if device is not None else ""
                    echo(f"{row_label(study, row)}: started ({threads} thread{'s' if threads > 1 else ''}{on}); "
                         f"output in {logs / (row.name + '.log')}")  # fmt: skip
            if not running:
                break
            try:
                name, code = exits.get(timeout=status_every_s)
            except queue.Empty:  # a long row: say where the running ones are
                echo("running: " + "; ".join(_progress(study, r) for r, *_ in running.values()))
                continue
            row, proc, slot, log = running.pop(name)
            log.close()
            free_slots.append(slot)
            free_slots.sort()
            timing = read_json_object(logs / f"{name}.json") if code == 0 else None
            if timing is None:
                failed[name] = f"failed (exit {code}): {_last_line(logs / (name + '.log'))}; log {logs / (name + '.log')}"
                echo(f"{row_label(study, row)}: {failed[name]}")
            else:
                done[name] = timing
                echo(row_summary(row_label(study, row), timing))
    finally:
        for _, proc, _, log in running.values():  # interrupted: stop the children (their runs resume)
            proc.terminate()
            proc.wait()
            log.close()
    if failed:
        raise OpdkitError("\n".join(f"{study.path}: row {name}: {why}" for name, why in failed.items()))
    return [done[row.name] for row in study.rows]


def _start_child(
    study: LoadedStudy, row: Row, threads: int, device: str | None, exits: queue.Queue[tuple[str, int]]
) -> tuple[subprocess.Popen[bytes], TextIO]:
    """``opdkit study FILE --out OUT [--set ...] --row NAME`` with its output in the row's log."""
    command = [sys.executable, "-m", "opdkit.cli", "study", str(study.path), "--out", str(study.out)]
    for override in study.overrides:
        command += ["--set", override]
    command += ["--row", row.name]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    (logs_dir(study) / f"{row.name}.json").unlink(missing_ok=True)  # an earlier attempt's account
    log = (logs_dir(study) / f"{row.name}.log").open("a", encoding="utf-8")
    log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    threading.Thread(target=lambda: exits.put((row.name, proc.wait())), daemon=True).start()
    return proc, log


def run_one_row(study: LoadedStudy, name: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """The child's side: train and evaluate row ``name``, then write ``OUT/logs/NAME.json``."""
    from opdkit.rundir import atomic_write_json

    rows = {row.name: row for row in study.rows}
    if name not in rows:
        raise OpdkitError(f"{study.path}: --row {name!r} is no row (rows: {', '.join(rows)})")
    row = rows[name]
    for other in row.spec.teachers.values():
        if rows[other].loaded is None:  # a model row: its weights exist as they are, nothing to wait for
            continue
        state = train_state(study, rows[other])
        if state.status != "finished":
            raise OpdkitError(f"{study.path}: row {name} distils row {other}, whose run is {state.status}; train it first")
    timing = run_row(study, row, echo)
    atomic_write_json(logs_dir(study) / f"{name}.json", timing)
    return timing


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def child_threads(jobs: int) -> int:
    """Threads per child: this process's share of the cores (``OMP_NUM_THREADS`` if set, else
    :func:`available_cores`), split evenly, at least one."""
    total = 0
    try:
        total = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        pass
    return max(1, (total if total >= 1 else available_cores()) // jobs)


def child_devices() -> list[str]:
    """The GPUs children are spread over (as ``CUDA_VISIBLE_DEVICES`` values): every visible one
    when there are two or more; none (children share what they see) otherwise."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return []
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _has_work(study: LoadedStudy, row: Row) -> bool:
    """Whether the row still trains or evaluates anything (what :func:`opdkit.study.run_row` would do)."""
    return any(state != "current" for state in row_work(study, row)[1].values())


def _progress(study: LoadedStudy, row: Row) -> str:
    """``grpo_ocr step 312/800``, from the run's last logged step; ``base evaluating`` otherwise."""
    from opdkit.rundir import read_jsonl
    from opdkit.runs import finished_step

    if row.loaded is not None and row.run_dir is not None:
        records = read_jsonl(row.run_dir / "metrics.jsonl")
        total = row.loaded.recipe.train.max_steps
        step = int(records[-1].get("step", 0)) if records else 0
        if step < total or finished_step(row.run_dir) is None:
            return f"{row.name} step {step}/{total}"
    return f"{row.name} evaluating"


def _last_line(path: Path) -> str:
    """The last non-empty line of a log: where a one-line error ends up."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line]
    return lines[-1] if lines else "(empty log)"
