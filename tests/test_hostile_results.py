"""A careless or hostile user against `opdkit eval` / `merge` / `leaderboard` / `compare`: every bad
input is one clean error line naming what is wrong, exit code 1, no traceback, and every file that
existed before the call is byte-identical after it (ranges, names, a folder another eval holds,
damaged results files, the OS)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from opdkit.cli import app

RUNNER = CliRunner()
BENCH = "shapes-quality"
MODEL = "shapes-base"
EVAL = ("eval", "--bench", BENCH, "--model", MODEL, "--limit", "1", "--samples", "1", "--out", "res")
MERGE = ("merge", "t0.safetensors", "t1.safetensors", "--out", "merged.safetensors")
# What a library's progress bar prints when stderr is not a terminal (in-process, the CLI's
# quieting of libraries comes too late for those the test session imported already)
PROGRESS = re.compile(r"(\d+/\d+ .*eta|it/s\]|\[transformers\])")


@dataclass(frozen=True)
class Case:
    """One bad call: ``args`` as typed; ``expected`` a substring of the one error line. ``setup(tmp,
    earlier)`` prepares the folder before the snapshot (``earlier``: the results folder of a real
    ``EVAL``) and may return something to keep alive during the call (a held lock); ``patch``
    changes the process for the call (a full disk)."""

    id: str
    args: tuple[str, ...]
    expected: str
    setup: Callable[[Path, Path], Any] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def earlier(tmp: Path, results: Path) -> None:
    """The results of an earlier ``EVAL`` in ``res`` (a copy of one made once for the module)."""
    shutil.copytree(results, tmp / "res")


def damage(name: str, text: str, keep: bool = False) -> Callable[[Path, Path], None]:
    """Earlier results whose ``name`` file holds ``text`` (before its own text when ``keep``)."""

    def setup(tmp: Path, results: Path) -> None:
        earlier(tmp, results)
        path = tmp / "res" / MODEL / name
        path.write_text(text + (path.read_text() if keep else ""))

    return setup


def held_lock(tmp: Path, results: Path) -> Any:
    """A folder another eval is writing: its lock held (here, by the test process)."""
    folder = tmp / "res" / MODEL
    folder.mkdir(parents=True)
    handle = open(folder / ".lock", "a")  # kept open for the call
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def a_file(name: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, results: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text("not a folder\n")

    return setup


def a_folder(name: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, results: Path) -> None:
        (tmp / name).mkdir(parents=True)

    return setup


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def adapters(tmp: Path, results: Path | None = None) -> None:
    import torch

    from opdkit.models.lora import LoraFile, write_lora

    for i in range(2):
        g = torch.Generator().manual_seed(i)
        factors = {"blocks.0.attn.to_q": (torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g))}
        write_lora(LoraFile(factors, 2, 4.0, ["to_q"]), tmp / f"t{i}.safetensors")


def same_model_in_two_folders(tmp: Path, results: Path) -> None:
    for folder, model in (("a", "a"), ("b1", "b"), ("b2", "b")):
        (tmp / "res" / folder).mkdir(parents=True)
        summary = {"model": model, "bench": BENCH, "family": "Quality", "seed": 0, "metrics": {"overall": 0.5}}
        (tmp / "res" / folder / f"{BENCH}.json").write_text(json.dumps(summary))
        (tmp / "res" / folder / f"{BENCH}.jsonl").write_text(json.dumps({"prompt_index": 0, "sample_index": 0, "score": 0.5}) + "\n")


CASES = [
    # counts and numbers: refused before any model is loaded
    Case("samples-zero", (*EVAL, "--samples", "0"), "--samples 0: expected a whole number >= 1"),
    Case("samples-negative", (*EVAL, "--samples", "-1"), "--samples -1: expected a whole number >= 1"),
    Case("steps-zero", (*EVAL, "--steps", "0"), "--steps 0: expected a whole number >= 1"),
    Case("limit-zero", (*EVAL, "--limit", "0"), "--limit 0: expected a whole number >= 1"),
    Case("limit-negative", (*EVAL, "--limit", "-1"), "--limit -1: expected a whole number >= 1"),
    Case("batch-size-zero", (*EVAL, "--batch-size", "0"), "--batch-size 0: expected a whole number >= 1"),
    Case("cfg-nan", (*EVAL, "--cfg", "nan"), "--cfg nan: expected a finite number"),
    Case("cfg-negative", (*EVAL, "--cfg", "-1"), "--cfg -1.0: expected a number in [0, inf)"),
    Case("cfg-nan-over-earlier-results", (*EVAL, "--cfg", "nan"), "--cfg nan: expected a finite number", setup=earlier),
    # names that would leave --out, or land where the leaderboard does not look
    Case("name-escapes", (*EVAL, "--name", "../../x"), "--name '../../x': results go to --out/NAME"),
    Case("name-dotdot", (*EVAL, "--name", ".."), "--name '..': results go to --out/NAME"),
    Case("name-dot", (*EVAL, "--name", "."), "('.' is not a folder of its own)"),
    Case("name-empty", (*EVAL, "--name", ""), "(it is empty)"),
    Case("name-with-slash", (*EVAL, "--name", "a/b"), "(it contains '/')"),
    Case("name-hidden", (*EVAL, "--name", ".lock"), "(it starts with '.', which hides the folder)"),
    # a folder another eval is writing
    Case("folder-held-by-another-eval", EVAL, "another `opdkit eval` is writing to this results folder", setup=held_lock),
    # damaged or mismatched results
    Case("settings-not-json", EVAL, "shapes-quality.settings.json: unreadable settings file", setup=damage(f"{BENCH}.settings.json", "{half")),
    Case("settings-not-an-object", EVAL, "unreadable settings file (not a JSON object)", setup=damage(f"{BENCH}.settings.json", "[1, 2]")),
    Case("rows-corrupt-line", EVAL, f"{BENCH}.jsonl:1: corrupt JSON line", setup=damage(f"{BENCH}.jsonl", "garbage\n", keep=True)),
    Case("rows-not-result-rows", EVAL, "record 1 is not a result row", setup=damage(f"{BENCH}.jsonl", '{"x": 1}\n')),
    Case("other-settings", (*EVAL, "--cfg", "5"), "earlier results used other settings (cfg)", setup=earlier),
    # the OS
    Case("out-is-a-file", EVAL, "res: --out is a file, not a folder", setup=a_file("res")),
    Case("out-below-a-file", (*EVAL, "--out", "res/inner"), f"res/inner/{MODEL}: Not a directory", setup=a_file("res")),
    Case("out-not-writable", (*EVAL, "--out", "/sys/opdkit-results"), "/sys/opdkit-results: "),
    Case("lock-is-a-folder", EVAL, f"res/{MODEL}/.lock: Is a directory", setup=a_folder(f"res/{MODEL}/.lock")),
    Case("disk-full", EVAL, f"res/{MODEL}/{BENCH}.settings.json: No space left on device", setup=earlier, patch=disk_full),
    # merge
    Case("merge-weight-nan", (*MERGE, "--method", "weighted", "--weights", "nan,1"), "--weights nan,1: expected finite numbers", setup=adapters),
    Case("merge-weight-inf", (*MERGE, "--method", "ties", "--weights", "1,-inf"), "--weights 1,-inf: expected finite numbers", setup=adapters),
    Case("merge-rank-zero", (*MERGE, "--rank", "0"), "--rank 0: expected a whole number >= 1", setup=adapters),
    Case("merge-rank-negative", (*MERGE, "--rank", "-3"), "--rank -3: expected a whole number >= 1", setup=adapters),
    Case("merge-density-zero", (*MERGE, "--method", "ties", "--density", "0"), "--density 0.0: expected a number in (0, 1]", setup=adapters),
    Case("merge-density-above-one", (*MERGE, "--method", "ties", "--density", "1.5"), "--density 1.5: expected a number in (0, 1]", setup=adapters),
    Case("merge-density-nan", (*MERGE, "--method", "ties", "--density", "nan"), "--density nan: expected a finite number", setup=adapters),
    Case("merge-out-is-a-folder", MERGE, "merged.safetensors: Is a directory", setup=lambda tmp, results: (adapters(tmp), a_folder("merged.safetensors")(tmp, results))),
    # leaderboard and compare
    Case("compare-ambiguous-model", ("compare", "a", "b", "--results", "res"), "model 'b' has results in 2 folders (b1, b2)", setup=same_model_in_two_folders),
    Case("leaderboard-of-a-file", ("leaderboard", "res"), "res: no such results directory", setup=a_file("res")),
    Case("leaderboard-out-not-md-or-html", ("leaderboard", "res", "--out", "table.pdf"), "--out table.pdf: expected a .md or .html file name"),
    # a study's --out
    Case("study-out-is-a-file", ("study", "shapes/study", "--out", "res"), "res: --out is a file, not a folder", setup=a_file("res")),
    Case("study-plan-out-is-a-file", ("study", "shapes/study", "--out", "res", "--dry-run"), "res: --out is a file, not a folder", setup=a_file("res")),
    Case("leaderboard-broken-summary", ("leaderboard", "res"), f"{BENCH}.json: not a valid result file", setup=damage(f"{BENCH}.json", "{half")),
]  # fmt: skip



@pytest.fixture(scope="module")
def earlier_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of one real ``EVAL``, which the cases needing earlier results copy."""
    root = tmp_path_factory.mktemp("earlier")
    result = RUNNER.invoke(app, [*EVAL[:-1], str(root / "res")])
    assert result.exit_code == 0, result.output
    return root / "res"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_enough_cases() -> None:
    assert 25 <= len(CASES) <= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_clean_line_and_changes_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier_results: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    kept = case.setup(tmp_path, earlier_results) if case.setup is not None else None
    before = snapshot(tmp_path)
    try:
        with monkeypatch.context() as patched:
            if case.patch is not None:
                case.patch(patched)
            result = RUNNER.invoke(app, list(case.args), env={"COLUMNS": "200"})
    finally:
        if hasattr(kept, "close"):
            kept.close()

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout.strip() == ""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.expected in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing present was changed
    assert not [k for k in after if k.endswith(".tmp")]  # and no half-written file is left behind
