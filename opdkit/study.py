"""``opdkit study``: a results table in one command, from a study file (over 500 lines: its schema, plan, runs and table are one feature read top to bottom).

A study file (YAML, e.g. ``recipes/shapes/study.yaml``) names the table's rows, its benchmark
columns, how every row is evaluated and which differences to report::

    benchmarks: [shapes-geneval, shapes-ocr]
    eval: {samples_per_prompt: 4}
    rows:
      - {name: base, model: shapes-base}                  # a model as it is: evaluated only
      - {name: teacher, recipe: shapes/grpo_ocr}          # trained by the study, then evaluated
      - name: student
        recipe: shapes/opd
        set: {regularizers: []}                           # --set overrides of this row
        teachers: {ocr: teacher}                          # the recipe's teacher `ocr` is row `teacher`
    comparisons:
      - {a: teacher, b: base, bench: shapes-ocr}

Under ``--out OUT`` a recipe row trains into ``OUT/runs/NAME`` through the function behind
``opdkit train`` (a finished run is skipped, a partial one resumed; a folder holding another
recipe is refused), every row is evaluated with the eval runner into
``OUT/results/NAME/BENCH.json`` (skipped where that file and its rows, ``BENCH.jsonl``, exist
with the study's settings), and every comparison is the paired difference of ``opdkit compare``. The table is printed and written
as ``OUT/table.md`` and ``OUT/table.json``; ``opdkit leaderboard OUT/results`` shows the same rows.

Rows are trained in file order, and a row's ``teachers`` may only name rows above it, so every
dependency is trained before the row that needs it. ``--jobs N`` runs up to N rows at once, each
in its own process (:mod:`opdkit.study_jobs`), with the same results.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opdkit.errors import OpdkitError, RecipeError
from opdkit.recipe import KeyedValueError, LoadedRecipe

ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

# --------------------------------------------------------------------------------------------
# Schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StudyEval(_Strict):
    """How every row is evaluated (the same for all rows, so that every pair of rows is paired)."""

    samples_per_prompt: int = Field(default=4, ge=1)
    seed: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1)  # only the first K prompts: a quick look
    steps: int | None = Field(default=None, ge=1)  # sampler steps; None: the benchmark's
    batch_size: int = Field(default=32, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)  # parameters of every benchmark


class StudyRow(_Strict):
    """One row: a model evaluated as it is (``model``), or a recipe the study trains (``recipe``)."""

    name: str
    description: str = ""
    model: str | None = None  # a registered model, a committed run (shapes-teachers/ocr) or a folder
    recipe: str | None = None  # a recipe file or shipped recipe name
    set: dict[str, Any] = Field(default_factory=dict)  # --set overrides of this row's recipe
    teachers: dict[str, str] = Field(default_factory=dict)  # OPD teacher name -> the row it is

    @model_validator(mode="after")
    def _one_source(self) -> StudyRow:
        if not ROW_NAME.match(self.name):
            raise KeyedValueError(
                ("name",), f"{self.name!r}: a row name is one folder name (letters, digits, _ . + -)"
            )
        if (self.model is None) == (self.recipe is None):
            raise ValueError("give exactly one of model (evaluate it as it is) and recipe (train it)")
        if self.model is not None and (self.set or self.teachers):
            raise KeyedValueError(
                ("set" if self.set else "teachers",),
                "only a recipe row is trained; a model row takes no overrides",
            )
        return self


class StudyComparison(_Strict):
    """``a - b`` on each benchmark of ``bench``, with its standard error paired over prompts."""

    a: str
    b: str
    bench: str | list[str]
    label: str = ""

    @property
    def benches(self) -> list[str]:
        return [self.bench] if isinstance(self.bench, str) else list(self.bench)


class Study(_Strict):
    """A study file: rows, benchmark columns, the eval protocol, and the differences to report."""

    description: str = ""
    benchmarks: list[str] = Field(min_length=1)
    eval: StudyEval = Field(default_factory=StudyEval)
    set: dict[str, Any] = Field(default_factory=dict)  # overrides of every recipe row
    rows: list[StudyRow] = Field(min_length=1)
    comparisons: list[StudyComparison] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> Study:
        seen: dict[str, StudyRow] = {}
        for i, row in enumerate(self.rows):
            if row.name in seen:
                raise KeyedValueError(("rows", i, "name"), f"{row.name!r} is repeated: row names are unique")
            for teacher, other in row.teachers.items():
                if other not in seen:
                    where = (
                        "is a row further down: rows are trained in order"
                        if other in {r.name for r in self.rows}
                        else "is no row"
                    )
                    raise KeyedValueError(("rows", i, "teachers", teacher), f"{other!r} {where}")
            seen[row.name] = row
        for i, comparison in enumerate(self.comparisons):
            for key in ("a", "b"):
                if getattr(comparison, key) not in seen:
                    raise KeyedValueError(
                        ("comparisons", i, key),
                        f"{getattr(comparison, key)!r} is no row (rows: {', '.join(seen)})",
                    )
            for bench in comparison.benches:
                if bench not in self.benchmarks:
                    raise KeyedValueError(
                        ("comparisons", i, "bench"),
                        f"{bench!r} is not in benchmarks ({', '.join(self.benchmarks)})",
                    )
        return self


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Row:
    """A row of a loaded study: where its model comes from, and its recipe when the study trains it."""

    name: str
    spec: StudyRow
    model: str  # what the eval runner loads: the model name, or the run folder
    loaded: LoadedRecipe | None = None
    run_dir: Path | None = None


@dataclass
class LoadedStudy:
    """A validated study file with every recipe row's recipe loaded (overrides applied)."""

    path: Path
    spec: Study
    out: Path
    rows: list[Row]
    overrides: list[str] = field(default_factory=list)
    # weight fingerprints and built benchmarks, computed once per invocation (see _model_facts)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def results_dir(self) -> Path:
        return self.out / "results"


def is_study_file(path: str | Path) -> bool:
    """True for a YAML mapping with ``rows`` and no ``method`` (a study, not a recipe)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "rows" in data and "method" not in data


def default_out(path: Path) -> Path:
    """Where ``opdkit study FILE`` writes without ``--out``: ``studies/<file stem>``."""
    return Path("studies") / path.stem


def load_study(
    path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None
) -> LoadedStudy:
    """Read and validate a study file and the recipe of every recipe row.

    ``overrides`` (``KEY.PATH=VALUE``, as ``--set``) apply to every recipe row after the study's
    and the row's own ``set``. Raises :class:`RecipeError`, one line per problem, naming the
    study file's line and key (and the row's recipe line where the recipe is at fault).
    """
    from opdkit.recipe import read_yaml_file, resolve_recipe_path
    from opdkit.rundir import check_out_folder

    path = resolve_recipe_path(path)
    data, lines = read_yaml_file(path, "a study")

    def where(loc: tuple[str | int, ...]) -> str:
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                return f"{path}:{lines[loc[:n]]}"
        return str(path)

    try:
        spec = Study.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(_problems(exc, where))) from None
    from opdkit.eval.runner import model_spec_problem

    problems = _check_benchmarks(spec, where)
    problems += [
        f"{where(('rows', i, 'model'))}: rows.{i}.model ({row.name}): {row.model!r}: {problem}"
        for i, row in enumerate(spec.rows)
        if row.model is not None and (problem := model_spec_problem(row.model)) is not None
    ]
    if problems:
        raise RecipeError("\n".join(problems))
    out_dir = Path(out) if out is not None else default_out(path)
    check_out_folder(out_dir)  # before any plan is printed or any row trained
    rows: list[Row] = []
    for i, row in enumerate(spec.rows):
        if row.model is not None:
            rows.append(Row(row.name, row, row.model))
            continue
        place = f"{where(('rows', i))}: rows.{i} ({row.name})"
        run_dir = out_dir / "runs" / row.name
        row_overrides = [*_as_overrides(spec.set), *_as_overrides(row.set), *(overrides or [])]
        loaded = _load_row_recipe(row, path.parent, row_overrides, {r.name: r.model for r in rows}, place)
        rows.append(Row(row.name, row, str(run_dir), loaded, run_dir))
    return LoadedStudy(path, spec, out_dir, rows, list(overrides or []))


def _load_row_recipe(
    row: StudyRow, base: Path, overrides: list[str], located: dict[str, str], place: str
) -> LoadedRecipe:
    """The row's recipe with its overrides, each of its ``teachers`` pointed at that row's model."""
    from opdkit.recipe import load_recipe

    assert row.recipe is not None
    recipe = (
        str(base / row.recipe)
        if (base / row.recipe).is_file() and not Path(row.recipe).is_file()
        else row.recipe
    )
    try:
        loaded = load_recipe(recipe, overrides, check_plugins=not row.teachers)
        if row.teachers:
            names = [t.name for t in getattr(loaded.recipe, "teachers", [])]
            for teacher in row.teachers:
                if teacher not in names:
                    raise RecipeError(
                        f"teachers.{teacher}: the recipe has no teacher {teacher!r} (its teachers: {', '.join(names) or 'none'})"
                    )
            pointed = [
                f"teachers.{names.index(t)}.path={json.dumps(located[other])}"
                for t, other in row.teachers.items()
            ]
            loaded = load_recipe(recipe, [*overrides, *pointed])
    except RecipeError as exc:
        raise RecipeError("\n".join(f"{place}: {line}" for line in str(exc).splitlines())) from None
    return loaded


def _as_overrides(values: dict[str, Any]) -> list[str]:
    """``{key.path: value}`` as ``--set`` strings; JSON is YAML, so each value reads back as given."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _check_benchmarks(spec: Study, where: Callable[[tuple[str | int, ...]], str]) -> list[str]:
    from opdkit.registry import benchmarks

    unknown, refused = benchmarks.problems(spec.benchmarks, spec.eval.params)
    problems = [f"{where(('benchmarks', i))}: benchmarks.{i}: {e}" for i, e in unknown.items()]
    if refused is not None:  # before any row trains: a misspelt split would fail at the first evaluation
        problems.append(f"{where(('eval', 'params'))}: eval.params: {refused}")
    return problems


def _problems(exc: ValidationError, where: Callable[[tuple[str | int, ...]], str]) -> list[str]:
    """One line per key: a value that fits no member of a union (``bench: 5``) fails once per
    member, and those failures become one line naming every type it could have been."""
    by_key: dict[str, list[str]] = {}
    for err in exc.errors():
        line = _format_error(err, where)
        by_key.setdefault(line.split(": ", 2)[1] if line.count(": ") >= 2 else line, []).append(line)
    problems = []
    for lines in by_key.values():
        kinds = [m.group(1) for line in lines if (m := re.search(r"Input should be a valid (\w+)", line))]
        if len(lines) > 1 and len(kinds) == len(lines):
            lines = [
                re.sub(
                    r"Input should be a valid \w+", "Input should be a valid " + " or ".join(kinds), lines[0]
                )
            ]
        problems.extend(lines)
    return problems


def _format_error(err: Any, where: Callable[[tuple[str | int, ...]], str]) -> str:
    """One pydantic error as ``FILE:LINE: key.path: what was expected``."""
    loc = tuple(
        p
        for p in err["loc"]
        if not (isinstance(p, str) and (p.startswith("function-") or p in ("str", "list[str]")))
    )
    error = (err.get("ctx") or {}).get("error")
    if isinstance(error, KeyedValueError):
        loc = (*loc, *error.loc)
    key = ".".join(str(p) for p in loc) or "(study)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(parent.model_fields)})" if parent is not None else ""
        msg = f"unknown key{allowed}"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {err['input']!r})"
    return f"{where(loc)}: {key}: {msg}"


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema model at a key path of a study (list indices skipped)."""
    models: dict[str, type[BaseModel]] = {"eval": StudyEval, "rows": StudyRow, "comparisons": StudyComparison}
    model: type[BaseModel] = Study
    for part in loc:
        if isinstance(part, int):
            continue
        found = models.get(str(part)) if model is Study else None
        if found is None:
            return None
        model = found
    return model


# --------------------------------------------------------------------------------------------
# What is there already


@dataclass
class TrainState:
    """A recipe row's run folder: ``missing``, ``partial`` (resumable at ``step``) or ``finished``."""

    status: str
    step: int = 0


def train_state(study: LoadedStudy, row: Row) -> TrainState:
    """How far the row's run folder got. Refuses a folder holding a run of another recipe, or of
    other base weights (a committed base that changed since): its numbers would not be the row's.
    Teachers are judged by their weights (:func:`opdkit.rundir.teacher_changes`): found at another
    path (the study folder moved, ``--out`` spelled another way) they are the same teachers;
    retrained since, they are others, and the student is refused.

    Finished means its final weights are written (``final/``, or pretraining's ``model/`` with its
    step record) and the run reached ``train.max_steps`` or its
    ``train.max_minutes`` (a run cut by its time budget is finished: resuming it would add a step).
    """
    from opdkit.rundir import RunDir, fixed_changes, teacher_changes
    from opdkit.runs import finished_step
    from opdkit.training.teachers import teacher_weights

    assert row.loaded is not None and row.run_dir is not None
    rundir = RunDir(row.run_dir)
    if not rundir.run_files():
        return TrainState("missing")
    info = rundir.read_info() or {}
    if isinstance(info.get("recipe"), dict):
        specs = getattr(row.loaded.recipe, "teachers", None) or []
        fixed = teacher_changes(
            fixed_changes(info["recipe"], row.loaded.recipe.model_dump(mode="json")), info["recipe"],
            info.get("teacher_weights"), lambda: teacher_weights(specs),
        )  # fmt: skip
        if fixed:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(fixed.items())[:3])
            raise OpdkitError(
                f"{row.run_dir}: holds a run of another recipe than row {row.name!r} ({shown}); {_REDO}"
            )
    base = info.get("base_weights")
    if base is not None and base != _base_weights(study, row):
        raise OpdkitError(
            f"{row.run_dir}: was trained on other base weights ({base}) than row {row.name!r}'s recipe loads now "
            f"({_base_weights(study, row)}); {_REDO}"
        )
    train = row.loaded.recipe.train
    latest = rundir.latest()
    finished = finished_step(row.run_dir)
    final_step = finished or 0
    reached = max(final_step, latest[0] if latest is not None else 0)
    if reached > train.max_steps:
        # train.max_steps may grow on --resume, but a lower one would report the longer run as this row
        raise OpdkitError(
            f"{row.run_dir}: holds a run trained to step {reached}, past row {row.name!r}'s "
            f"train.max_steps {train.max_steps}; {_REDO}"
        )
    if finished is not None and (finished >= train.max_steps or _out_of_time(latest, train.max_minutes)):
        return TrainState("finished", finished)
    return TrainState("partial", latest[0] if latest is not None else 0)


_REDO = "delete that folder to train the row again, or pass another --out"


def _out_of_time(latest: tuple[int, Path] | None, max_minutes: float | None) -> bool:
    if latest is None or max_minutes is None:
        return False
    try:
        state = json.loads((latest[1] / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return float(state.get("elapsed_s", 0.0)) >= 60.0 * max_minutes


@dataclass(frozen=True)
class _ModelFacts:
    """What results and runs record of a model, kept instead of the loaded model itself."""

    fingerprint: str  # LoraAdapters.base_fingerprint: the base a run trains on, rounded to bf16
    weights: str  # LoraAdapters.weights_fingerprint: the weights as they generate
    embedded_guidance: bool

    def base_fingerprint(self) -> str:
        return self.fingerprint

    def weights_fingerprint(self) -> str:
        return self.weights


# OUT/model_facts.json: the facts of every model a study loaded, with the files they came from.
FACTS_FILE = "model_facts.json"
# Bump when what a fingerprint hashes changes (LoraAdapters.base_fingerprint and
# weights_fingerprint) or an entry gains a field: older memos are ignored.
_FACTS_FORMAT = 2


def _model_facts(study: LoadedStudy, key: str, build: Callable[[], Any]) -> _ModelFacts:
    """The facts of the model ``build()`` makes, from this invocation's cache, else from
    ``OUT/model_facts.json`` while the files the model was loaded from are untouched
    (:func:`opdkit.checkpoint.files_stamp`), else by building it.

    Building is what costs: an SD3.5-M row is its whole pipeline loaded (and a LoRA run's adapter
    merged) to hash a sample of its weights, and a finished study checks every row's results
    against its weights each time it is run (``docs/results/study_startup.md``).
    """
    from opdkit.checkpoint import files_stamp

    if key in study.cache:
        return study.cache[key]
    entry = _read_facts_memo(study).get(_memo_key(key))
    try:
        if entry["stamp"] == files_stamp([Path(p) for p in entry["sources"]]):
            study.cache[key] = _ModelFacts(
                str(entry["fingerprint"]), str(entry["weights"]), bool(entry["embedded_guidance"])
            )
            return study.cache[key]
    except (KeyError, TypeError):  # not remembered, or an entry edited by hand: load the model
        pass
    return _remember_facts(study, key, build())


def _remember_facts(study: LoadedStudy, key: str, model: Any) -> _ModelFacts:
    """The facts of ``model``, built for ``key``: kept for this invocation, and in
    ``OUT/model_facts.json`` with the files it was loaded from (``model.sources``)."""
    from opdkit.checkpoint import files_stamp

    fingerprint = model.base_fingerprint() if hasattr(model, "base_fingerprint") else "unknown"
    weights = model.weights_fingerprint() if hasattr(model, "weights_fingerprint") else "unknown"
    facts = _ModelFacts(fingerprint, weights, bool(getattr(model, "embedded_guidance", False)))
    study.cache[key] = facts
    sources = getattr(model, "sources", None)
    # a model of unknown origin (a custom plug-in, the hub, files gone) is built each time
    if sources and all(Path(p).exists() for p in sources):
        memo = _read_facts_memo(study)  # read again: a child process may have added its rows meanwhile
        memo[_memo_key(key)] = {
            "sources": [str(p) for p in sources], "stamp": files_stamp(list(sources)),
            "fingerprint": facts.fingerprint, "weights": facts.weights, "embedded_guidance": facts.embedded_guidance,
        }  # fmt: skip
        _write_facts_memo(study, memo)
    return facts


def _memo_key(key: str) -> str:
    # with the working folder: a relative path in a row or recipe names other files elsewhere
    return json.dumps([key, str(Path.cwd())])


def _facts_header() -> dict[str, Any]:
    import torch

    import opdkit

    # a merged adapter's weights are torch's arithmetic: another torch may round them otherwise
    return {"format": _FACTS_FORMAT, "opdkit": opdkit.__version__, "torch": torch.__version__}


def _read_facts_memo(study: LoadedStudy) -> dict[str, Any]:
    data = read_json_object(study.out / FACTS_FILE)
    if data is None or data.get("header") != _facts_header() or not isinstance(data.get("models"), dict):
        return {}
    return dict(data["models"])


def _write_facts_memo(study: LoadedStudy, models: dict[str, Any]) -> None:
    from opdkit.rundir import atomic_write_json

    try:
        study.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(study.out / FACTS_FILE, {"header": _facts_header(), "models": models})
    except OSError:  # a read-only study folder: the facts are computed again next time
        pass


def _base_weights(study: LoadedStudy, row: Row) -> str:
    """The fingerprint of the base a recipe row trains on (what ``run.json`` records)."""
    from opdkit.registry import models

    assert row.loaded is not None
    spec = row.loaded.recipe.model
    key = "base:" + json.dumps([spec.type, spec.builder_params()], sort_keys=True, default=str)
    return _model_facts(study, key, lambda: models.build(spec.type, spec.builder_params())).fingerprint


def _eval_model(study: LoadedStudy, row: Row) -> _ModelFacts:
    """The weights the eval runner loads for a row, as far as its settings record them."""
    from opdkit.eval.runner import resolve_model

    return _model_facts(study, _eval_key(row), lambda: resolve_model(row.model)[0])


def _eval_key(row: Row) -> str:
    return f"eval:{row.model}"


def results_state(study: LoadedStudy, row: Row, bench: str) -> str:
    """``current`` (``OUT/results/ROW/BENCH.json`` made with the study's settings from the row's
    weights, with its rows in ``BENCH.jsonl``), ``missing``, ``partial`` (resumable: same settings,
    summary absent or of another limit, rows file absent or shorter than the summary says) or
    ``stale`` (other settings or other weights: to be deleted and made again)."""
    from opdkit.eval.runner import changed_settings, eval_settings, recorded_limit

    ev = study.spec.eval
    root = study.results_dir / row.name
    filed = filed_bench(study, bench)
    settings = read_json_object(root / f"{filed}.settings.json")
    if settings is None:
        return "missing"
    benchmark = _benchmark(study, bench)
    expected = eval_settings(benchmark, _eval_model(study, row), samples=ev.samples_per_prompt,
                             seed=ev.seed, steps=ev.steps)  # fmt: skip
    if changed_settings(settings, expected):
        return "stale"
    summary = read_json_object(root / f"{filed}.json")
    if summary is None or summary.get("limit") != recorded_limit(ev.limit, len(benchmark.prompts)):
        return "partial"
    # the comparisons pair the rows, not the summary: a summary whose rows are gone or cut short
    # is made again (the runner resumes from the rows that are left)
    return "current" if _holds_rows(root / f"{filed}.jsonl", summary.get("n_images")) else "partial"


def _holds_rows(path: Path, n_images: Any) -> bool:
    """Whether a results JSONL has at least ``n_images`` rows (lines are counted, not parsed: a
    finished study checks every row's results each time it is run)."""
    if isinstance(n_images, bool) or not isinstance(n_images, int):
        return False
    try:
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip()) >= n_images
    except OSError:
        return False


def _benchmark(study: LoadedStudy, bench: str) -> Any:
    """The benchmark ``bench`` of the study's file builds with its ``eval.params``, built once."""
    from opdkit.registry import benchmarks

    key = f"bench:{bench}"
    if key not in study.cache:
        study.cache[key] = benchmarks.build(bench, dict(study.spec.eval.params))
    return study.cache[key]


def filed_bench(study: LoadedStudy, bench: str) -> str:
    """The name the eval runner files ``bench``'s results under (``OUT/results/ROW/NAME.json``):
    the built benchmark's own name, which for a plug-in named by path (``./plug.py:build``) is
    whatever the plug-in calls itself, not the spec the study file gives."""
    return str(_benchmark(study, bench).name)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def row_work(study: LoadedStudy, row: Row) -> tuple[TrainState | None, dict[str, str]]:
    """What is left of a row: its run's state (None for a model row) and each benchmark's
    :func:`results_state`, ``retrain`` for all where the run is not finished (training replaces them)."""
    state = train_state(study, row) if row.loaded is not None else None
    retrain = state is not None and state.status != "finished"
    return state, {b: "retrain" if retrain else results_state(study, row, b) for b in study.spec.benchmarks}


def plan_lines(study: LoadedStudy) -> list[str]:
    """What :func:`run_study` would do, one line per row, without training or evaluating."""
    lines = []
    for row in study.rows:
        state, states = row_work(study, row)
        retrain = state is not None and state.status != "finished"
        if state is None:
            train = f"model {row.model}: nothing to train"
        else:
            train = {
                "missing": f"train {row.spec.recipe} into {row.run_dir}",
                "partial": f"resume {row.run_dir} from step {state.step}",
                "finished": f"trained ({row.run_dir}, step {state.step}): skip training",
            }[state.status]
            if retrain and (study.results_dir / row.name).exists():
                train += f"; remove the old results {study.results_dir / row.name}"
        todo = [
            f"{b}" + (" (again: other settings or weights)" if s == "stale" else "")
            for b, s in states.items()
            if s != "current"
        ]
        done = [b for b, s in states.items() if s == "current"]
        evals = f"evaluate {', '.join(todo)}" if todo else "no eval"
        lines.append(
            f"{row.name}: {train}; {evals}" + (f" (results present: {', '.join(done)})" if done else "")
        )
    lines.append(
        f"then {len(study.spec.comparisons)} comparisons into {study.out / 'table.md'} and table.json"
    )
    return lines


# --------------------------------------------------------------------------------------------
# Running


def run_study(study: LoadedStudy, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train what is missing, evaluate what has no current results, compare; returns the table as
    data (also written as ``OUT/table.json`` and ``OUT/table.md``). Rows run one at a time, in this
    process; :func:`opdkit.study_jobs.run_study_in_processes` runs several at once."""
    t0 = time.perf_counter()
    with study_lock(study):
        timings = [run_row(study, row, echo) for row in study.rows]
        return finish_study(study, timings, t0, echo)


@contextmanager
def study_lock(study: LoadedStudy) -> Iterator[None]:
    """Hold ``OUT/.lock`` while a study runs there (creating OUT): a second ``opdkit study`` of the
    folder is refused at once, before it plans work the first is doing."""
    from opdkit.rundir import folder_lock

    study.out.mkdir(parents=True, exist_ok=True)
    with folder_lock(study.out, "another `opdkit study` is running in this folder", "wait for it to finish, or pass another --out"):
        yield


def finish_study(
    study: LoadedStudy, timings: list[dict[str, Any]], t0: float, echo: Callable[[str], None], jobs: int = 1
) -> dict[str, Any]:
    """The table of rows that are all trained and evaluated, with their ``timings``, printed and
    written; ``t0`` is when the invocation started (``time.perf_counter()``)."""
    table = build_table(study)
    table["timings"] = timings
    table["jobs"] = jobs
    table["wall_seconds"] = round(time.perf_counter() - t0, 2)
    write_table(study.out, table)
    echo(to_markdown(table))
    echo(f"study done in {_clock(table['wall_seconds'])}; wrote {study.out / 'table.md'} and {study.out / 'table.json'}; "
         f"`opdkit leaderboard {study.results_dir}` shows the same rows")  # fmt: skip
    return table


def row_label(study: LoadedStudy, row: Row) -> str:
    """``[n/N] name``: how progress lines name a row."""
    return f"[{study.rows.index(row) + 1}/{len(study.rows)}] {row.name}"


def run_row(study: LoadedStudy, row: Row, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the row if its run is missing or partial, evaluate it where its results are not
    current; returns what was done and how long it took (an entry of ``table.json``'s timings)."""
    label = row_label(study, row)
    t_row = time.perf_counter()
    trained = _train_row(study, row, echo, label)
    t_eval = time.perf_counter()
    evaluated = _evaluate_row(study, row, echo, label)
    timing = {"row": row.name, "train": trained, "evaluated": evaluated,
              "train_seconds": round(t_eval - t_row, 2), "eval_seconds": round(time.perf_counter() - t_eval, 2)}  # fmt: skip
    echo(row_summary(label, timing))
    return timing


def row_summary(label: str, timing: dict[str, Any]) -> str:
    """The progress line of a row done: what was trained and evaluated, and how long it took."""
    evaluated = timing["evaluated"]
    what = f"evaluated {', '.join(evaluated)}" if evaluated else "results present"
    return f"{label}: {timing['train']['what']}; {what} ({_clock(timing['train_seconds'] + timing['eval_seconds'])})"


def _train_row(study: LoadedStudy, row: Row, echo: Callable[[str], None], label: str) -> dict[str, Any]:
    """Train or resume a recipe row unless its run is finished (old results of the row go)."""
    from opdkit.methods import train

    if row.loaded is None:
        return {"status": "model", "what": f"model {row.model}"}
    state = train_state(study, row)
    if state.status == "finished":
        return {"status": "finished", "step": state.step, "what": f"trained (step {state.step})"}
    stale = study.results_dir / row.name
    if stale.exists():  # results of other weights of this row: they would not pair with the new ones
        echo(f"{label}: removing {stale} (results of earlier weights)")
        shutil.rmtree(stale)
    doing = f"resuming from step {state.step}" if state.status == "partial" else "training"
    echo(f"{label}: {doing} into {row.run_dir}")
    assert row.run_dir is not None
    train(row.loaded, row.run_dir, resume=state.status == "partial", evaluate=False)
    study.cache.pop(f"eval:{row.model}", None)  # new final weights
    after = train_state(study, row)
    verb = "resumed" if state.status == "partial" else "trained"
    return {"status": verb, "step": after.step, "what": f"{verb} to step {after.step}"}


def _evaluate_row(study: LoadedStudy, row: Row, echo: Callable[[str], None], label: str) -> list[str]:
    """Evaluate the row on every benchmark whose results are not current (stale ones are deleted
    first; partial ones resume); returns those benchmarks."""
    from opdkit.eval.runner import remove_results, run_evals

    ev = study.spec.eval
    todo = []
    for bench in study.spec.benchmarks:
        state = results_state(study, row, bench)
        if state == "current":
            continue
        if state == "stale":
            echo(f"{label}: {bench} results were made with other settings or weights; evaluating again")
            remove_results(study.results_dir / row.name, filed_bench(study, bench))
        todo.append(bench)
    if todo:  # one model load for all of them
        run_evals(todo, row.model, out_dir=study.results_dir, samples=ev.samples_per_prompt, limit=ev.limit,
                  seed=ev.seed, steps=ev.steps, batch_size=ev.batch_size, name=row.name, bench_params=dict(ev.params),
                  on_model=lambda model: _remember_facts(study, _eval_key(row), model))  # fmt: skip
    return todo


def build_table(study: LoadedStudy) -> dict[str, Any]:
    """Every row's headline value and standard error per benchmark (with ``stderr_unit``:
    ``prompt``, or ``image`` for a summary written before it was recorded), and every comparison's
    paired difference (:func:`opdkit.eval.compare.compare`, as ``opdkit compare`` prints it)."""
    from opdkit.eval.compare import compare
    from opdkit.eval.leaderboard import load_results
    from opdkit.eval.uncertainty import stderr_unit

    results = load_results(study.results_dir)
    rows = []
    for row in study.rows:
        cells = {}
        for bench in study.spec.benchmarks:
            filed = filed_bench(study, bench)
            summary = results.get(row.name, {}).get(filed)
            if summary is None:
                raise OpdkitError(
                    f"{study.results_dir / row.name / (filed + '.json')}: missing after the eval"
                )
            # a summary written before stderr_unit was recorded keeps its stderr over images
            cells[bench] = {"value": summary["metrics"].get("overall"), "stderr": summary.get("stderr"),
                            "stderr_unit": stderr_unit(summary), "n_prompts": summary.get("n_prompts"),
                            "n_images": summary.get("n_images")}  # fmt: skip
        rows.append({"name": row.name, "source": _source(row), "run_dir": str(row.run_dir) if row.run_dir else None,
                     "recipe_overrides": row.loaded.overrides if row.loaded is not None else [],
                     "train_seconds": _run_seconds(row), "results": cells})  # fmt: skip
    comparisons = []
    for c in study.spec.comparisons:
        differences = compare(study.results_dir, c.a, c.b, [filed_bench(study, b) for b in c.benches])
        for bench, d in zip(c.benches, differences, strict=True):
            z = d.diff / d.stderr if d.stderr > 0 else None
            comparisons.append({"a": c.a, "b": c.b, "bench": bench, "label": c.label, "a_value": d.a, "b_value": d.b,
                                "diff": d.diff, "stderr": d.stderr, "z": z, "ci95": list(d.interval), "n_prompts": d.n_prompts})  # fmt: skip
    ev = study.spec.eval
    return {"study": str(study.path), "description": study.spec.description, "out": str(study.out),
            "set": _as_overrides(study.spec.set), "overrides": study.overrides, "benchmarks": list(study.spec.benchmarks), "eval": ev.model_dump(mode="json"),
            "rows": rows, "comparisons": comparisons}  # fmt: skip


def _source(row: Row) -> str:
    """What a row is, short: the model, or the recipe with the row's own overrides and teachers
    (the study-wide and command-line overrides are listed once, in the JSON's ``overrides``)."""
    if row.loaded is None:
        return row.model
    parts = [str(row.spec.recipe), *_as_overrides(row.spec.set)]
    if row.spec.teachers:
        parts.append("teachers " + ", ".join(f"{t}={other}" for t, other in row.spec.teachers.items()))
    return " ".join(parts)


def _run_seconds(row: Row) -> float | None:
    """Training seconds the run recorded (over every resume), from its last metrics line."""
    from opdkit.rundir import read_jsonl

    if row.run_dir is None:
        return None
    records = read_jsonl(row.run_dir / "metrics.jsonl")
    return float(records[-1]["seconds"]) if records and "seconds" in records[-1] else None


def write_table(out: Path, table: dict[str, Any]) -> None:
    """``OUT/table.json`` and ``OUT/table.md``, each written atomically."""
    from opdkit.rundir import atomic_write_json, atomic_write_text

    atomic_write_json(out / "table.json", table)
    atomic_write_text(out / "table.md", to_markdown(table) + "\n")


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _split_words(params: dict[str, Any]) -> str:
    """``test prompt``, or ``prompt of the train split (PARAMS)`` where benchmark params chose another."""
    split = params.get("split", "test")
    others = ", ".join(f"{k}={v}" for k, v in params.items() if k != "split")
    what = "test prompt" if split == "test" else f"prompt of the {split} split"
    return what + (f" (benchmark params {others})" if others else "")


IMAGE_MARK = "(img)"
"""Marks a table cell whose ± is the standard error over images, from a summary written before
summaries recorded it over prompts (no ``stderr_unit``)."""


def to_markdown(table: dict[str, Any]) -> str:
    """The table (rows x benchmarks: value +- SE over prompts) and the comparisons (difference +-
    paired SE); a cell of older results, whose SE is over images, carries :data:`IMAGE_MARK`."""
    from opdkit.eval.uncertainty import IMAGE_UNIT, stderr_unit

    benches = table["benchmarks"]
    ev = table["eval"]
    lines = [f"# {table['description'] or table['study']}", ""]
    lines += [
        "| row | " + " | ".join(benches) + " | train wall | source |",
        "|---" * (len(benches) + 3) + "|",
    ]
    per_image = False
    for row in table["rows"]:
        cells = []
        for b in benches:
            cell = row["results"][b]
            # a table.json cell without stderr_unit was written when every stderr was over images
            over_images = stderr_unit(cell) == IMAGE_UNIT and cell.get("stderr") is not None
            per_image |= over_images
            cells.append(f"{_num(cell['value'])} ± {_num(cell['stderr'])}" + (f" {IMAGE_MARK}" if over_images else ""))
        lines.append(
            f"| {row['name']} | "
            + " | ".join(cells)
            + f" | {_clock(row['train_seconds'])} | `{row['source']}` |"
        )
    subset = f", first {ev['limit']} prompts" if ev.get("limit") else ""
    lines += [
        "",
        f"{ev['samples_per_prompt']} samples per {_split_words(ev.get('params') or {})}{subset}, seed {ev['seed']}; "
        "± is the standard error over prompts (GenEval: within tags)"
        + (f"; {IMAGE_MARK}: over images, smaller (results evaluated before it was taken over prompts)." if per_image else "."),
    ]
    if table["comparisons"]:
        lines += [
            "",
            "| A - B | benchmark | A | B | A - B | SE (paired) | in SEs | prompts |",
            "|---" * 8 + "|",
        ]
        for c in table["comparisons"]:
            label = f"{c['a']} - {c['b']}" + (f" ({c['label']})" if c["label"] else "")
            z = "-" if c["z"] is None else f"{c['z']:+.1f}"
            lines.append(f"| {label} | {c['bench']} | {_num(c['a_value'])} | {_num(c['b_value'])} | {_num(c['diff'], '+.3f')} "
                         f"| {_num(c['stderr'])} | {z} | {c['n_prompts']} |")  # fmt: skip
    if table.get("wall_seconds") is not None:
        at_once = f" ({table['jobs']} rows at a time)" if table.get("jobs", 1) > 1 else ""
        lines += ["", f"Wall time of this invocation: {_clock(table['wall_seconds'])}{at_once}."]
    return "\n".join(lines)
