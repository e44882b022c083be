"""The command line: fast torch-free --help, `opdkit list`, and every shipped recipe validates."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opdkit.cli import KINDS, app
from opdkit.registry import REGISTRIES

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNER = CliRunner()
WIDE = {"COLUMNS": "250"}  # one table row per line
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` away from the repository root (so ``rewards/`` is not importable)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def table_rows(output: str) -> list[tuple[str, str, str, str]]:
    """(name, kind, source, description) of each body row of a rich table printed one row per line."""
    rows = []
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if len(cells) == 4 and cells[0]:
            rows.append((cells[0], cells[1], cells[2], cells[3]))
    return rows


# -- --help ----------------------------------------------------------------------------------


def test_help_lists_commands() -> None:
    result = RUNNER.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for command in ("train", "distill", "eval", "leaderboard", "compare", "merge", "list", "validate"):
        assert command in result.output


def test_no_arguments_shows_help() -> None:
    result = RUNNER.invoke(app, [], env=WIDE)
    assert "Usage" in result.output
    assert "Traceback" not in result.output


def test_help_imports_no_torch(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from opdkit.cli import app
        try:
            app(["--help"], prog_name="opdkit")
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, f"--help imported {{heavy}}"
        """
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage: opdkit" in result.stdout
    # Its wall time is measured by perf/startup_and_render.py: timings are not test assertions.


# -- list ----------------------------------------------------------------------------------------


def test_list_shows_every_kind_as_rows() -> None:
    result = RUNNER.invoke(app, ["list"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    kinds = {kind for _, kind, _, _ in rows}
    assert set(KINDS) <= kinds
    assert sorted(KINDS) == sorted(REGISTRIES)
    listed = {(name, kind) for name, kind, _, _ in rows}
    for kind, registry in REGISTRIES.items():
        names = registry.names()
        if names:
            assert {(name, kind) for name in names} <= listed
        else:
            assert ("-", kind) in listed  # an empty kind still gets its row
    assert ("shapes_geneval", "reward") in listed
    assert ("tag", "router") in listed


def test_list_filters_by_kind() -> None:
    result = RUNNER.invoke(app, ["list", "router"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert rows
    assert {kind for _, kind, _, _ in rows} == {"router"}
    assert {name for name, _, _, _ in rows} == set(REGISTRIES["router"].names())
    plural = RUNNER.invoke(app, ["list", "routers"], env=WIDE)
    assert plural.exit_code == 0
    assert table_rows(plural.stdout) == rows


def test_list_model_shows_every_family_with_a_one_line_doc() -> None:
    result = RUNNER.invoke(app, ["list", "model"], env=WIDE)
    assert result.exit_code == 0, result.output
    docs = {name: doc for name, kind, _, doc in table_rows(result.stdout) if kind == "model"}
    for name in ("sd3", "flux", "qwen-image", "shapes", "shapes-base", "shapes_new"):
        assert docs.get(name, "").strip(), f"model {name!r} is not listed with a doc"
    assert "FluxPipeline" in docs["flux"] and "QwenImagePipeline" in docs["qwen-image"]


def test_list_help_names_every_kind() -> None:
    result = RUNNER.invoke(app, ["list", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for kind in (*REGISTRIES, "recipe"):
        assert kind in text, f"'opdkit list --help' does not name {kind!r}"


def test_list_unknown_kind_is_one_line_error() -> None:
    result = RUNNER.invoke(app, ["list", "bogus"], env=WIDE)
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: unknown kind 'bogus'; expected one of: ")
    for kind in KINDS:
        assert kind in line
    assert result.stdout == ""


def test_list_shows_docs_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    """A docstring with brackets is text, not rich markup (``[/x]`` would crash the renderer)."""
    from opdkit.registry import rewards

    def tricky() -> None:
        """Scores list[str] prompts in [0, 1] with [bold]no[/bold] markup [/oops]."""

    rewards.names()
    monkeypatch.setattr(rewards, "_builders", {**rewards._builders, "tricky_doc": tricky})
    monkeypatch.setattr(rewards, "_sources", {**rewards._sources, "tricky_doc": "builtin"})
    result = RUNNER.invoke(app, ["list", "reward"], env=WIDE)
    assert result.exit_code == 0, result.output
    (row,) = [r for r in table_rows(result.stdout) if r[0] == "tricky_doc"]
    assert row[3] == "Scores list[str] prompts in [0, 1] with [bold]no[/bold] markup [/oops]."


def test_list_shows_entry_point_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_modules: Callable[[str], None]
) -> None:
    from opdkit.registry import routers

    module = "opdkit_test_router_plugin"
    dist_info = tmp_path / "opdkit_test_routers-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: opdkit-test-routers\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[opdkit.routers]\nby_length = {module}:route\n")
    (tmp_path / f"{module}.py").write_text("raise RuntimeError('must not be imported by opdkit list')\n")
    forget_modules(module)
    routers.names()
    monkeypatch.setattr(routers, "_entry_points", None)  # restored after the test
    monkeypatch.syspath_prepend(str(tmp_path))
    result = RUNNER.invoke(app, ["list", "router"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert ("by_length", "router", "entry point (opdkit-test-routers)", f"{module}:route") in rows
    assert module not in sys.modules


# -- shipped recipes validate -----------------------------------------------------------------

SHIPPED = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "recipes").glob("**/*.yaml"))


@pytest.mark.parametrize(
    "recipe",
    SHIPPED or [pytest.param(None, marks=pytest.mark.skip(reason="no recipes shipped under recipes/ yet"))],
)
def test_shipped_recipe_validates(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    result = RUNNER.invoke(app, ["validate", recipe], env=WIDE)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok "), result.output
    # The same recipe by its shipped name (what `opdkit train shapes/...` accepts).
    name = recipe.removeprefix("recipes/").removesuffix(".yaml")
    by_name = RUNNER.invoke(app, ["validate", name], env=WIDE)
    assert by_name.exit_code == 0, by_name.output


def test_shipped_recipe_names_match_the_folder() -> None:
    from opdkit.recipes import shipped_recipes

    expected = sorted(r.removeprefix("recipes/").removesuffix(".yaml") for r in SHIPPED)
    assert shipped_recipes() == expected
    result = RUNNER.invoke(app, ["list", "recipe"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert sorted(name for name, kind, _, _ in table_rows(result.stdout) if kind == "recipe") == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "-b", "shapes-quality", "-m", "shapes-base", "--samples", "abc"], "Invalid value for '--samples'"),
        (["bogus"], "No such command 'bogus'"),
        (["train"], "Missing argument 'recipe'"),
    ],
)
def test_a_malformed_command_line_is_one_line(args: list[str], expected: str) -> None:
    """Through the console script (not click's usage box): one error line, exit 2."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "from opdkit.cli import main; main()", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["[test", "{a: 1", "a: b: c"])
def test_a_param_value_that_is_not_yaml_is_one_line(value: str, tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["eval", "-b", "shapes-ocr", "-m", "shapes-base", "-p", f"split={value}", "--out",
                                 str(tmp_path / "res")])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --param split={value}: VALUE is read as YAML and is not valid YAML")
    assert not (tmp_path / "res").exists()


def test_own_warnings_are_one_line_and_other_libraries_keep_theirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The console script prints opdkit's warnings as ``warning: MESSAGE`` (as its errors), not
    Python's ``FILE:LINE: UserWarning: MESSAGE`` naming opdkit's source."""
    import io
    import warnings

    import opdkit.rundir
    from opdkit.cli import show_own_warnings

    passed_on: list[tuple[str, type[Warning], str]] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, *rest: passed_on.append(
        (str(message), category, filename)))  # fmt: skip
    show_own_warnings()
    own = io.StringIO()
    warnings.showwarning("runs/x: a note", UserWarning, opdkit.rundir.__file__, 12, file=own)
    warnings.showwarning("deprecated", FutureWarning, "/site-packages/lib.py", 3)
    warnings.showwarning("a library's note", UserWarning, "/site-packages/lib.py", 4)
    assert own.getvalue() == "warning: runs/x: a note\n"
    assert passed_on == [("deprecated", FutureWarning, "/site-packages/lib.py"),
                         ("a library's note", UserWarning, "/site-packages/lib.py")]  # fmt: skip
