"""Results you can trust: one eval per results folder, torn JSONL lines repaired rather than glued
onto, duplicate rows counted once, results names that stay inside --out, leaderboard rows per
folder, and OS errors that name the file."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from opdkit.cli import app
from opdkit.errors import OpdkitError
from opdkit.eval.runner import run_eval
from opdkit.rundir import append_jsonl, atomic_write_text, naming_path, read_jsonl, repair_jsonl_tail

RUNNER = CliRunner()
BENCH = "shapes-quality"
# what a library's progress bar prints when stderr is not a terminal (in-process, the CLI's
# quieting of libraries at start-up comes too late for those already imported)
PROGRESS = re.compile(r"(\d+/\d+ .*eta|it/s\]|\[transformers\])")


def errors(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not a progress bar."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS.search(line)]


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "sco')  # killed in the middle of the third append
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, {"i": 2})
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_last_line_that_lost_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}')
    assert repair_jsonl_tail(path) is True
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n'
    assert repair_jsonl_tail(path) is False  # a whole file is left alone


@pytest.mark.parametrize("text", ['{"i": 0', "\x00\x00", '{"i": 0}\n\xff\xfe{"i"'])
def test_torn_tails_of_any_shape(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text.encode("latin-1"))
    complete = text[: text.rfind("\n") + 1]
    append_jsonl(path, {"i": 9})
    assert path.read_bytes() == complete.encode("latin-1") + b'{"i": 9}\n'


def test_a_long_torn_line_is_found_across_read_blocks(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    head = json.dumps({"pad": "x" * 200_000}) + "\n"
    path.write_text(head + '{"pad": "' + "y" * 150_000)
    append_jsonl(path, {"i": 1})
    assert read_jsonl(path) == [{"pad": "x" * 200_000}, {"i": 1}]


def test_os_errors_without_a_file_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        append_jsonl(tmp_path / "rows.jsonl", {"i": 0})
    assert info.value.filename == str(tmp_path / "rows.jsonl") and info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "summary.json", "{}")
    assert info.value.filename == str(tmp_path / "summary.json")  # not the .tmp file
    assert not list(tmp_path.glob(".*.tmp"))  # and the temporary file is gone


def test_named_os_errors_keep_their_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info, naming_path(tmp_path / "other"):
        (tmp_path / "missing" / "x").read_text()
    assert info.value.filename == str(tmp_path / "missing" / "x")


# -- the eval runner -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary

    config = ShapesModelConfig(patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16)
    return build_shapes_pipeline(tmp_path_factory.mktemp("models") / "tiny", shapes_vocabulary(), config, seed=0)


def evaluate(tiny: Path, out: Path, **options: Any) -> dict[str, Any]:
    """A small eval of the tiny model filed as ``m``; ``options`` override its arguments."""
    kwargs: dict[str, Any] = {"limit": 3, "samples": 2, "steps": 2, "batch_size": 4, "name": "m", **options}
    return run_eval(BENCH, str(tiny), out_dir=out, **kwargs)


def results(out: Path, name: str = "m") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, summary without its timing) of a finished eval."""
    summary = json.loads((out / name / f"{BENCH}.json").read_text())
    summary.pop("generation_seconds_this_run")
    return read_jsonl(out / name / f"{BENCH}.jsonl"), summary


def test_an_eval_refuses_a_folder_another_eval_holds(tiny: Path, tmp_path: Path) -> None:
    import fcntl

    folder = tmp_path / "res" / "m"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a") as held:  # what a running eval holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OpdkitError, match=f"^{folder}: another `opdkit eval` is writing to this results folder") as info:
            evaluate(tiny, tmp_path / "res")
        assert "\n" not in str(info.value)
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing read or written
    summary = evaluate(tiny, tmp_path / "res")  # the lock went with its holder
    assert summary["n_images"] == 6



def test_a_file_system_without_locks_warns_and_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some NFS and Lustre mounts refuse ``flock`` (ENOLCK): training, studies and evals go on
    unguarded, with a warning that names the lock file, rather than failing there."""
    import fcntl

    from opdkit.rundir import folder_lock

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    entered = []
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / ".lock")) + ": cannot lock it"):
        with folder_lock(tmp_path, "another process is here", "wait"):
            entered.append(True)
    assert entered == [True]

def test_two_evals_at_once_one_refuses_and_the_other_counts_right(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = ["eval", "--bench", BENCH, "--model", str(tiny), "--out", str(out), "--name", "m", "--limit", "24",
            "--samples", "2", "--steps", "60", "--batch-size", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("PYTEST_CURRENT_TEST", None)
    first = subprocess.Popen([sys.executable, "-m", "opdkit.cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    rows = out / "m" / f"{BENCH}.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (rows.exists() and rows.read_text().count("\n") >= 1):
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the first eval wrote no rows"
            time.sleep(0.01)
        second = RUNNER.invoke(app, args)
        still_running = first.poll() is None
        _, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert still_running, "the first eval finished before the second started: make it longer"
    assert second.exit_code == 1, second.output
    assert errors(second.stderr) == [
        f"error: {out / 'm'}: another `opdkit eval` is writing to this results folder (it holds {out / 'm' / '.lock'}); "
        "wait for it to finish, or pass another --out or --name"
    ]
    assert first.returncode == 0, err[-3000:]
    written, summary = results(out)
    assert len(written) == 48 and summary["n_images"] == 48
    assert {(r["prompt_index"], r["sample_index"]) for r in written} == {(i, s) for i in range(24) for s in range(2)}


def test_resume_over_a_torn_line_equals_an_uninterrupted_eval(tiny: Path, tmp_path: Path) -> None:
    evaluate(tiny, tmp_path / "whole")
    evaluate(tiny, tmp_path / "torn", limit=2)
    path = tmp_path / "torn" / "m" / f"{BENCH}.jsonl"
    whole_rows = (tmp_path / "whole" / "m" / f"{BENCH}.jsonl").read_text().splitlines(keepends=True)
    # killed while appending the fifth row: half of it on disk, no newline
    path.write_text("".join(whole_rows[:4]) + whole_rows[4][: len(whole_rows[4]) // 2])
    evaluate(tiny, tmp_path / "torn")
    assert results(tmp_path / "torn") == results(tmp_path / "whole")
    assert path.read_text() == "".join(whole_rows)  # the torn half is gone, nothing glued onto it
    evaluate(tiny, tmp_path / "torn")  # and it resumes again
    assert results(tmp_path / "torn") == results(tmp_path / "whole")


def test_duplicate_rows_count_once(tiny: Path, tmp_path: Path) -> None:
    reference = evaluate(tiny, tmp_path / "res")
    path = tmp_path / "res" / "m" / f"{BENCH}.jsonl"
    path.write_text(path.read_text() * 2)  # two evals that wrote the same images at once
    again = evaluate(tiny, tmp_path / "res")
    assert again["n_images"] == 6 and again["metrics"] == reference["metrics"]


def test_a_row_without_a_score_is_named_and_nothing_is_written(tiny: Path, tmp_path: Path) -> None:
    evaluate(tiny, tmp_path / "res", limit=2)
    path = tmp_path / "res" / "m" / f"{BENCH}.jsonl"
    rows = read_jsonl(path)
    del rows[1]["score"]  # a hand-edited file
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p: p.read_bytes() for p in (tmp_path / "res").rglob("*") if p.is_file()}
    with pytest.raises(OpdkitError, match=f"^{re.escape(str(path))}: record 2 has no numeric 'score' \\(got None\\)"):
        evaluate(tiny, tmp_path / "res")
    assert {p: p.read_bytes() for p in (tmp_path / "res").rglob("*") if p.is_file()} == before


def test_leftover_tmp_files_are_removed_when_an_eval_starts(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "res" / "m"
    folder.mkdir(parents=True)
    leftovers = [folder / f".{BENCH}.json.k2j3h4.tmp", folder / f".{BENCH}.settings.json.x9y8.tmp"]
    for leftover in leftovers:
        leftover.write_text("{half")
    (folder / "notes.txt").write_text("mine")
    evaluate(tiny, tmp_path / "res")
    assert not any(p.exists() for p in leftovers)
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../../x", "..", ".", "", "a/b", ".hidden", "a\nb"])
def test_a_name_that_would_leave_out_is_refused(tiny: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(OpdkitError, match="must be one plain folder name") as info:
        evaluate(tiny, tmp_path / "deep" / "res", name=name)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing created, inside or outside --out


@pytest.mark.parametrize("where", [".", "..", "../transformer/.."])
def test_a_model_given_as_dot_or_dotdot_is_filed_under_its_folder_name(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from opdkit.eval.leaderboard import load_results

    monkeypatch.chdir(tiny if where == "." else tiny / "transformer")
    before = sorted(p.name for p in tiny.parent.iterdir())
    out = tmp_path / "res"
    summary = run_eval(BENCH, where, out_dir=out, limit=1, samples=1, steps=2)
    assert summary["model"] == "tiny"
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]
    assert list(load_results(out)) == ["tiny"]  # where the leaderboard looks
    assert sorted(p.name for p in tiny.parent.iterdir()) == before  # nothing written beside the model
    assert not (tiny / BENCH).exists() and not (tiny / f"{BENCH}.json").exists()



def test_model_name_collisions_across_folders(tmp_path: Path) -> None:
    from opdkit.eval.leaderboard import run_leaderboard

    out = tmp_path / "res"
    for folder, value in (("m", 0.25), ("m-copy", 0.75)):
        (out / folder).mkdir(parents=True)
        summary = {"model": "m", "bench": BENCH, "family": "Quality", "world": "shapes", "metrics": {"overall": value}}
        (out / folder / f"{BENCH}.json").write_text(json.dumps(summary))
    markdown = run_leaderboard(out)
    assert "| m | 0.250 |" in markdown and "| m-copy/ (m) | **0.750** |" in markdown
    result = RUNNER.invoke(app, ["leaderboard", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"warning: model 'm' has results in 2 folders ({out / 'm'}, {out / 'm-copy'})" in result.stderr
    assert "m-copy/ (m)" in result.stdout
    shutil.rmtree(out / "m")
    result = RUNNER.invoke(app, ["leaderboard", str(out)], env={"COLUMNS": "200"})
    assert "warning" not in result.stderr and "m-copy/ (m)" in result.stdout


def test_compare_names_folders_and_refuses_an_ambiguous_model(tmp_path: Path) -> None:
    from opdkit.eval.compare import compare

    out = tmp_path / "res"
    rows = [{"prompt_index": p, "sample_index": 0, "score": 0.5} for p in range(3)]
    for folder, model in (("a", "a"), ("b1", "b"), ("b2", "b")):
        (out / folder).mkdir(parents=True)
        summary = {"model": model, "bench": BENCH, "family": "Quality", "seed": 0, "metrics": {"overall": 0.5}}
        (out / folder / f"{BENCH}.json").write_text(json.dumps(summary))
        (out / folder / f"{BENCH}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (difference,) = compare(out, "a", "b1")  # a folder name is exact
    assert difference.diff == 0.0
    with pytest.raises(OpdkitError, match=r"model 'b' has results in 2 folders \(b1, b2\); give the folder name"):
        compare(out, "a", "b")
    shutil.rmtree(out / "b2")
    (difference,) = compare(out, "a", "b")  # one folder holds model 'b': that one
    assert difference.n_prompts == 3
