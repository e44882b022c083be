"""``opdkit leaderboard``: column layout, best values, arrows, engine notes, Markdown, HTML (curves,
grids, self-contained) and the page in a real headless browser (Debian chromium, where installed)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from opdkit.cli import app
from opdkit.errors import OpdkitError
from opdkit.eval.curves import curve_series, find_runs
from opdkit.eval.leaderboard import (
    GENEVAL_COLUMNS,
    columns_for,
    load_results,
    run_leaderboard,
    to_html,
    to_markdown,
)

RUNNER = CliRunner()
WIDE = {"COLUMNS": "250", "NO_COLOR": "1"}
SHAPES_MODELS = ("shapes-base", "shapes-grpo-geneval", "shapes-grpo-ocr", "shapes-grpo-mix", "shapes-opd")


def geneval_metrics(base: float) -> dict[str, float]:
    tags = {"single_object": min(1.0, base + 0.3), "two_object": base + 0.1, "counting": base, "colors": base + 0.2, "position": base - 0.1, "color_attr": base - 0.05}
    return {**tags, "overall": sum(tags.values()) / 6}


def write_result(root: Path, model: str, bench: str, metrics: dict[str, float], **extra: Any) -> None:
    family = {"geneval": "GenEval", "shapes-geneval": "GenEval", "ocr": "OCR", "shapes-ocr": "OCR"}.get(bench, "Quality")
    summary = {
        "model": model,
        "bench": bench,
        "family": family,
        "protocol": f"{bench}-protocol/1",
        "engine": {"geneval": "mask2former (m2f) + clip (clip)", "ocr": "rapidocr (PP-OCRv4 onnx)"}.get(bench, f"{bench}-engine"),
        "n_images": 40,
        "limit": None,
        "seed": 0,
        "world": "sd3" if bench in ("geneval", "ocr") else "shapes",
        "sampler": {"steps": 20, "cfg": 3.0, "resolution": 32, "shift": None},
        "metrics": metrics,
        "higher_is_better": True,
        "stderr": 0.01,
        **extra,
    }
    (root / model).mkdir(parents=True, exist_ok=True)
    (root / model / f"{bench}.json").write_text(json.dumps(summary))


def write_grid(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    image = np.zeros((64, 128, 3), dtype=np.uint8)
    image[:, :64] = colour
    Image.fromarray(image).save(path)


def write_run(root: Path, name: str, kind: str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 31):
            if kind == "grpo":
                row = {"step": step, "reward": 1 - math.exp(-step / 10), "reward_std": 0.2, "reward/shapes_geneval/mean": 0.9 - math.exp(-step / 8), "reward/shapes_geneval/std": 0.1, "kl": 0.002 * step, "loss": 0.1}
            elif kind == "opd":
                row = {"step": step, "kl": 1 / step, "mar_kl": 0.01 * step, "loss": 0.5}
            else:
                row = {"step": step, "loss": 1 / step, "grad_norm": 1.0}
            fh.write(json.dumps(row) + "\n")
    return run


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """results/ with the shapes-world line-up, an SD3.5 model on a --limit subset, and runs/ beside it."""
    root = tmp_path / "results"
    for i, model in enumerate(SHAPES_MODELS):
        write_result(root, model, "shapes-geneval", geneval_metrics(0.4 + 0.1 * i))
        write_result(root, model, "shapes-ocr", {"overall": [0.3, 0.4, 0.9, 0.7, 0.85][i]})
        write_result(root, model, "shapes-quality", {"overall": [0.6, 0.5, 0.55, 0.62, 0.7][i], "ocr": 0.5})
        write_result(root, model, "drift", {"overall": [0.2, 0.3, 0.25, 0.1, 0.15][i]}, family="Other", higher_is_better=False)
        write_grid(root / model / "shapes-geneval.grid.png", (40 * i, 200, 100))
    write_result(root, "sd35m", "geneval", geneval_metrics(0.5), limit=8)
    write_result(root, "sd35m", "ocr", {"overall": 0.59, "exact": 0.3})
    # an unrelated JSON file and a settings file are ignored
    (root / "sd35m" / "geneval.settings.json").write_text(json.dumps({"bench": "geneval", "metrics": {}}))
    (root / "notes.json").write_text("{}")
    runs = tmp_path / "runs"
    write_run(runs, "shapes-grpo-geneval", "grpo")
    write_run(runs, "shapes-opd", "opd")
    write_run(runs / "pretraining", "shapes-pretrain", "pretrain")
    return root


def test_columns_grouped_by_family_in_order(results: Path) -> None:
    cols = columns_for(load_results(results))
    assert [(c.bench, c.metric) for c in cols] == [
        *[("geneval", key) for key, _ in GENEVAL_COLUMNS],
        *[("shapes-geneval", key) for key, _ in GENEVAL_COLUMNS],
        ("ocr", "overall"),
        ("shapes-ocr", "overall"),
        ("drift", "overall"),
        ("shapes-quality", "overall"),
    ]
    assert [c.title for c in cols[:7]] == ["geneval Overall", "Single", "Two", "Counting", "Colors", "Position", "Attr. binding"]


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """``{heading: rows of cells}`` of every table in the Markdown (heading "" before the first)."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line[4:]
        elif line.startswith("|"):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


def test_markdown_table_per_world_best_bold_arrows_engines(results: Path) -> None:
    text = to_markdown(load_results(results))
    tables = markdown_tables(text)
    assert list(tables) == ["SD3 world", "Shapes world"]  # sd3 first, each world its own table
    sd3, shapes = tables["SD3 world"], tables["Shapes world"]
    assert sd3[0] == ["Model", "geneval Overall ↑", "Single ↑", "Two ↑", "Counting ↑", "Colors ↑", "Position ↑", "Attr. binding ↑", "ocr ↑"]
    assert sd3[1][:2] == ["---", "---:"]
    # a single model in a column is not "best" of anything; a --limit subset is marked
    assert sd3[2][:2] == ["sd35m", f"{geneval_metrics(0.5)['overall']:.3f}†"] and sd3[2][-1] == "0.590"
    header = shapes[0]
    assert header[1] == "shapes-geneval Overall ↑" and header[-2:] == ["drift ↓", "shapes-quality ↑"]
    rows = {r[0]: r for r in shapes[2:]}
    assert list(rows) == sorted(SHAPES_MODELS)
    col = header.index("shapes-ocr ↑")
    assert rows["shapes-grpo-ocr"][col] == "**0.900**"  # best of the column
    assert rows["shapes-base"][col] == "0.300"
    drift = header.index("drift ↓")
    assert rows["shapes-grpo-mix"][drift] == "**0.100**"  # lower is better: the minimum is best
    # shapes-geneval overall grows with the model index: shapes-opd (i = 4) is best
    assert rows["shapes-opd"][1].startswith("**") and not rows["shapes-base"][1].startswith("**")
    assert "- `geneval`: engine mask2former (m2f) + clip (clip), protocol geneval-protocol/1" in text
    assert "- `ocr`: engine rapidocr (PP-OCRv4 onnx)" in text
    assert "† computed on a subset" in text


def test_single_world_markdown_has_no_heading(results: Path) -> None:
    only_shapes = {m: b for m, b in load_results(results).items() if m != "sd35m"}
    text = to_markdown(only_shapes)
    assert text.startswith("| Model | shapes-geneval Overall ↑ |") and "###" not in text


def test_mixed_engines_are_named_per_model(results: Path) -> None:
    write_result(results, "other", "shapes-ocr", {"overall": 0.5}, engine="another-ocr")
    text = to_markdown(load_results(results))
    assert "engine another-ocr, protocol shapes-ocr-protocol/1 (models: other)" in text
    assert "(models: shapes-base, shapes-grpo-geneval, shapes-grpo-mix, shapes-grpo-ocr, shapes-opd)" in text


def test_results_of_other_settings_are_ranked_in_columns_of_their_own(results: Path) -> None:
    fast = {"sampler": {"steps": 2, "cfg": 3.0, "resolution": 32, "shift": None}}
    write_result(results, "fast-a", "shapes-ocr", {"overall": 0.95}, **fast)
    write_result(results, "fast-b", "shapes-ocr", {"overall": 0.96}, **fast)
    write_result(results, "fast-b", "shapes-geneval", geneval_metrics(0.95), **fast)
    write_result(results, "seed5", "shapes-ocr", {"overall": 0.97}, seed=5)
    write_result(results, "trainsplit", "shapes-ocr", {"overall": 0.99}, protocol="shapes-ocr-protocol/train")
    loaded = load_results(results)
    shapes = markdown_tables(to_markdown(loaded))["Shapes world"]
    header = shapes[0]
    ocr = [title for title in header if title.startswith("shapes-ocr")]
    assert ocr == ["shapes-ocr ↑", "shapes-ocr (protocol shapes-ocr-protocol/train) ↑", "shapes-ocr (seed=5) ↑",
                   "shapes-ocr (steps=2) ↑"]  # fmt: skip
    rows = {r[0]: dict(zip(header, r, strict=True)) for r in shapes[2:]}
    # the usual settings' best is still the best of the results made with them
    assert rows["shapes-grpo-ocr"]["shapes-ocr ↑"] == "**0.900**" and rows["fast-b"]["shapes-ocr ↑"] == "-"
    assert rows["fast-b"]["shapes-ocr (steps=2) ↑"] == "**0.960**" and rows["fast-a"]["shapes-ocr (steps=2) ↑"] == "0.950"
    assert rows["trainsplit"]["shapes-ocr (protocol shapes-ocr-protocol/train) ↑"] == "0.990"  # alone: no best
    assert rows["seed5"]["shapes-ocr (seed=5) ↑"] == "0.970"
    assert "shapes-geneval (steps=2) Overall ↑" in header and rows["fast-b"]["shapes-geneval Overall ↑"] == "-"
    page = to_html(loaded, results)
    assert '<th colspan="1">OCR · shapes-ocr (steps=2)</th>' in page
    assert '<th colspan="7">GenEval · shapes-geneval (steps=2)</th>' in page
    bold = [cell for table in markdown_tables(to_markdown(loaded)).values() for row in table for cell in row if cell.startswith("**")]
    assert page.count('class="best"') == len(bold)  # the page bolds what the Markdown does


def test_a_copy_of_a_summary_beside_it_is_skipped_with_a_warning(results: Path) -> None:
    live = results / "shapes-base" / "shapes-ocr.json"
    backup = json.loads(live.read_text())
    backup["metrics"]["overall"] = 0.99
    # sorted after the live file, so a last-read-wins loader would show the copy's value
    (results / "shapes-base" / "shapes-ocr.old.json").write_text(json.dumps(backup))
    assert load_results(results)["shapes-base"]["shapes-ocr"]["metrics"]["overall"] == 0.3
    result = RUNNER.invoke(app, ["leaderboard", str(results)], env=WIDE)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "warning: skipped 1 file not named after the benchmark they record (a copy?): "
        f"{results / 'shapes-base' / 'shapes-ocr.old.json'}"
    ]
    assert "0.990" not in result.stdout


def test_curve_series_picks_reward_and_kl_or_loss(results: Path) -> None:
    from opdkit.rundir import read_jsonl

    runs = find_runs(results.parent / "runs")
    # directly under runs/ or one level deeper, sorted by path
    assert [r.name for r in runs] == ["shapes-pretrain", "shapes-grpo-geneval", "shapes-opd"]
    by_name = {r.name: curve_series(read_jsonl(r / "metrics.jsonl")) for r in runs}
    grpo = by_name["shapes-grpo-geneval"]
    assert set(grpo) == {"reward", "kl"}
    assert set(grpo["reward"]) == {"reward", "reward/shapes_geneval/mean"} and set(grpo["kl"]) == {"kl"}
    assert grpo["kl"]["kl"][0] == (1.0, 0.002)
    assert set(by_name["shapes-opd"]) == {"kl"} and set(by_name["shapes-opd"]["kl"]) == {"kl", "mar_kl"}
    assert set(by_name["shapes-pretrain"]) == {"loss"}


def test_html_is_self_contained_with_grids_and_curves(results: Path) -> None:
    page = to_html(load_results(results), results, results.parent / "runs")
    assert page.startswith("<!doctype html>")
    # nothing fetched from elsewhere: every image is inline
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert page.count('src="data:image/png;base64,') == len(SHAPES_MODELS) + 3  # 5 grids + 3 runs
    assert '<th colspan="7">GenEval</th>' in page and '<th colspan="7">GenEval · shapes-geneval</th>' in page
    assert page.count('<table class="board">') == 2 and "<h2>SD3 world</h2>" in page and "<h2>Shapes world</h2>" in page
    assert 'class="best"' in page and "Attr. binding ↑" in page and "Score ↓" in page
    assert "mask2former (m2f) + clip (clip)" in page
    assert "first 8 prompts only" in page  # cell tooltip of the subset result


def test_a_cell_tooltip_says_what_its_stderr_is_taken_over(results: Path) -> None:
    """Summaries now record ``stderr`` over prompts (``stderr_unit``); one written before holds it
    over images, smaller: each tooltip names which, with the value the summary stored."""
    write_result(results, "shapes-opd", "shapes-ocr", {"overall": 0.85}, stderr=0.0446, stderr_unit="prompt")
    write_result(results, "shapes-base", "shapes-ocr", {"overall": 0.3}, stderr=0.0282)  # written before: no unit
    page = to_html(load_results(results), results)
    assert page.count('title="40 images; stderr 0.045 over prompts; 20 steps') == 1
    assert 'title="40 images; stderr 0.028 over images; 20 steps' in page
    assert "stderr 0.010 over images" in page  # the fixture's other summaries, all without a unit
    assert to_markdown(load_results(results)).count("0.045") == 0  # the Markdown table shows no stderr


def test_html_without_matplotlib_skips_curves_with_a_note(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    page = to_html(load_results(results), results, results.parent / "runs")
    assert "3 training runs found, curves skipped: matplotlib is not installed" in page
    assert page.count("data:image/png") == len(SHAPES_MODELS)  # the grids are still there


def test_cli_writes_markdown_and_html_finding_runs_beside_results(results: Path, tmp_path: Path) -> None:
    md, page = tmp_path / "board.md", tmp_path / "board.html"
    result = RUNNER.invoke(app, ["leaderboard", str(results), "--out", str(md)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "shapes-grpo-mix" in result.output and "Attr. binding" in result.output
    assert md.read_text() == to_markdown(load_results(results))
    result = RUNNER.invoke(app, ["leaderboard", str(results), "--out", str(page)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert page.read_text().count("data:image/png") == len(SHAPES_MODELS) + 3  # runs/ found beside results/
    other_runs = tmp_path / "elsewhere"
    write_run(other_runs, "solo", "grpo")
    result = RUNNER.invoke(app, ["leaderboard", str(results), "--out", str(page), "--runs", str(other_runs)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert ">solo</figcaption>" in page.read_text()
    result = RUNNER.invoke(app, ["leaderboard", str(results), "--out", str(page), "--runs", str(tmp_path / "nope")], env=WIDE)
    assert result.exit_code == 1 and "--runs" in result.output and "no such directory" in result.output


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(OpdkitError, match="no such results directory"):
        load_results(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpdkitError, match="holds no result files"):
        load_results(tmp_path / "empty")
    (tmp_path / "r" / "m").mkdir(parents=True)
    (tmp_path / "r" / "m" / "b.json").write_text("{broken")
    with pytest.raises(OpdkitError, match="not a valid result file"):
        load_results(tmp_path / "r")
    # hand-edited fields the table reads: one line naming the file and key, before any output
    for edit, expected in (
        ({"metrics": None}, "metrics: expected an object of metric values (got null)"),
        ({"stderr": "n/a"}, 'stderr: expected a number or null (got "n/a")'),
        ({"sampler": "fast"}, 'sampler: expected an object or null (got "fast")'),
        ({"stderr_unit": "pixel"}, 'stderr_unit: expected one of "prompt", "image" (got "pixel")'),
    ):
        (tmp_path / "r" / "m" / "b.json").write_text(json.dumps({"bench": "b", "metrics": {"overall": 1.0}, **edit}))
        with pytest.raises(OpdkitError, match=f"^{re.escape(str(tmp_path / 'r' / 'm' / 'b.json') + ': ' + expected)}$"):
            load_results(tmp_path / "r")
        result = RUNNER.invoke(app, ["leaderboard", str(tmp_path / "r"), "--out", str(tmp_path / "x.html")], env=WIDE)
        assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {tmp_path / 'r' / 'm' / 'b.json'}: {expected}"], result.output
    (tmp_path / "r" / "m" / "b.json").write_text(json.dumps({"bench": "b", "metrics": {"overall": 1.0}}))
    with pytest.raises(OpdkitError, match=r"expected a \.md or \.html"):
        run_leaderboard(tmp_path / "r", tmp_path / "x.txt")
    # a wrong --out is named before any work or output, even where the results are missing
    with pytest.raises(OpdkitError, match=r"--out .*x\.pdf: expected a \.md or \.html"):
        run_leaderboard(tmp_path / "missing", tmp_path / "x.pdf")


# ------------------------------------------------------------------------------------------
# A real headless browser
# ------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            timeout=120,
        )


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(results: Path, tmp_path: Path) -> None:
    from PIL import Image

    page = tmp_path / "board.html"
    run_leaderboard(results, page)
    shot = tmp_path / "board.png"
    proc = chromium("--screenshot=" + str(shot), "--window-size=1400,900", page.as_uri())
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (900, 1400, 3)
    # not a blank page: ink, the table's header shading and the green "best" cells are visible
    assert (pixels < 100).all(axis=2).mean() > 0.002
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    text = dom.stdout.decode()
    for needle in ("opdkit leaderboard", *SHAPES_MODELS, "Attr. binding", "rapidocr (PP-OCRv4 onnx)", "Training curves", "shapes-grpo-geneval · shapes-geneval"):
        assert needle in text, needle
