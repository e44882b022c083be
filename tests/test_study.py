"""``opdkit study``: the shipped shapes study, shrunk to a tiny model, trains what is missing,
evaluates every row, skips what is done, and reports the differences ``opdkit compare`` prints."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from opdkit.cli import app
from opdkit.errors import OpdkitError, RecipeError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "recipes" / "shapes" / "study.yaml"
RUNNER = CliRunner()
WIDE = {"COLUMNS": "250"}

# Every trained row of the shipped study, cut to one step of a few images of the tiny model.
SHRINK = {
    "train.max_steps": 1, "train.batch_size": 2, "train.group_size": 2, "train.micro_batch": None,
    "train.max_minutes": None, "train.sample_every": 0, "train.checkpoint_every": 1,
    "sampler.steps": 2, "sampler.train_window": [0, 1],
    # at the OCR and quality teachers' shipped lr 3e-4 every comparison of this one-step study
    # came out 0 +- 0; at 1e-3 (the other recipes') the rows differ
    "train.lr": 1.0e-3,
}  # fmt: skip
TINY_EVAL = {"samples_per_prompt": 2, "seed": 0, "limit": 2, "steps": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary

    config = ShapesModelConfig(
        patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16
    )
    return build_shapes_pipeline(
        tmp_path_factory.mktemp("tiny-base") / "base", shapes_vocabulary(), config, seed=0
    )


def tiny_study(folder: Path, base: Path) -> Path:
    """The shipped study file with its model rows on the tiny base and every recipe row shrunk."""
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    for row in data["rows"]:
        if "model" in row:
            row["model"] = str(base)
    data["set"] = {**SHRINK, "model.path": str(base)}
    data["eval"] = TINY_EVAL
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full `opdkit study` from nothing, through the command line."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("study")
    study = tiny_study(tmp, tiny_base)
    out = tmp / "out"
    # A random tiny model draws noise, which the shipped purity (20) and speckle (0.02) scales
    # score ~1e-10 on every image: the rows' rewards then differ by less than the advantage
    # normaliser's epsilon, a one-step teacher hardly moves, and comparisons come out 0 +- 0.
    # Softer scales put the scores near 0.1-1, so the rows have something to differ on.
    patch = pytest.MonkeyPatch()
    patch.setattr("opdkit.shapes.quality.PURITY_SCALE", 200.0)
    patch.setattr("opdkit.shapes.quality.SPECKLE_SCALE", 1.0)
    try:
        result = RUNNER.invoke(app, ["study", str(study), "--out", str(out)], env=WIDE)
    finally:
        patch.undo()
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    return {
        "study": study,
        "out": out,
        "output": result.output,
        "table": json.loads((out / "table.json").read_text()),
    }


def names(data: dict[str, Any]) -> list[str]:
    return [row["name"] for row in data["rows"]]


def test_study_trains_the_missing_rows_and_writes_the_table(first_run: dict[str, Any]) -> None:
    out, table = first_run["out"], first_run["table"]
    shipped = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    trained = [r["name"] for r in shipped["rows"] if "recipe" in r]
    assert names(table) == [r["name"] for r in shipped["rows"]]
    for name in trained:  # each recipe row became a finished run of one step
        assert json.loads((out / "runs" / name / "final" / "final.json").read_text())["step"] == 1
    # the OPD rows distilled the teachers this study trained, not the committed ones
    opd = yaml.safe_load((out / "runs" / "opd" / "recipe.yaml").read_text())
    assert [t["path"] for t in opd["teachers"]] == [
        str(out / "runs" / n) for n in ("grpo_geneval", "grpo_ocr", "grpo_quality")
    ]
    assert (
        opd["regularizers"]
        and not yaml.safe_load((out / "runs" / "opd_no_mar" / "recipe.yaml").read_text())["regularizers"]
    )
    # every row on every benchmark, every comparison of the file (a list of benchmarks is one per benchmark)
    for row in table["rows"]:
        assert set(row["results"]) == set(shipped["benchmarks"])
        assert all(0.0 <= cell["value"] <= 1.0 and cell["n_images"] == 4 for cell in row["results"].values())
    expected = [
        (c["a"], c["b"], bench)
        for c in shipped["comparisons"]
        for bench in ([c["bench"]] if isinstance(c["bench"], str) else c["bench"])
    ]
    assert [(c["a"], c["b"], c["bench"]) for c in table["comparisons"]] == expected
    assert table["wall_seconds"] > 0 and len(table["timings"]) == len(table["rows"])
    # the Markdown table, printed and written; one progress line per row with its wall time
    markdown = (out / "table.md").read_text()
    assert all(f"| {name} |" in markdown for name in names(table)) and "SE (paired)" in markdown
    # every summary was written now: ± over prompts, none marked as an older one over images
    assert all(c["stderr_unit"] == "prompt" for row in table["rows"] for c in row["results"].values())
    assert "± is the standard error over prompts (GenEval: within tags)." in markdown and "(img)" not in markdown
    for name in names(table):
        assert re.search(rf"\] {re.escape(name)}: .*\(\d+\.\d s\)", first_run["output"]), first_run["output"]
    assert "study done in" in first_run["output"]


def test_the_leaderboard_shows_the_same_rows(first_run: dict[str, Any]) -> None:
    from opdkit.eval.leaderboard import load_results

    assert sorted(load_results(first_run["out"] / "results")) == sorted(names(first_run["table"]))
    result = RUNNER.invoke(app, ["leaderboard", str(first_run["out"] / "results")], env=WIDE)
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in names(first_run["table"]))


def test_comparisons_are_what_opdkit_compare_prints(first_run: dict[str, Any]) -> None:
    from opdkit.eval.compare import compare

    results = first_run["out"] / "results"
    assert any(c["stderr"] > 0 for c in first_run["table"]["comparisons"])  # not all trivially equal
    for c in first_run["table"]["comparisons"]:
        (d,) = compare(results, c["a"], c["b"], [c["bench"]])
        assert (c["a_value"], c["b_value"], c["diff"], c["stderr"], c["n_prompts"]) == (
            d.a,
            d.b,
            d.diff,
            d.stderr,
            d.n_prompts,
        )
        printed = RUNNER.invoke(
            app, ["compare", c["a"], c["b"], "--results", str(results), "--bench", c["bench"]], env=WIDE
        )
        assert printed.exit_code == 0, printed.output
        line = next(x for x in printed.stdout.splitlines() if c["bench"] in x and "│" in x)
        cells = [x.strip() for x in line.split("│") if x.strip()]
        assert cells[1:5] == [
            f"{c['a_value']:.3f}",
            f"{c['b_value']:.3f}",
            f"{c['diff']:+.3f}",
            f"{c['stderr']:.3f}",
        ]


def _forbid(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, str]] | None = None) -> None:
    """Training fails the test; evals are recorded in ``calls`` (or fail the test when None)."""
    import opdkit.eval.runner
    import opdkit.methods

    real = opdkit.eval.runner.run_evals

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the study trained a finished row")

    def evals(benches: list[str], model: str, **kwargs: Any) -> Any:
        if calls is None:
            raise AssertionError(f"the study evaluated {kwargs['name']} on {benches} again")
        calls.extend((kwargs["name"], bench) for bench in benches)
        return real(benches, model, **kwargs)

    monkeypatch.setattr(opdkit.methods, "train", no_training)
    monkeypatch.setattr(opdkit.eval.runner, "run_evals", evals)


def _stamps(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in sorted(out.rglob("*"))
        if p.is_file() and "table" not in p.name
    }


def test_a_second_invocation_trains_and_evaluates_nothing(
    first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from opdkit.study import load_study, run_study

    out = first_run["out"]
    before = _stamps(out)
    _forbid(monkeypatch)
    lines: list[str] = []
    table = run_study(load_study(first_run["study"], out=out), echo=lines.append)
    assert _stamps(out) == before  # no run folder or results file was touched
    assert all("results present" in line for line in lines if line.startswith("["))
    assert table["comparisons"] == first_run["table"]["comparisons"]


def test_a_finished_study_checks_its_rows_without_loading_a_model(
    first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUT/model_facts.json holds each row's weight fingerprint with the files it came from, so a
    study that is done (a re-run, a --dry-run) loads no model: an SD3.5-M row is a whole pipeline."""
    import opdkit.models.loading
    from opdkit.study import FACTS_FILE, load_study, plan_lines, run_study

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the study loaded a model to check a finished row")

    facts = json.loads((first_run["out"] / FACTS_FILE).read_text())["models"]
    assert len(facts) == 1 + len(first_run["table"]["rows"])  # the recipes' one base, each row's eval model
    monkeypatch.setattr(opdkit.models.loading, "load_flow_model", no_load)
    _forbid(monkeypatch)
    study = load_study(first_run["study"], out=first_run["out"])
    assert all("no eval" in line for line in plan_lines(study)[:-1])
    run_study(study, echo=lambda line: None)


def test_a_remembered_fingerprint_is_not_trusted_once_its_files_change(
    first_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other weights written over a row's adapter, in place and with the old modification time (as
    ``cp -p`` or ``rsync -t`` leave it), are loaded again: the file's change time moved."""
    import shutil

    import opdkit.models.loading
    from opdkit.study import load_study, results_state

    loads: list[Any] = []
    real = opdkit.models.loading.load_flow_model

    def counted(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(opdkit.models.loading, "load_flow_model", counted)
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)  # another folder: its runs are other files

    def state() -> str:
        study = load_study(first_run["study"], out=out)
        return results_state(study, {r.name: r for r in study.rows}["grpo_geneval"], "shapes-ocr")

    assert (state(), len(loads)) == ("current", 1)
    assert (state(), len(loads)) == ("current", 1)  # remembered
    adapter = out / "runs" / "grpo_geneval" / "final" / "lora.safetensors"
    before = adapter.stat()
    shutil.copyfile(out / "runs" / "grpo_ocr" / "final" / "lora.safetensors", adapter)
    os.utime(adapter, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = adapter.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    state()
    assert len(loads) == 2
    memo = out / "model_facts.json"  # entries edited by hand: loaded again, not a traceback
    data = json.loads(memo.read_text())
    memo.write_text(json.dumps({**data, "models": {key: {"stamp": 5} for key in data["models"]}}))
    assert (state(), len(loads)) == ("current", 3)



def test_results_are_judged_by_the_exact_weights_and_older_files_as_before(
    first_run: dict[str, Any], tmp_path: Path
) -> None:
    """A results file whose ``weights_exact`` is another model's is stale; one written before that
    key was recorded is judged on the rest of its settings, as it was then."""
    import shutil

    from opdkit.study import load_study, results_state

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    settings_path = out / "results" / "grpo_ocr" / "shapes-ocr.settings.json"
    settings = json.loads(settings_path.read_text())

    def state() -> str:
        study = load_study(first_run["study"], out=out)
        return results_state(study, {r.name: r for r in study.rows}["grpo_ocr"], "shapes-ocr")

    assert state() == "current"
    settings_path.write_text(json.dumps({**settings, "weights_exact": "0123456789abcdef"}))
    assert state() == "stale"
    settings_path.write_text(json.dumps({k: v for k, v in settings.items() if k != "weights_exact"}))
    assert state() == "current"


def test_a_second_study_of_a_folder_in_use_is_refused(
    tiny_base: Path, tmp_path: Path, lock_held_elsewhere: Callable[[Path], AbstractContextManager[None]]
) -> None:
    """Two studies in one folder would train and evaluate the same rows at once: while another
    process holds OUT/.lock, `opdkit study` (one row at a time or --jobs) is refused with one line
    before it starts anything."""
    study = tiny_study(tmp_path, tiny_base)
    out = tmp_path / "out"
    out.mkdir()
    with lock_held_elsewhere(out / ".lock"):
        for jobs in ("1", "2"):
            result = RUNNER.invoke(app, ["study", str(study), "--out", str(out), "--jobs", jobs], env=WIDE)
            assert result.exit_code == 1, result.output
            assert "another `opdkit study` is running in this folder" in result.output, result.output
    assert [p.name for p in out.iterdir()] == [".lock"]

def test_only_the_built_in_model_plugins_vouch_for_their_files(tiny_base: Path) -> None:
    """A custom model plug-in may read more than the folder it names, so the loader alone marks
    nothing as the model's origin, and a study loads such a model each time it needs its facts."""
    from opdkit.models.loading import load_flow_model, pipeline_sources
    from opdkit.registry import models

    assert models.build("shapes", {"path": str(tiny_base)}).sources == [tiny_base.resolve()]
    assert load_flow_model(tiny_base).sources is None  # what a custom plug-in returns
    assert pipeline_sources("hf:owner/name") is None  # a later download may bring other files


def _cut_to_one_row(path: Path) -> None:
    path.write_text(path.read_text().splitlines()[0] + "\n")


def test_results_written_before_stderr_unit_are_current_and_shown_as_over_images(
    first_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A summary written before ``stderr_unit`` was recorded holds its stderr over images: the study
    finds it current (nothing evaluated again, no file rewritten), compares it as before, and shows
    its stored stderr marked as over images."""
    import shutil

    from opdkit.study import load_study, plan_lines, run_study

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    path = out / "results" / "grpo_ocr" / "shapes-ocr.json"
    summary = json.loads(path.read_text())
    del summary["stderr_unit"]
    path.write_text(json.dumps({**summary, "stderr": 0.0123}))  # as the old formula stored it
    study = load_study(first_run["study"], out=out)
    assert not [line for line in plan_lines(study) if "evaluate" in line]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*") if p.is_file()}
    _forbid(monkeypatch)
    table = run_study(study, echo=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*") if p.is_file()} == stamps
    assert table["comparisons"] == first_run["table"]["comparisons"]
    cell = {r["name"]: r for r in table["rows"]}["grpo_ocr"]["results"]["shapes-ocr"]
    assert (cell["stderr"], cell["stderr_unit"]) == (0.0123, "image")
    markdown = (out / "table.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| grpo_ocr |"))
    assert row.count("(img)") == 1 and "± 0.012 (img)" in row and markdown.count("(img)") == 2  # the cell, the note
    assert "(img): over images, smaller (results evaluated before it was taken over prompts)." in markdown


@pytest.mark.parametrize(
    "damage",
    [
        lambda root: (root / "shapes-quality.json").unlink(),
        lambda root: (root / "shapes-quality.jsonl").unlink(),  # the rows the comparisons pair
        lambda root: _cut_to_one_row(root / "shapes-quality.jsonl"),
    ],
    ids=["summary", "rows", "rows-cut-short"],
)
def test_a_deleted_results_file_is_evaluated_again_for_that_row_only(
    first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, damage: Callable[[Path], None]
) -> None:
    from opdkit.study import load_study, plan_lines, run_study

    out = first_run["out"]
    damage(out / "results" / "grpo_ocr")
    study = load_study(first_run["study"], out=out)
    plan = plan_lines(study)
    assert [line for line in plan if "evaluate" in line] == [
        "grpo_ocr: trained (%s, step 1): skip training; evaluate shapes-quality (results present: shapes-geneval, shapes-ocr)"
        % (out / "runs" / "grpo_ocr")
    ]
    calls: list[tuple[str, str]] = []
    _forbid(monkeypatch, calls)
    table = run_study(study, echo=lambda line: None)
    assert calls == [("grpo_ocr", "shapes-quality")]
    assert table["comparisons"] == first_run["table"]["comparisons"]


def test_a_limit_that_keeps_every_prompt_finds_the_results_it_recorded(first_run: dict[str, Any], tmp_path: Path) -> None:
    # The runner records a --limit at or above the prompt count as no limit (the whole set): a study
    # whose eval.limit is that large must find those results current, not evaluate them on every run.
    import shutil

    from opdkit.study import load_study, plan_lines

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    for summary in (out / "results").glob("*/*.json"):
        if not summary.name.endswith(".settings.json"):
            data = json.loads(summary.read_text())
            if "limit" in data:
                summary.write_text(json.dumps({**data, "limit": None}))  # as a whole-set eval records it
    study = yaml.safe_load(first_run["study"].read_text())
    study["eval"] = {**study["eval"], "limit": 100_000}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert not [line for line in plan_lines(load_study(path, out=out)) if "evaluate" in line]


def test_a_partial_run_is_resumed_and_its_old_results_go(
    first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder without final weights (killed after its last checkpoint) is resumed, not restarted."""
    import shutil

    import opdkit.methods
    from opdkit.study import load_study, run_study

    out = first_run["out"]
    shutil.rmtree(out / "runs" / "grpo_quality" / "final")
    resumed: list[bool] = []
    real = opdkit.methods.train

    def train(loaded: Any, out_dir: Any, **kwargs: Any) -> Any:
        resumed.append(kwargs["resume"])
        return real(loaded, out_dir, **kwargs)

    monkeypatch.setattr(opdkit.methods, "train", train)
    run_study(load_study(first_run["study"], out=out), echo=lambda line: None)
    assert resumed == [True]
    assert (out / "runs" / "grpo_quality" / "final" / "final.json").is_file()
    assert sorted(p.name for p in (out / "results" / "grpo_quality").glob("*.json") if "settings" not in p.name) == [
        "shapes-geneval.json", "shapes-ocr.json", "shapes-quality.json",
    ]  # fmt: skip


def test_results_of_other_weights_are_made_again(
    first_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model row now naming other weights (a committed base that changed, say) is evaluated
    again; the rows trained on the base the recipes name are left alone."""
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary
    from opdkit.study import load_study, plan_lines, run_study

    config = ShapesModelConfig(
        patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16
    )
    other = build_shapes_pipeline(tmp_path / "other", shapes_vocabulary(), config, seed=1)
    data = yaml.safe_load(first_run["study"].read_text())
    data["rows"][0]["model"] = str(other)
    changed = tmp_path / "study.yaml"
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    study = load_study(changed, out=first_run["out"])
    assert (
        plan_lines(study)[0].startswith("base: model ")
        and "evaluate shapes-geneval (again: other settings or weights)" in plan_lines(study)[0]
    )
    assert all("no eval" in line for line in plan_lines(study)[1:-1])
    calls: list[tuple[str, str]] = []
    _forbid(monkeypatch, calls)
    lines: list[str] = []
    run_study(study, echo=lines.append)
    assert calls == [("base", bench) for bench in data["benchmarks"]]
    assert any("results were made with other settings or weights" in line for line in lines)
    summary = json.loads((first_run["out"] / "results" / "base" / "shapes-ocr.json").read_text())
    assert summary["model_source"] == str(other)


def test_a_changed_recipe_is_refused_not_mixed(first_run: dict[str, Any]) -> None:
    from opdkit.study import load_study, run_study

    study = load_study(first_run["study"], ["train.lr=0.5"], out=first_run["out"])
    with pytest.raises(
        OpdkitError,
        match=r"runs/grpo_geneval: holds a run of another recipe than row 'grpo_geneval' \(train.lr: 0.001 -> 0.5\)",
    ):
        run_study(study, echo=lambda line: None)


def test_a_row_trained_past_its_max_steps_is_refused_not_reported(first_run: dict[str, Any], tmp_path: Path) -> None:
    """train.max_steps may grow (the row resumes), but a study whose recipe now asks fewer steps
    than its run folder holds would report the longer run as the row: refused, plan and run alike."""
    from opdkit.study import load_study, plan_lines, run_study

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    final = out / "runs" / "grpo_geneval" / "final" / "final.json"
    final.write_text(json.dumps({**json.loads(final.read_text()), "step": 3}))
    study = load_study(first_run["study"], out=out)
    expected = r"runs/grpo_geneval: holds a run trained to step 3, past row 'grpo_geneval''s train.max_steps 1; delete"
    with pytest.raises(OpdkitError, match=expected):
        plan_lines(study)
    with pytest.raises(OpdkitError, match=expected):
        run_study(study, echo=lambda line: None)


# A benchmark plug-in named by its file: it calls itself `mybench`, which is where the eval
# runner files its results, whatever the study file calls it.
PLUGIN_BENCHMARK = """\
from opdkit.eval.benchmark import Benchmark

def build(samples_per_prompt: int = 1):
    prompts = [{"prompt": "a red circle", "tag": "colors"}, {"prompt": "a blue square", "tag": "colors"}]
    return Benchmark(name="mybench", world="shapes", prompts=prompts, samples_per_prompt=samples_per_prompt,
                     score=lambda images, texts, records: {"score": images.mean(dim=(1, 2, 3))},
                     summarize=lambda rows: {"overall": sum(r["score"] for r in rows) / len(rows)},
                     sampler={"steps": 2, "cfg": 3.0, "resolution": 32})
"""


def test_a_plugin_benchmark_named_by_path_is_found_under_its_own_name(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opdkit.study import load_study, plan_lines, run_study

    (tmp_path / "plug.py").write_text(PLUGIN_BENCHMARK, encoding="utf-8")
    spec = f"{tmp_path / 'plug.py'}:build"
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "benchmarks": [spec], "eval": {"samples_per_prompt": 2, "batch_size": 8},
        "rows": [{"name": "a", "model": str(tiny_base)}, {"name": "b", "model": str(tiny_base)}],
        "comparisons": [{"a": "a", "b": "b", "bench": spec}],
    }), encoding="utf-8")  # fmt: skip
    out = tmp_path / "out"
    table = run_study(load_study(study_file, out=out), echo=lambda line: None)
    assert (out / "results" / "a" / "mybench.json").is_file()
    assert [row["results"][spec]["n_images"] for row in table["rows"]] == [4, 4]
    assert [(c["bench"], c["diff"]) for c in table["comparisons"]] == [(spec, 0.0)]
    study = load_study(study_file, out=out)  # a second invocation finds the results it made
    assert all("no eval" in line for line in plan_lines(study)[:-1]), plan_lines(study)
    _forbid(monkeypatch)
    run_study(study, echo=lambda line: None)


def test_dry_run_plans_without_running(tiny_base: Path, tmp_path: Path) -> None:
    study = tiny_study(tmp_path, tiny_base)
    result = RUNNER.invoke(app, ["study", str(study), "--out", str(tmp_path / "out"), "--dry-run"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "grpo_geneval: train shapes/grpo_geneval into" in result.stdout
    assert not (tmp_path / "out").exists()


def test_the_shipped_study_validates() -> None:
    result = RUNNER.invoke(app, ["validate", "shapes/study"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "(study, 7 rows)" in result.stdout


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda d: d["rows"][1].update(recipe_typo="x"),
            r"study.yaml:\d+: rows.1.recipe_typo: unknown key \(allowed: name, description, model, recipe, set, teachers\)",
        ),
        (
            lambda d: d["rows"][1].update(model="shapes-base"),
            r"study.yaml:\d+: rows.1: give exactly one of model",
        ),
        (
            lambda d: d["rows"][5]["teachers"].update(ocr="nobody"),
            r"study.yaml:\d+: rows.5.teachers.ocr: 'nobody' is no row",
        ),
        (
            lambda d: d["rows"][5]["teachers"].update(ocr="opd_no_mar"),
            r"rows.5.teachers.ocr: 'opd_no_mar' is a row further down",
        ),
        (
            lambda d: d["comparisons"][0].update(bench="shapes-nope"),
            r"study.yaml:\d+: comparisons.0.bench: 'shapes-nope' is not in benchmarks",
        ),
        (
            lambda d: d["eval"].update(samples_per_prompt=0),
            r"study.yaml:\d+: eval.samples_per_prompt: Input should be greater than or equal to 1",
        ),
        (
            lambda d: d["rows"][2].update(set={"train.lr": "fast"}),
            r"study.yaml:\d+: rows.2 \(grpo_ocr\): .*grpo_ocr.yaml: --set train.lr=\"fast\": train.lr: ",
        ),
        (
            lambda d: d["rows"][6]["teachers"].update(nope="base"),
            r"rows.6 \(opd_no_mar\): teachers.nope: the recipe has no teacher 'nope'",
        ),
        (lambda d: d["rows"][0].update(name="a/b"), r"rows.0.name: 'a/b': a row name is one folder name"),
        (
            lambda d: d["comparisons"][1].update(bench=5),
            r"comparisons.1.bench: Input should be a valid string or list \(got 5\)",
        ),
        (lambda d: d["rows"].append(dict(d["rows"][0])), r"study.yaml:\d+: rows.7.name: 'base' is repeated"),
        (  # a model row's model is resolved at load, as `opdkit eval -m` resolves it, not after rows above it ran
            lambda d: d["rows"][0].update(model="shapes-teachers/ocrr"),
            r"study.yaml:\d+: rows.0.model \(base\): 'shapes-teachers/ocrr': no such directory \(did you mean 'shapes-teachers/ocr'\?\)$",
        ),
        (
            lambda d: d["rows"][0].update(model="shapes-bse"),
            r"study.yaml:\d+: rows.0.model \(base\): 'shapes-bse': unknown model 'shapes-bse'; did you mean 'shapes-base'",
        ),
        (
            lambda d: d["rows"][0].update(model="/"),
            r"study.yaml:\d+: rows.0.model \(base\): '/': '/' is not a pipeline or run directory",
        ),
        (lambda d: d.update(benchmarks=["nope-bench"]), r"study.yaml:\d+: benchmarks.0: "),
        (
            lambda d: d["eval"].update(params={"split": "heldot"}),
            r"study.yaml:\d+: eval.params: benchmark 'shapes-geneval': split='heldot' is not one of 'test'",
        ),
        (  # only shapes-ocr has held-out prompts: the others' split does not offer them
            lambda d: d["eval"].update(params={"split": "heldout"}),
            r"study.yaml:\d+: eval.params: benchmark 'shapes-geneval': split='heldout' is not one of 'test', 'train', 'fold'",
        ),
    ],
)
def test_a_bad_study_file_is_one_line_naming_its_key(tmp_path: Path, edit: Any, expected: str) -> None:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    if "nope-bench" in expected or "benchmarks.0" in expected:
        data["comparisons"] = []
    edit(data)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    from opdkit.study import load_study

    with pytest.raises(RecipeError) as info:
        load_study(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert re.search(expected, message), message
    result = RUNNER.invoke(app, ["study", str(path), "--dry-run"], env=WIDE)
    assert result.exit_code == 1 and len([x for x in result.output.splitlines() if x.strip()]) == 1, (
        result.output
    )


def _row_outputs(out: Path) -> dict[str, Any]:
    """What a study made, without clocks: every run's metrics and final tensors, every result."""
    from safetensors.torch import load_file

    from opdkit.rundir import read_jsonl

    made: dict[str, Any] = {}
    for run in sorted((out / "runs").iterdir()):
        made[f"{run.name}/metrics"] = [
            {k: v for k, v in r.items() if not k.endswith("seconds")} for r in read_jsonl(run / "metrics.jsonl")
        ]
        for weights in sorted((run / "final").glob("*.safetensors")):
            made[f"{run.name}/{weights.name}"] = {k: v.tolist() for k, v in load_file(str(weights)).items()}
    for result in sorted((out / "results").rglob("*.json")):
        if not result.name.endswith(".settings.json"):
            summary = json.loads(result.read_text())
            made[str(result.relative_to(out))] = {k: summary.get(k) for k in ("metrics", "stderr", "n_images")}
    return made


def test_jobs_run_rows_in_processes_with_the_results_of_one_at_a_time(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    study = tiny_study(tmp_path, tiny_base)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = RUNNER.invoke(app, ["study", str(study), "--out", str(tmp_path / "one")], env=WIDE)
    finally:
        torch.set_num_threads(before)
    assert one.exit_code == 0, one.output
    two = RUNNER.invoke(app, ["study", str(study), "--out", str(tmp_path / "two"), "--jobs", "2"],
                        env={**WIDE, "OMP_NUM_THREADS": "2"})  # fmt: skip
    assert two.exit_code == 0, two.output
    made_one, made_two = _row_outputs(tmp_path / "one"), _row_outputs(tmp_path / "two")
    assert len(made_one) > 20 and made_two == made_one  # bit for bit: weights, metrics, results
    table_one, table_two = (json.loads((tmp_path / d / "table.json").read_text()) for d in ("one", "two"))
    assert table_two["comparisons"] == table_one["comparisons"] and table_two["jobs"] == 2
    assert [t["row"] for t in table_two["timings"]] == names(table_two)
    # each row ran in a child of one thread, logged; a student started only after its teachers ended
    lines = two.output.splitlines()
    logs = tmp_path / "two" / "logs"
    assert all((logs / f"{name}.log").is_file() and (logs / f"{name}.json").is_file() for name in names(table_two))
    assert "--row grpo_ocr" in (logs / "grpo_ocr.log").read_text()
    started = {n: i for i, line in enumerate(lines) for n in names(table_two) if re.search(rf"\] {n}: started \(1 thread\)", line)}
    ended = {n: i for i, line in enumerate(lines) for n in names(table_two) if re.search(rf"\] {n}: trained|\] {n}: model", line)}
    assert set(started) == set(ended) == set(names(table_two))
    assert started["opd"] > max(ended[t] for t in ("grpo_geneval", "grpo_ocr", "grpo_quality"))
    assert started["grpo_geneval"] < ended["base"]  # two at once
    assert "(2 rows at a time)" in (tmp_path / "two" / "table.md").read_text()
    # again: every row is done, so no process starts and no run or result is touched
    before = _stamps(tmp_path / "two")
    again = RUNNER.invoke(app, ["study", str(study), "--out", str(tmp_path / "two"), "--jobs", "2"], env=WIDE)
    assert again.exit_code == 0, again.output
    assert "started" not in again.output and again.output.count("results present") == len(names(table_two))
    assert _stamps(tmp_path / "two") == before


BOOM_PY = '''\
def boom():
    def reward(images, prompts, metadata):
        raise RuntimeError("boom from the reward")
    return reward
'''


def test_jobs_a_failed_row_stops_its_students_and_the_others_finish(tiny_base: Path, tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text(BOOM_PY)
    study = tiny_study(tmp_path, tiny_base)
    data = yaml.safe_load(study.read_text())
    data["rows"] = [r for r in data["rows"] if r["name"] != "grpo_mix"]
    next(r for r in data["rows"] if r["name"] == "grpo_ocr")["set"] = {
        "rewards": [{"type": f"{tmp_path / 'boom.py'}:boom", "weight": 1.0}]
    }
    data["comparisons"] = []
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    from opdkit.study import load_study
    from opdkit.study_jobs import run_rows_in_processes

    out = tmp_path / "out"
    lines: list[str] = []
    with pytest.raises(OpdkitError) as failed:  # status lines every 0.2 s instead of every 5 min
        run_rows_in_processes(load_study(study, out=out), 2, lines.append, status_every_s=0.2)
    error = str(failed.value)
    assert re.search(r"row grpo_ocr: failed \(exit \d+\): .*boom from the reward.*; log .*grpo_ocr\.log", error), error
    for student in ("opd", "opd_no_mar"):
        assert f"row {student}: not run: it distils grpo_ocr, which failed" in error
        assert not (out / "runs" / student).exists()
    assert any(re.fullmatch(r"running: (\S+ (step \d+/1|evaluating)(; )?)+", line) for line in lines), lines
    for done in ("grpo_geneval", "grpo_quality"):  # the rows that did not need it went on
        assert (out / "runs" / done / "final" / "final.json").is_file()
        assert len(list((out / "results" / done).glob("shapes-*.json"))) == 6
    assert not (out / "table.md").exists()


def test_jobs_share_the_threads_and_spread_over_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from opdkit.study_jobs import child_devices, child_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert (child_threads(2), child_threads(3), child_threads(16)) == (4, 2, 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert child_threads(1) == cores and child_threads(10_000) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert child_devices() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert child_devices() == ["4", "5", "6"]  # the user's choice of GPUs, one per child
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert child_devices() == []  # one GPU: the children share it


def test_the_table_names_the_split_its_prompts_come_from() -> None:
    from opdkit.study import to_markdown

    table = {"description": "d", "study": "s", "benchmarks": ["b"], "rows": [], "comparisons": [],
             "eval": {"samples_per_prompt": 4, "seed": 0, "limit": None, "params": {}}}  # fmt: skip
    assert "4 samples per test prompt, seed 0" in to_markdown(table)
    table["eval"]["params"] = {"split": "fold", "tags": ["ocr"]}
    assert "4 samples per prompt of the fold split (benchmark params tags=['ocr']), seed 0" in to_markdown(table)


def test_jobs_interrupted_stops_the_children_and_the_rerun_resumes(
    tiny_base: Path, tmp_path: Path, signal_when: Any
) -> None:
    """Ctrl-C (SIGINT to the parent alone here) ends every child; nothing written is lost, and
    the same command continues: the interrupted row resumes from its last checkpoint."""
    import signal
    import subprocess
    import sys

    study = tiny_study(tmp_path, tiny_base)
    data = yaml.safe_load(study.read_text())
    data["rows"] = [r for r in data["rows"] if r["name"] in ("base", "grpo_geneval")]
    data["comparisons"] = []
    data["set"].update({"train.max_steps": 400, "train.checkpoint_every": 2})
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "opdkit.cli", "study", str(study), "--out", str(out), "--jobs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPDKIT_TENSORBOARD": "0", "COLUMNS": "200"}
    # as from a terminal: a shell that runs the tests in the background (`.ci/run &`) hands its
    # children SIGINT ignored, and Python then never turns it into KeyboardInterrupt
    parent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    pointer = out / "runs" / "grpo_geneval" / "checkpoints" / "latest.json"
    signal_when(parent, pointer.exists, "wrote no checkpoint", sig=signal.SIGINT)
    output = parent.stdout.read() + parent.stderr.read() if parent.stdout and parent.stderr else ""
    assert parent.returncode == 130, output
    assert "interrupted: what was written is kept" in output
    steps = len((out / "runs" / "grpo_geneval" / "metrics.jsonl").read_text().splitlines())
    # the signal lands just after the step-2 checkpoint, well before step 6
    assert 2 <= steps < 6 and not (out / "runs" / "grpo_geneval" / "final").exists()
    if Path("/proc").is_dir():  # no child outlives the parent
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                alive += [cmdline] if str(out) in cmdline.read_bytes().decode(errors="replace") else []
            except OSError:
                pass
        assert not alive, alive
    log = out / "logs" / "grpo_geneval.log"
    again = subprocess.run([*command, "--set", "train.max_steps=6"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"\[2/2\] grpo_geneval: resumed to step 6", again.stdout), again.stdout
    assert "resuming from step" in log.read_text()


def test_a_row_in_a_child_distils_teachers_given_as_model_rows(first_run: dict[str, Any], tmp_path: Path) -> None:
    # A study may point a student's teachers at model rows (weights as they are, e.g. a
    # committed teacher): the child that trains the student has no run of theirs to wait for.
    from opdkit.study import load_study
    from opdkit.study_jobs import run_one_row

    data = yaml.safe_load(first_run["study"].read_text())
    runs = first_run["out"] / "runs"
    teachers = {"geneval": "t_geneval", "ocr": "t_ocr", "quality": "t_quality"}
    opd = next(r for r in data["rows"] if r["name"] == "opd")
    data["rows"] = [{"name": f"t_{t}", "model": str(runs / f"grpo_{t}")} for t in teachers]
    data["rows"].append({**opd, "teachers": teachers})
    data["comparisons"] = []
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    timing = run_one_row(load_study(study, out=tmp_path / "out"), "opd", lambda line: None)
    assert timing["train"]["status"] == "trained"
    # the same teachers' weights as the first study's opd row, so the same student, bit for bit
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "out" / "runs" / "opd" / "final" / "lora.safetensors")
    theirs = load_file(runs / "opd" / "final" / "lora.safetensors")
    assert mine.keys() == theirs.keys() and all(bool((mine[k] == theirs[k]).all()) for k in mine)


def test_a_moved_study_folder_resumes_its_students_under_any_spelling(
    first_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A student records its teachers' paths as the study spelled ``--out``; moved elsewhere and
    named by a relative path, the folder still holds the same teachers (their weights' fingerprints
    in ``run.json``), so nothing is trained again and a cut student resumes."""
    import shutil

    import opdkit.methods
    from opdkit.study import load_study, plan_lines, run_study

    moved = tmp_path / "elsewhere" / "out"
    shutil.copytree(first_run["out"], moved)
    monkeypatch.chdir(tmp_path)
    study = load_study(first_run["study"], out=Path("elsewhere/out"))
    assert all("skip training" in line for line in plan_lines(study) if "opd" in line.split(":")[0])
    shutil.rmtree(moved / "runs" / "opd" / "final")  # killed after its last checkpoint
    resumed: list[tuple[str, bool]] = []
    real = opdkit.methods.train

    def train(loaded: Any, out_dir: Any, **kwargs: Any) -> Any:
        resumed.append((Path(out_dir).name, kwargs["resume"]))
        return real(loaded, out_dir, **kwargs)

    monkeypatch.setattr(opdkit.methods, "train", train)
    run_study(load_study(first_run["study"], out=Path("elsewhere/out")), echo=lambda line: None)
    assert resumed == [("opd", True)]
    history = json.loads((moved / "runs" / "opd" / "run.json").read_text())["history"]
    assert history[-1]["event"] == "resumed" and "teachers.0.path" in history[-1]["changed"]

    # a teacher at the new path with other weights is another teacher: the student is refused
    final = moved / "runs" / "grpo_ocr" / "final" / "lora.safetensors"
    shutil.copyfile(moved / "runs" / "grpo_quality" / "final" / "lora.safetensors", final)
    with pytest.raises(OpdkitError, match=r"holds a run of another recipe than row 'opd' \(teachers.1.path: "):
        run_study(load_study(first_run["study"], out=Path("elsewhere/out")), echo=lambda line: None)
