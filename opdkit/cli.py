"""The ``opdkit`` command line (Typer + rich).

Heavy imports (torch, diffusers) live inside the commands so ``opdkit --help`` stays fast.
User errors (:class:`opdkit.errors.OpdkitError`) print one line per problem and exit 1; a
traceback means a bug in opdkit.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from opdkit.errors import OpdkitError

app = typer.Typer(
    name="opdkit",
    help="Post-train text-to-image flow-matching models: Flow-GRPO teachers, Flow-OPD distillation, benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

KINDS = ("reward", "teacher", "router", "regularizer", "benchmark", "model", "detector", "color_classifier", "ocr_engine")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _plain(text: object) -> str:
    """``text`` escaped for rich markup: user input such as ``lr: "[/fast]"`` is shown verbatim."""
    from rich.markup import escape

    return escape(str(text))


def user_errors(fn: F) -> F:
    """Turn :class:`OpdkitError` into one red line per problem on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OpdkitError as exc:
            _report(exc, str(exc).splitlines() or [type(exc).__name__])
            raise typer.Exit(1) from None
        except OSError as exc:  # permission, not a folder, no space: name the path, one line
            where = exc.filename if exc.filename is not None else "opdkit"
            _report(exc, [f"{where}: {exc.strerror or type(exc).__name__}"])
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _console(stderr=True).print("[yellow]interrupted[/]: what was written is kept; rerun the same command to continue (train and distill: with --resume)")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _report(exc: BaseException, lines: list[str]) -> None:
    """Print an error as red lines; with ``OPDKIT_DEBUG=1`` (or ``opdkit --debug``) its traceback first."""
    import os

    console = _console(stderr=True)
    if os.environ.get("OPDKIT_DEBUG") == "1":
        import traceback

        console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
    for line in lines:
        console.print(f"[bold red]error:[/] {_plain(line)}", markup=True, highlight=False)


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, typed by the schema: --set train.lr=3e-4 (repeatable)."),
]


OverwriteOption = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace the run already in the --out folder (its checkpoints, weights and results)."),
]


EvalOption = Annotated[
    bool,
    typer.Option("--eval/--no-eval", help="After training, run the recipe's eval.benchmarks on the final weights (into RUN/results/)."),
]


def _run_recipe(recipe_path: str, overrides: list[str] | None, out: Path | None, resume: bool, require: str | None,
                evaluate: bool = True, overwrite: bool = False) -> None:
    from opdkit.methods import train
    from opdkit.recipe import load_recipe

    loaded = load_recipe(recipe_path, overrides or [])
    method = loaded.recipe.method
    if require is not None and method != require:
        raise OpdkitError(
            f"{loaded.path}: method is {method!r}; `opdkit distill` runs only recipes with method 'opd' "
            f"(use `opdkit train` for {method!r})"
        )
    out_dir = out if out is not None else Path("runs") / loaded.path.stem
    if resume and overwrite:
        raise OpdkitError("--resume continues a run and --overwrite replaces it: pass one of them")
    train(loaded, out_dir, resume=resume, evaluate=evaluate, overwrite=overwrite)


@app.command()
@user_errors
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or a shipped recipe name such as shapes/grpo_geneval.")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run directory's last checkpoint.")] = False,
    evaluate: EvalOption = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Train from a recipe (method pretrain, grpo or opd), then run its eval.benchmarks."""
    _run_recipe(recipe, set_, out, resume, require=None, evaluate=evaluate, overwrite=overwrite)


@app.command()
@user_errors
def distill(
    recipe: Annotated[str, typer.Argument(help="An OPD recipe (method: opd).")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run directory's last checkpoint.")] = False,
    evaluate: EvalOption = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Distil several teachers into one student by on-policy distillation (Flow-OPD), then run its eval.benchmarks."""
    _run_recipe(recipe, set_, out, resume, require="opd", evaluate=evaluate, overwrite=overwrite)


@app.command("eval")
@user_errors
def eval_(
    bench: Annotated[
        list[str],
        typer.Option("--bench", "-b", help="Benchmark name (see `opdkit list benchmark`); repeat it to run several on one loaded model."),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (e.g. shapes-base), pipeline directory, or run directory.")],
    samples: Annotated[int | None, typer.Option("--samples", help="Images per prompt (default: the benchmark's).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first K prompts: a quick look.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results directory.")] = Path("results"),
    seed: Annotated[int, typer.Option("--seed", help="Base seed; image i of prompt p uses a seed derived from it.")] = 0,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps (default: the benchmark's).")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Guidance scale (default: the benchmark's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images generated per forward batch.")] = 32,
    name: Annotated[str | None, typer.Option("--name", help="Model name in results (default: derived from --model).")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Benchmark parameter KEY=VALUE (repeatable).")
    ] = None,
    step: Annotated[
        int | None,
        typer.Option("--checkpoint", help="A GRPO/OPD run's checkpoint of this step instead of its final weights (filed as <run>-step<N>)."),
    ] = None,
) -> None:
    """Generate images for a benchmark's prompts, score them, and write results/<model>/<bench>.json
    (an image another benchmark of the folder made with the same prompt, seed, sampler and weights is read, not made again)."""
    from opdkit.eval.runner import check_eval_options, run_evals

    # ranges first: a bad value is one line before any model is loaded or any file written
    check_eval_options(samples=samples, limit=limit, steps=steps, cfg=cfg, batch_size=batch_size, name=name,
                       checkpoint=step)  # fmt: skip
    params = _parse_params(param or [])
    from rich.table import Table

    console = _console()

    def report(summary: dict[str, Any]) -> None:  # as each benchmark ends, not after the last
        table = Table(title=f"{summary['bench']} · {summary['model']} ({summary['n_images']} images, {summary['engine']})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in summary["metrics"].items():
            table.add_row(key, f"{value:.4f}")
        console.print(table)
        console.print(f"results: {out / summary['model'] / (summary['bench'] + '.json')}", markup=False)

    run_evals(
        bench,
        model,
        out_dir=out,
        samples=samples,
        limit=limit,
        seed=seed,
        steps=steps,
        cfg=cfg,
        batch_size=batch_size,
        name=name,
        bench_params=params,
        step=step,
        on_result=report,
    )


def _parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OpdkitError(f"--param {item}: expected KEY=VALUE")
        try:
            params[key] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise OpdkitError(
                f"--param {item}: VALUE is read as YAML and is not valid YAML ({problem}); put a text value in quotes"
            ) from None
    return params


@app.command()
@user_errors
def merge(
    adapters: Annotated[list[str], typer.Argument(help="LoRA adapter files or GRPO run directories (their final adapter).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged adapter file (.safetensors).")],
    method: Annotated[str, typer.Option("--method", help="mean, weighted or ties (all on the weight deltas B@A).")] = "mean",
    weights: Annotated[str | None, typer.Option("--weights", help="Comma-separated weights for 'weighted'/'ties'.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Compress to this rank by truncated SVD (default: exact).")] = None,
    density: Annotated[float, typer.Option("--density", help="TIES: fraction of entries kept per delta.")] = 0.2,
) -> None:
    """Merge LoRA teachers into one adapter on their weight deltas (OPD cold start)."""
    from opdkit.models.merge import merge_files
    from opdkit.options import check_count, check_float

    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise OpdkitError(f"--weights {weights}: expected comma-separated numbers") from None
        if not all(math.isfinite(w) for w in parsed):
            raise OpdkitError(f"--weights {weights}: expected finite numbers (no nan or inf)")
    check_count("--rank", rank)
    check_float("--density", density, above=0.0, maximum=1.0)
    path = merge_files(adapters, out, method=method, weights=parsed, rank=rank, density=density)
    _console().print(f"wrote {path}", markup=False)


@app.command()
@user_errors
def leaderboard(
    results_dir: Annotated[Path, typer.Argument(help="Directory of results/<model>/<bench>.json files.")] = Path("results"),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write FILE.md or FILE.html.")] = None,
    runs: Annotated[
        Path | None,
        typer.Option("--runs", help="Training runs whose reward/KL curves the HTML shows (default: runs/ beside RESULTS_DIR)."),
    ] = None,
) -> None:
    """Render one table of every model's benchmark results (terminal, Markdown or HTML)."""
    from opdkit.eval.leaderboard import run_leaderboard

    run_leaderboard(results_dir, out, runs_dir=runs)


@app.command()
@user_errors
def compare(
    model_a: Annotated[str, typer.Argument(help="Model name in the results (the first term of the difference).")],
    model_b: Annotated[str, typer.Argument(help="Model name in the results (subtracted).")],
    results_dir: Annotated[Path, typer.Option("--results", "-r", help="Directory of results/<model>/<bench>.json files.")] = Path("results"),
    bench: Annotated[list[str] | None, typer.Option("--bench", "-b", help="Only this benchmark (repeatable; default: all both have).")] = None,
) -> None:
    """Difference of two models on each benchmark, with its standard error paired over prompts."""
    from opdkit.eval.compare import compare as compare_models
    from opdkit.eval.compare import print_differences

    print_differences(compare_models(results_dir, model_a, model_b, bench or None), model_a, model_b)


@app.command()
@user_errors
def study(
    study_file: Annotated[str, typer.Argument(help="Study file (YAML) or a shipped one such as shapes/study.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Runs, results and the table go here (default: studies/<file name>).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a key of every trained row's recipe: --set train.max_steps=2 (repeatable)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be trained, evaluated and skipped; run nothing.")] = False,
    jobs: Annotated[
        int,
        typer.Option("--jobs", "-j", min=1, help="Rows run at once, each in its own process with its share of the CPU threads "
                     "(or a GPU of its own); a row waits for the rows it distils. Same results as one at a time."),
    ] = 1,
    row: Annotated[str | None, typer.Option("--row", hidden=True, help="Only this row, no table: a --jobs child.")] = None,
) -> None:
    """Train a study's missing rows, evaluate every row, print and write the table with paired SEs."""
    from opdkit.study import load_study, plan_lines, run_study

    loaded = load_study(study_file, set_ or [], out)
    console = _console()

    def echo(line: str) -> None:
        console.print(line, markup=False)

    if dry_run:
        for line in plan_lines(loaded):
            echo(line)
        return
    if row is not None or jobs > 1:
        from opdkit.study_jobs import run_one_row, run_study_in_processes

        if row is not None:
            run_one_row(loaded, row, echo)
        else:
            run_study_in_processes(loaded, jobs, echo)
        return
    run_study(loaded, echo=echo)


@app.command("list")
@user_errors
def list_(
    kind: Annotated[
        str | None, typer.Argument(help=f"One of: {', '.join(KINDS)}, recipe (recipes and study files).")
    ] = None,
) -> None:
    """List registered plug-ins (and shipped recipes) with where they come from."""
    from rich.table import Table

    from opdkit.registry import REGISTRIES

    wanted = kind.rstrip("s") if kind else None
    if wanted is not None and wanted not in REGISTRIES and wanted != "recipe":
        raise OpdkitError(f"unknown kind {kind!r}; expected one of: {', '.join((*KINDS, 'recipe'))}")
    table = Table(title="opdkit plug-ins" if wanted != "recipe" else "shipped recipes")
    for column in ("name", "kind", "source", "description"):
        table.add_column(column)
    if wanted in (None, "recipe"):
        from opdkit.recipes import shipped_recipes

        for name in shipped_recipes():
            table.add_row(_plain(name), "recipe", "shipped", _plain(_recipe_description(name)))
    for registry_kind in KINDS:
        if wanted not in (None, registry_kind):
            continue
        entries = REGISTRIES[registry_kind].entries()
        if not entries:
            table.add_row("-", registry_kind, "-", "(none registered)")
        for entry in entries:
            table.add_row(_plain(entry.name), entry.kind, _plain(entry.source), _plain(entry.doc))
    _console().print(table)


def _recipe_description(name: str) -> str:
    import yaml

    from opdkit.recipes import shipped_recipe

    path = shipped_recipe(name)
    try:
        data = yaml.safe_load(path.read_text()) if path else {}
    except yaml.YAMLError:
        return "(invalid YAML)"
    return str(data.get("description", "")).strip().splitlines()[0] if isinstance(data, dict) and data.get("description") else ""


@app.command()
def validate(
    recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped recipe names.")],
    set_: SetOption = None,
) -> None:
    """Check recipes without loading any model: exit 0, or one line per problem and exit 1."""
    from opdkit.recipe import load_recipe

    console, errors = _console(), _console(stderr=True)
    failed = False
    for recipe in recipes:
        try:
            if _is_study(recipe):  # a study file: its rows' recipes are checked too
                from opdkit.study import load_study

                checked = load_study(recipe, set_ or [])
                console.print(f"[green]ok[/] {_plain(checked.path)} (study, {len(checked.rows)} rows)")
                continue
            loaded = load_recipe(recipe, set_ or [])
        except OpdkitError as exc:
            failed = True
            for line in str(exc).splitlines():
                errors.print(f"[bold red]error:[/] {_plain(line)}", markup=True, highlight=False)
            continue
        console.print(f"[green]ok[/] {_plain(loaded.path)} ({loaded.recipe.method})")
    if failed:
        raise typer.Exit(1)


def _is_study(name: str) -> bool:
    from opdkit.recipe import resolve_recipe_path
    from opdkit.study import is_study_file

    try:
        return is_study_file(resolve_recipe_path(name))
    except OpdkitError:
        return False


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback behind an error (or set OPDKIT_DEBUG=1).")] = False,
) -> None:
    """opdkit: Flow-GRPO teachers, Flow-OPD distillation and benchmarks for flow-matching T2I models."""
    if debug:
        import os

        os.environ["OPDKIT_DEBUG"] = "1"


def quiet_libraries() -> None:
    """Keep the terminal for opdkit's own progress: no per-file bars or notices from HF libraries.

    Set before transformers/diffusers are imported (they read these at import time); a user's
    own settings win. ``OPDKIT_VERBOSE=1`` leaves the libraries as they are.
    """
    import os

    if os.environ.get("OPDKIT_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Click's usage-error class, as typer vendors it (and plain click's, for older typer)."""
    import importlib

    found: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).UsageError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def show_own_warnings() -> None:
    """Print opdkit's own warnings as one line, ``warning: MESSAGE``, as its errors are (the default
    format adds the category and the line of opdkit's source that warned); other libraries'
    warnings keep their format."""
    import warnings

    package = str(Path(__file__).resolve().parent)
    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:  # fmt: skip
        if issubclass(category, UserWarning) and str(filename).startswith(package):
            print(f"warning: {message}", file=file if file is not None else sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main() -> None:
    """Console-script entry point. A malformed command line (``--samples abc``) is one line and
    exit 2, like every other error, rather than click's usage box."""
    quiet_libraries()
    show_own_warnings()
    usage_errors = _usage_errors()
    try:
        code = app(prog_name="opdkit", standalone_mode=False)
    except usage_errors as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `opdkit`: its help
            typer.echo(ctx.get_help())
            sys.exit(0)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _console(stderr=True).print(f"[bold red]error:[/] {_plain(exc.format_message())}{hint}", markup=True)  # type: ignore[attr-defined]
        sys.exit(2)
    except typer.Abort:
        _console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
