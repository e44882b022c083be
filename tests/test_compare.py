"""`opdkit compare`: paired differences of two models' results, checked against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from opdkit.cli import app
from opdkit.errors import OpdkitError
from opdkit.eval.compare import compare

SAMPLER = {"steps": 20, "cfg": 3.0, "resolution": 32, "shift": None}


def write_result(root: Path, model: str, bench: str, family: str, scores: dict[tuple[int, str], list[float]], **extra: object) -> None:
    """A results/<model>/<bench>.{json,jsonl} pair whose overall follows ``family``'s rule."""
    rows = [
        {"prompt_index": p, "sample_index": s, "seed": s, "tag": tag, "score": x}
        for (p, tag), xs in sorted(scores.items())
        for s, x in enumerate(xs)
    ]
    if family == "GenEval":
        tags: dict[str, list[float]] = {}
        for (_, tag), xs in scores.items():
            tags.setdefault(tag, []).append(sum(xs) / len(xs))
        overall = sum(sum(v) / len(v) for v in tags.values()) / len(tags)
    else:
        overall = sum(r["score"] for r in rows) / len(rows)
    summary = {
        "model": model, "bench": bench, "family": family, "protocol": f"{bench}/v1", "engine": "e", "seed": 0,
        "sampler": SAMPLER, "n_prompts": len(scores), "n_images": len(rows), "limit": None,
        "metrics": {"overall": overall}, **extra,
    }  # fmt: skip
    (root / model).mkdir(parents=True, exist_ok=True)
    (root / model / f"{bench}.json").write_text(json.dumps(summary))
    (root / model / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_image_mean_difference_and_paired_error(tmp_path: Path) -> None:
    a = {(0, "ocr"): [1.0, 0.0], (1, "ocr"): [1.0, 1.0], (2, "ocr"): [0.5, 0.5]}
    b = {(0, "ocr"): [0.0, 0.0], (1, "ocr"): [1.0, 0.0], (2, "ocr"): [0.5, 0.5]}
    write_result(tmp_path, "a", "ocr", "OCR", a)
    write_result(tmp_path, "b", "ocr", "OCR", b)
    (d,) = compare(tmp_path, "a", "b")
    per_prompt = [0.5, 0.5, 0.0]  # means over samples of a - b
    mean = sum(per_prompt) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / 2)
    assert d.a - d.b == pytest.approx(d.diff) and d.diff == pytest.approx(mean)
    assert d.stderr == pytest.approx(sd / math.sqrt(3)) and d.n_prompts == 3
    assert d.interval == pytest.approx((mean - 1.96 * d.stderr, mean + 1.96 * d.stderr))


def test_geneval_overall_is_a_mean_over_tags(tmp_path: Path) -> None:
    # one two-prompt tag and one three-prompt tag: an image mean would weight them 2:3
    a = {(0, "single"): [1.0], (1, "single"): [1.0], (2, "count"): [1.0], (3, "count"): [0.0], (4, "count"): [0.0]}
    b = {(0, "single"): [0.0], (1, "single"): [1.0], (2, "count"): [0.0], (3, "count"): [0.0], (4, "count"): [0.0]}
    write_result(tmp_path, "a", "gen", "GenEval", a)
    write_result(tmp_path, "b", "gen", "GenEval", b)
    (d,) = compare(tmp_path, "a", "b")
    assert d.diff == pytest.approx((0.5 + 1 / 3) / 2)  # (tag single: +0.5, tag count: +1/3) / 2 tags
    var_single = ((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1
    var_count = ((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2
    assert d.stderr == pytest.approx(math.sqrt(var_single / 2 + var_count / 3) / 2)


def test_unpaired_or_unknown_results_are_refused(tmp_path: Path) -> None:
    scores = {(0, "ocr"): [1.0, 0.0], (1, "ocr"): [0.5, 0.5]}
    write_result(tmp_path, "a", "ocr", "OCR", scores)
    write_result(tmp_path, "b", "ocr", "OCR", scores, seed=1)
    with pytest.raises(OpdkitError, match="differ in seed"):
        compare(tmp_path, "a", "b")
    write_result(tmp_path, "c", "ocr", "OCR", {(0, "ocr"): [1.0, 0.0], (1, "ocr"): [0.5]}, n_images=4)
    with pytest.raises(OpdkitError, match="different images"):
        compare(tmp_path, "a", "c")
    write_result(tmp_path, "d", "ocr", "OCR", scores, metrics={"overall": 0.1})
    with pytest.raises(OpdkitError, match="not the mean of its rows"):
        compare(tmp_path, "a", "d")
    with pytest.raises(OpdkitError, match="no results for model 'e'"):
        compare(tmp_path, "a", "e")
    with pytest.raises(OpdkitError, match=r"do not both have results for \['gen'\]"):
        compare(tmp_path, "a", "b", ["gen"])


def test_cli_prints_the_difference(tmp_path: Path) -> None:
    write_result(tmp_path, "a", "ocr", "OCR", {(0, "ocr"): [1.0], (1, "ocr"): [1.0]})
    write_result(tmp_path, "b", "ocr", "OCR", {(0, "ocr"): [0.0], (1, "ocr"): [0.5]})
    result = CliRunner().invoke(app, ["compare", "a", "b", "--results", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "ocr" in line)
    assert "+0.750" in row and "1.000" in row and "0.250" in row
    bad = CliRunner().invoke(app, ["compare", "a", "zz", "--results", str(tmp_path)])
    assert bad.exit_code != 0 and "no results for model 'zz'" in bad.output


def test_results_of_other_prompt_lists_are_not_paired(tmp_path: Path) -> None:
    """Rows are paired by prompt index: results of two prompt files hold other prompts there."""
    scores = {(0, "t"): [1.0], (1, "t"): [0.5]}
    for model, prompts in (("a", ["a cat", "a dog"]), ("b", ["a cat", "a dog"]), ("c", ["a dog", "a cat"])):
        write_result(tmp_path, model, "pick", "Preference", scores)
        path = tmp_path / model / "pick.jsonl"
        rows = [{**json.loads(line), "prompt": prompts[i]} for i, line in enumerate(path.read_text().splitlines())]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare(tmp_path, "a", "b")[0].diff == 0.0
    with pytest.raises(OpdkitError, match="different prompt lists \\(prompt 0: 'a cat' against 'a dog'\\)"):
        compare(tmp_path, "a", "c")


def test_rows_beyond_a_smaller_limit_are_not_compared(tmp_path: Path) -> None:
    """A full eval, then a --limit 2 rerun: the summary counts two prompts, the file keeps all three."""
    scores_a = {(0, "t"): [1.0], (1, "t"): [0.5]}
    scores_b = {(0, "t"): [0.0], (1, "t"): [0.5]}
    for model, scores in (("a", scores_a), ("b", scores_b)):
        write_result(tmp_path, model, "ocr", "OCR", scores, limit=2)
    extra = {"prompt_index": 2, "sample_index": 0, "seed": 0, "tag": "t", "score": 0.25}
    with (tmp_path / "a" / "ocr.jsonl").open("a") as rows:  # only the first model was evaluated in full
        rows.write(json.dumps(extra) + "\n")
    (d,) = compare(tmp_path, "a", "b")
    assert d.n_prompts == 2 and d.diff == pytest.approx(0.5)
    with (tmp_path / "b" / "ocr.jsonl").open("a") as rows:
        rows.write(json.dumps(extra) + "\n")
    assert compare(tmp_path, "a", "b")[0].n_prompts == 2


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda s, rows: (s, rows.replace('"score": 0.5', '"scor": 0.5', 1)), "ocr.jsonl: record 2 has no numeric 'score' (got None)"),
        (lambda s, rows: (s, "[1, 2]\n"), "ocr.jsonl: record 1 is not a result row"),
        (lambda s, rows: ({**s, "metrics": None}, rows), "ocr.json: metrics: expected an object of metric values (got null)"),
        (lambda s, rows: ({**s, "metrics": {"overall": "high"}}, rows), "the first model's overall (high) is not the mean"),
        (lambda s, rows: ({**s, "n_prompts": "two"}, rows), "ocr.json: n_prompts is 'two', expected a whole number >= 0"),
    ],
    ids=["row-without-score", "rows-not-objects", "metrics-null", "overall-not-a-number", "n-prompts-not-a-number"],
)
def test_a_damaged_result_file_is_one_line_naming_it(tmp_path: Path, damage: Any, expected: str) -> None:
    scores = {(0, "ocr"): [1.0], (1, "ocr"): [0.5]}
    write_result(tmp_path, "a", "ocr", "OCR", scores)
    write_result(tmp_path, "b", "ocr", "OCR", scores)
    summary, rows = damage(json.loads((tmp_path / "a" / "ocr.json").read_text()), (tmp_path / "a" / "ocr.jsonl").read_text())
    (tmp_path / "a" / "ocr.json").write_text(json.dumps(summary))
    (tmp_path / "a" / "ocr.jsonl").write_text(rows)
    result = CliRunner().invoke(app, ["compare", "a", "b", "--results", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
