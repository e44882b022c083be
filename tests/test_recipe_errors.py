"""Malformed recipes: each gives ONE line naming file, line, key path and expectation; exit 1, no traceback.

Also: valid ``--set`` overrides are typed by the schema, and a custom reward named by path
(``./my_reward.py:score`` or ``module.path:score``) loads and runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from opdkit.cli import app
from opdkit.errors import OpdkitError, RecipeError
from opdkit.recipe import load_recipe

RUNNER = CliRunner()


def edit(text: str, old: str, new: str) -> str:
    """``text`` with its single occurrence of ``old`` replaced (a typo in a case fails loudly)."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


TO_OPD = (("method: grpo", "method: opd"),)
TEACHERS = "teachers:\n  - name: geneval\n    type: lora\n    path: runs/geneval\n"
REWARDS = "rewards:\n  - type: shapes_geneval\n    weight: 1.0\n    params:\n      strict: false\n"


@dataclass(frozen=True)
class Case:
    """A malformed recipe and the one error line expected from it.

    ``expected`` is a regex matched against the whole line after ``error: ``; ``{file}`` stands for
    the recipe's path and ``{line}`` for the 1-based number of the only line containing ``anchor``.
    """

    id: str
    expected: str
    anchor: str | None = None
    edits: tuple[tuple[str, str], ...] = ()  # (old, new) applied to the minimal recipe
    append: str = ""
    whole: str | None = None  # the whole text instead of the edited minimal recipe
    missing: bool = False  # write no file at all
    args: tuple[str, ...] = ()
    commands: tuple[str, ...] = ("validate",)

    def text(self, minimal: str) -> str:
        if self.whole is not None:
            return self.whole
        for old, new in self.edits:
            minimal = edit(minimal, old, new)
        return minimal + self.append


CASES = [
    Case(
        "yaml-syntax",
        r"{file}:{line}: invalid YAML: mapping values are not allowed here",
        anchor="   resolution",
        edits=(("  resolution: 32", "   resolution: 32"),),
        commands=("validate", "train"),
    ),
    Case(
        "yaml-duplicate-key",
        r"{file}:{line}: method: duplicate key \(first given on line 1\)",
        anchor="method: opd",
        append="method: opd\n",
    ),
    Case(
        "not-a-mapping",
        r"{file}:1: a recipe must be a YAML mapping of sections, got list",
        whole="- method: grpo\n- train: {seed: 0}\n",
    ),
    Case(
        "empty-file",
        r"{file}:1: a recipe must be a YAML mapping of sections, got NoneType",
        whole="# nothing here\n",
    ),
    Case(
        "lr-not-a-number",
        r"{file}:{line}: train\.lr: Input should be a valid number, unable to parse string as a number \(got 'fast'\)",
        anchor="lr:",
        edits=(("lr: 1.0e-4", 'lr: "fast"'),),
        commands=("validate", "train"),
    ),
    Case(
        "lr-negative",
        r"{file}:{line}: train\.lr: Input should be greater than 0 \(got -0\.0001\)",
        anchor="lr:",
        edits=(("lr: 1.0e-4", "lr: -1.0e-4"),),
    ),
    Case(
        "markup-in-value-shown-verbatim",
        r"{file}:{line}: train\.lr: Input should be a valid number.* \(got '\[/fast\]'\)",
        anchor="lr:",
        edits=(("lr: 1.0e-4", 'lr: "[/fast]"'),),
    ),
    Case(
        "batch-size-fraction",
        r"{file}:{line}: train\.batch_size: Input should be a valid integer, "
        r"got a number with a fractional part \(got 2\.5\)",
        anchor="batch_size",
        edits=(("batch_size: 2", "batch_size: 2.5"),),
    ),
    Case(
        "unknown-top-level-key",
        r"{file}:{line}: optimizer: unknown key \(allowed: description, eval, method, model, prompts, "
        r"rewards, sampler, train\)",
        anchor="optimizer",
        append="optimizer: adam\n",
    ),
    Case(
        "unknown-nested-key",
        r"{file}:{line}: sampler\.stepz: unknown key; did you mean 'steps'\? \(allowed: .*\bsteps\b.*\)",
        anchor="stepz",
        edits=(("  steps: 4", "  stepz: 4"),),
    ),
    Case(
        "section-not-a-mapping",
        r"{file}:{line}: sampler: Input should be a valid dictionary or instance of SamplerSpec \(got 'fast'\)",
        anchor="sampler:",
        edits=(("sampler:\n  steps: 4\n  resolution: 32\n", "sampler: fast\n"),),
    ),
    Case(
        "unknown-plugin",
        r"{file}:{line}: rewards\.0\.type: unknown reward 'shape_ocr'; did you mean 'shapes_ocr'.*\(known: .*\)",
        anchor="shape_ocr",
        edits=((REWARDS, "rewards:\n  - type: shape_ocr\n"),),
        commands=("validate", "train"),
    ),
    Case(
        "bad-plugin-params",
        r"{file}:{line}: rewards\.0\.params: reward 'shapes_geneval': bad parameters \['strickt'\]: "
        r"got an unexpected keyword argument 'strickt' \(accepted: strict\)",
        anchor="params:",
        edits=(("strict: false", "strickt: false"),),
    ),
    Case(
        "missing-file-plugin",
        r"{file}:{line}: rewards\.0\.type: reward './missing\.py:fn': file '.*missing\.py' does not exist",
        anchor="missing.py",
        edits=(("type: shapes_geneval", "type: ./missing.py:fn"),),
    ),
    Case(
        "missing-seed",
        r"{file}:{line}: train\.seed: required key is missing",
        anchor="train:",
        edits=(("  seed: 0\n", ""),),
    ),
    Case(
        "grpo-without-rewards",
        r"{file}:{line}: rewards: method grpo needs at least one entry in 'rewards'",
        anchor="rewards:",
        edits=((REWARDS, "rewards: []\n"),),
    ),
    Case(
        "opd-without-teachers",
        r"{file}:1: teachers: method opd needs at least one entry in 'teachers'",
        edits=TO_OPD,
        append="router:\n  type: tag\n",
    ),
    Case(
        "opd-without-router",
        r"{file}:1: router: method opd needs a 'router'.*",
        edits=TO_OPD,
        append=TEACHERS,
        commands=("validate", "train"),
    ),
    Case(
        "duplicate-teacher-names",
        r"{file}:{line}: teachers\.1\.name: teacher names must be unique, 'geneval' is repeated",
        anchor="    name: geneval",
        edits=TO_OPD,
        append=TEACHERS + "  - type: base\n    name: geneval\nrouter:\n  type: tag\n",
    ),
    Case(
        "unknown-router",
        r"{file}:{line}: router\.type: unknown router 'tags'; did you mean 'tag'.*",
        anchor="type: tags",
        edits=TO_OPD,
        append=TEACHERS + "router:\n  type: tags\n",
    ),
    Case(
        "nan-weight",
        r"{file}:{line}: rewards\.0\.weight: Input should be a finite number \(got nan\)",
        anchor="weight",
        edits=(("weight: 1.0", "weight: .nan"),),
    ),
    Case(
        "inf-weight",
        r"{file}:{line}: rewards\.0\.weight: Input should be a finite number \(got -inf\)",
        anchor="weight",
        edits=(("weight: 1.0", "weight: -.inf"),),
    ),
    Case(
        "unknown-method",
        r"{file}:{line}: method: expected one of: pretrain, grpo, opd \(got 'ppo'\)",
        anchor="method",
        edits=(("method: grpo", "method: ppo"),),
    ),
    Case(
        "train-window-outside-steps",
        r"{file}:{line}: sampler\.train_window: \[2, 9\) must satisfy 0 <= start < stop <= steps \(4\)",
        anchor="train_window",
        edits=(("  resolution: 32", "  resolution: 32\n  train_window: [2, 9]"),),
    ),
    Case(
        "fold-without-shapes",
        r"{file}:{line}: prompts\.split: 'train-minus-fold' needs the shapes dataset, got dataset 'drawbench'",
        anchor="split:",
        edits=(("dataset: shapes", "dataset: drawbench\n  split: train-minus-fold"),),
    ),
    Case(
        "prompts-file-missing",
        r"{file}:{line}: prompts\.dataset: prompt file '.*missing_prompts\.jsonl' does not exist",
        anchor="dataset:",
        edits=(("dataset: shapes", "dataset: data/missing_prompts.jsonl"),),
    ),
    Case(
        "unknown-benchmark",
        r"{file}:{line}: eval\.benchmarks\.0: unknown benchmark 'no_such_bench'.*",
        anchor="no_such_bench",
        append="eval:\n  benchmarks: [no_such_bench]\n",
    ),
    Case(
        "dead-eval-every",
        r"{file}:{line}: eval\.every: unknown key \(allowed: benchmarks, limit, params, samples_per_prompt\)",
        anchor="every: 5",
        append="eval:\n  benchmarks: [shapes-quality]\n  every: 5\n",
    ),
    Case(
        "foreign-train-key",
        r"{file}:{line}: train\.loss_mode: belongs to method opd, not grpo \(this recipe's method\): remove it",
        anchor="loss_mode",
        append="  loss_mode: direct\n",
        commands=("validate", "train"),
    ),
    Case(
        "foreign-section",
        r"{file}:{line}: init: belongs to method opd, not grpo \(this recipe's method\): remove it",
        anchor="init:",
        append="init: {method: ties}\n",
    ),
    Case(
        "foreign-set-key",
        r"{file}: --set train\.kl_beta=0\.5: train\.kl_beta belongs to method grpo, not opd \(this recipe's method\): remove it",
        edits=(*TO_OPD, ("rewards:", "router: {type: tag}\n" + TEACHERS + "rewards:")),
        args=("--set", "train.kl_beta=0.5"),
        commands=("validate", "train"),
    ),
    Case(
        "pretrain-key-in-grpo",
        r"{file}: --set train\.object_sides=random: train\.object_sides belongs to method pretrain, not grpo .*",
        args=("--set", "train.object_sides=random"),
    ),
    Case(
        "missing-recipe-file", r"{file}: no such recipe file.*", missing=True, commands=("validate", "train")
    ),
    Case(
        "set-unknown-key",
        r"{file}: --set train\.lrr=3e-4: unknown key 'lrr' in train \(did you mean 'lr'\?\)",
        args=("--set", "train.lrr=3e-4"),
        commands=("validate", "train"),
    ),
    Case(
        "set-index-out-of-range",
        r"{file}: --set rewards\.3\.weight=2: index 3 out of range in rewards \(1 entries\)",
        args=("--set", "rewards.3.weight=2"),
    ),
    Case(
        "set-bad-type",
        r"{file}: --set train\.batch_size=abc: train\.batch_size: Input should be a valid integer.*\(got 'abc'\)",
        args=("--set", "train.batch_size=abc"),
    ),
    Case(
        "set-breaks-cross-field-rule",
        r"{file}: --set sampler\.train_window=\[0,2\]: sampler\.train_window: \[0, 2\) must satisfy .* steps \(1\)",
        args=("--set", "sampler.train_window=[0,2]", "-s", "sampler.steps=1"),
    ),
    Case(
        "set-without-equals",
        r"{file}: --set train\.lr: expected KEY\.PATH=VALUE, e\.g\. train\.lr=3e-4",
        args=("--set", "train.lr"),
    ),
    Case(
        "distill-on-grpo-recipe",
        r"{file}: method is 'grpo'; `opdkit distill` runs only recipes with method 'opd' "
        r"\(use `opdkit train` for 'grpo'\)",
        commands=("distill",),
    ),
]


def line_of(text: str, anchor: str) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), start=1) if anchor in line]
    assert len(hits) == 1, f"anchor {anchor!r} is on lines {hits}"
    return hits[0]


def assert_clean_failure(result: Result) -> list[str]:
    """Exit 1 without a traceback; return the ``error:`` lines (stderr)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    return [line[len("error: ") :] for line in lines]


PARAMS = [
    pytest.param(case, command, id=f"{command}-{case.id}") for case in CASES for command in case.commands
]


def test_enough_malformed_cases() -> None:
    assert len(CASES) >= 20
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "command"), PARAMS)
def test_malformed_recipe_is_one_clean_line(
    case: Case,
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    minimal_recipe_text: str,
    shapes_model: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recipe.yaml"
    text = case.text(minimal_recipe_text)
    if not case.missing:
        path.write_text(text, encoding="utf-8")
    line = line_of(text, case.anchor) if case.anchor else None
    expected = case.expected.replace("{file}", re.escape(str(path))).replace("{line}", str(line))

    result = RUNNER.invoke(app, [command, str(path), *case.args])

    (message,) = assert_clean_failure(result)
    assert re.fullmatch(expected, message), f"\n got: {message}\nwant: {expected}"
    assert "ok " not in result.stdout
    # The library raises the same single line (what the CLI printed came from load_recipe).
    if command == "validate":
        with pytest.raises(RecipeError) as info:
            load_recipe(path, [a for a in case.args if a not in ("--set", "-s")])
        assert str(info.value) == message


def test_several_problems_one_line_each(tmp_path: Path, minimal_recipe_text: str, shapes_model: None) -> None:
    text = edit(minimal_recipe_text, "lr: 1.0e-4", "lr: -1.0") + "optimizer: adam\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    result = RUNNER.invoke(app, ["validate", str(path)])
    messages = assert_clean_failure(result)
    assert len(messages) == 2
    assert any(
        re.fullmatch(rf"{re.escape(str(path))}:{line_of(text, 'lr:')}: train\.lr: .*greater than 0.*", m)
        for m in messages
    )
    assert any(
        re.fullmatch(rf"{re.escape(str(path))}:{line_of(text, 'optimizer')}: optimizer: unknown key.*", m)
        for m in messages
    )


def test_validate_reports_each_recipe(tmp_path: Path, minimal_recipe: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(edit(minimal_recipe.read_text(), "method: grpo", "method: ppo"))
    result = RUNNER.invoke(app, ["validate", str(minimal_recipe), str(bad)])
    (message,) = assert_clean_failure(result)
    assert message.startswith(f"{bad}:1: method:")
    assert f"ok {minimal_recipe} (grpo)" in result.stdout


# -- valid overrides ---------------------------------------------------------------------------


def test_set_lr_is_typed_as_float(minimal_recipe: Path) -> None:
    loaded = load_recipe(minimal_recipe, ["train.lr=3e-4"])  # YAML reads "3e-4" as a string
    assert loaded.recipe.train.lr == pytest.approx(3e-4)
    assert type(loaded.recipe.train.lr) is float
    assert loaded.overrides == ["train.lr=3e-4"]
    assert load_recipe(minimal_recipe).recipe.train.lr == pytest.approx(1e-4)  # the file is untouched
    result = RUNNER.invoke(app, ["validate", str(minimal_recipe), "--set", "train.lr=3e-4"])
    assert result.exit_code == 0, result.output
    assert f"ok {minimal_recipe} (grpo)" in result.stdout


def test_set_reaches_plugin_params(minimal_recipe: Path) -> None:
    loaded = load_recipe(minimal_recipe, ["rewards.0.params.strict=true", "rewards.0.weight=2"])
    spec = loaded.recipe.rewards[0]
    assert spec.params == {"strict": True}
    assert spec.weight == 2.0
    # A parameter the builder does not take is caught by stage 2 (at the params' line in the file).
    params_line = line_of(minimal_recipe.read_text(), "params:")
    with pytest.raises(RecipeError) as info:
        load_recipe(minimal_recipe, ["rewards.0.params.scale=2"])
    assert str(info.value) == (
        f"{minimal_recipe}:{params_line}: rewards.0.params: reward 'shapes_geneval': bad parameters "
        "['scale', 'strict']: got an unexpected keyword argument 'scale' (accepted: strict)"
    )


def test_set_creates_optional_sections(minimal_recipe: Path) -> None:
    loaded = load_recipe(minimal_recipe, ["train.lora.rank=4", "sampler.train_window=[1,3]"])
    assert loaded.recipe.train.lora is not None and loaded.recipe.train.lora.rank == 4
    assert loaded.recipe.sampler.train_window == (1, 3)


# -- a custom reward named by path -----------------------------------------------------------

CUSTOM_REWARD = '''\
"""A user's reward, outside any installed package."""

import torch


def score(scale: float = 1.0):
    """Mean brightness times ``scale``."""

    def reward(images, prompts, metadata):
        return {"score": images.mean(dim=(1, 2, 3)) * scale, "raw": images.mean(dim=(1, 2, 3))}

    return reward
'''


@pytest.mark.parametrize("reward_type", ["./my_reward.py:score", "opdkit_test_user_rewards.bright:score"])
def test_custom_reward_by_path(
    reward_type: str,
    tmp_path: Path,
    minimal_recipe_text: str,
    monkeypatch: pytest.MonkeyPatch,
    shapes_model: None,
    forget_modules: Callable[[str], None],
) -> None:
    import torch

    from opdkit.registry import rewards

    (tmp_path / "my_reward.py").write_text(CUSTOM_REWARD)
    package = tmp_path / "opdkit_test_user_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bright.py").write_text(CUSTOM_REWARD)
    forget_modules("opdkit_test_user_rewards")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "custom.yaml"
    recipe.write_text(
        edit(
            minimal_recipe_text,
            REWARDS,
            f"rewards:\n  - type: {reward_type}\n    weight: 0.5\n    params:\n      scale: 2.5\n",
        )
    )

    spec = load_recipe(recipe).recipe.rewards[0]
    assert (spec.type, spec.params, spec.weight) == (reward_type, {"scale": 2.5}, 0.5)
    assert spec.label == "score"
    reward = rewards.build(spec.type, spec.params)
    forget_modules(reward.__module__)
    images = torch.rand(4, 3, 32, 32)
    out = reward(images, ["a red circle"] * 4, [{}] * 4)
    assert out["score"].shape == (4,)
    torch.testing.assert_close(out["score"], images.mean(dim=(1, 2, 3)) * 2.5)
    torch.testing.assert_close(out["raw"], images.mean(dim=(1, 2, 3)))
    assert reward_type not in rewards.names()  # explicit paths are used, not registered

    result = RUNNER.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    bad = RUNNER.invoke(app, ["validate", str(recipe), "--set", "rewards.0.params.scael=1"])
    (message,) = assert_clean_failure(bad)
    assert re.fullmatch(
        rf"{re.escape(str(recipe))}:{line_of(recipe.read_text(), 'params:')}: rewards\.0\.params: "
        rf"reward '{re.escape(reward_type)}': bad parameters \['scael', 'scale'\]: "
        r"got an unexpected keyword argument 'scael' \(accepted: scale\)",
        message,
    ), message


def test_named_prompt_sets_and_lists_validate_without_their_files(
    tmp_path: Path, minimal_recipe_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A named prompt set is resolved when the run starts; a list of sources is allowed."""
    from opdkit.data.sources import load_prompts

    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))

    recipe = tmp_path / "r.yaml"
    recipe.write_text(minimal_recipe_text)
    extra = tmp_path / "extra.txt"
    extra.write_text("a red bicycle\n")
    loaded = load_recipe(recipe, [f"prompts.dataset=[ocr-train, {extra}]", "prompts.tag=misc"])
    assert loaded.recipe.prompts.dataset == ["ocr-train", str(extra)]
    with pytest.raises(OpdkitError, match=re.escape("no Flow-GRPO OCR training prompts: get flow_grpo's dataset/ocr/train.txt")):
        load_prompts(loaded.recipe.prompts)
    loaded = load_recipe(recipe, [f"prompts.dataset=[shapes, {extra}]", "prompts.tag=misc"])
    records = load_prompts(loaded.recipe.prompts)
    assert records[-1] == {"prompt": "a red bicycle", "tag": "misc", "dataset": str(extra)}
    assert {r["dataset"] for r in records[:-1]} == {"shapes"}


def test_the_recipe_reference_lists_every_key_of_every_method() -> None:
    """docs/recipes.md documents each key each method's schema accepts (docs match the code)."""
    from pydantic import BaseModel

    from opdkit.recipe import RECIPE_TYPES

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    missing = set()

    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            if f"`{name}`" not in text:
                missing.add(f"{model.__name__}.{name}")
            for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
                for inner in (sub, *getattr(sub, "__args__", ())):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner)

    for recipe_type in RECIPE_TYPES.values():
        walk(recipe_type)
    assert not missing, sorted(missing)
