"""A careless or hostile user against `opdkit train` / `distill` / `validate`: every bad input is
one clean error line naming what is wrong, with no traceback, and no file that existed before the
call is changed (recipes, plug-ins, numbers, run folders, the OS)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opdkit.cli import app

RUNNER = CliRunner()
# What a progress bar prints when stderr is not a terminal (the run's own, or a library's)
PROGRESS = re.compile(r"(\d+/\d+ .*eta|it/s\]|\[transformers\])")

TINY = """\
method: grpo
model:
  type: shapes_new
  params: {patch_size: 4, num_layers: 1, num_heads: 2, head_dim: 8, text_hidden_size: 32, text_heads: 2, text_projection_dim: 32}
prompts: {dataset: shapes, split: train}
rewards:
  - {type: REWARD, weight: 1.0}
sampler: {steps: 2, noise_level: 0.7, cfg: 3.0, resolution: 32}
train:
  seed: 0
  lr: 3.0e-3
  batch_size: 2
  group_size: 2
  micro_batch: 4
  max_steps: 2
  lora: {rank: 2, alpha: 4}
  checkpoint_every: 1
"""

PLUGINS = '''\
import sys

import torch


def ok():
    def reward(images, prompts, records):
        return {"score": images.mean(dim=(1, 2, 3))}
    return reward


def raises_in_builder():
    raise ValueError("no weights here")


def returns_a_number():
    return 3


def raises_when_scoring():
    def reward(images, prompts, records):
        raise RuntimeError("scorer crashed")
    return reward


def huge():
    def reward(images, prompts, records):
        return {"score": torch.full((images.shape[0],), 1e38)}
    return reward
'''


@dataclass(frozen=True)
class Case:
    """One bad call. ``expected``: a substring of the single error line; ``setup`` prepares the
    folder (a finished run, say) before the snapshot; ``args`` follow ``train RECIPE --out run``."""

    id: str
    expected: str
    edits: tuple[tuple[str, str], ...] = ()
    append: str = ""
    whole: str | None = None
    args: tuple[str, ...] = ()
    setup: Callable[[Path, Path], None] | None = None
    command: str = "train"
    extra_files: dict[str, str] = field(default_factory=dict)


def finished_run(tmp: Path, recipe: Path) -> None:
    result = RUNNER.invoke(app, ["train", str(recipe), "--out", str(tmp / "run"), "--no-eval"])
    assert result.exit_code == 0, result.output


def finished_run_without_checkpoints(tmp: Path, recipe: Path) -> None:
    import shutil

    finished_run(tmp, recipe)
    shutil.rmtree(tmp / "run" / "checkpoints")


def a_file_named_run(tmp: Path, recipe: Path) -> None:
    (tmp / "run").write_text("not a folder\n")


BOMB = ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nmethod: grpo\n")  # 355 bytes, 9^5 leaves

CASES = [
    # recipes
    Case("alias-bomb", "expands to over 20,000 YAML nodes", whole=BOMB),
    Case("deep-nesting", "nested too deeply", whole="method: grpo\nx: " + "[" * 1000 + "]" * 1000 + "\n"),
    Case("negative-seed", "train.seed: Input should be greater than or equal to 0", edits=(("seed: 0", "seed: -1"),)),
    Case("infinite-alpha", "train.lora.alpha: Input should be a finite number", edits=(("alpha: 4", "alpha: .inf"),)),
    Case("infinite-cfg", "sampler.cfg: Input should be a finite number", edits=(("cfg: 3.0", "cfg: .inf"),)),
    Case("nan-lr", "train.lr: Input should be a finite number", edits=(("lr: 3.0e-3", "lr: .nan"),)),
    Case("nan-reward-weight", "rewards.0.weight", edits=(("weight: 1.0", "weight: .nan"),)),
    Case("group-std-of-one", "train.adv_std: group needs train.group_size >= 2",
         edits=(("group_size: 2", "group_size: 1\n  adv_std: group"), ("micro_batch: 4", "micro_batch: 2"))),
    Case("micro-batch-off-the-step", "train.micro_batch: 3 must divide the 4 images", edits=(("micro_batch: 4", "micro_batch: 3"),)),
    Case("foreign-key", "train.loss_mode: belongs to method opd, not grpo", append="  loss_mode: direct\n"),
    Case("dead-key", "eval.every: unknown key", append="eval: {benchmarks: [shapes-quality], every: 5}\n"),
    Case("bench-param-unknown", "eval.params: benchmark 'shapes-quality': bad parameters ['splt']",
         append="eval: {benchmarks: [shapes-quality], params: {splt: fold}}\n"),
    Case("bench-param-value", "eval.params: benchmark 'shapes-quality': split='heldot' is not one of 'test'",
         append="eval: {benchmarks: [shapes-quality], params: {split: heldot}}\n", command="validate"),
    Case("validate-negative-seed", "train.seed", edits=(("seed: 0", "seed: -1"),), command="validate"),
    Case("validate-infinite-alpha", "train.lora.alpha", edits=(("alpha: 4", "alpha: .inf"),), command="validate"),
    Case("validate-alias-bomb", "expands to over", command="validate", whole=BOMB),
    Case("resolution-off-the-patch-grid", "sampler.resolution: 33 is not a multiple of 4", edits=(("resolution: 32", "resolution: 33"),)),
    Case("resolution-too-small", "sampler.resolution: 9 is not a multiple", edits=(("resolution: 32", "resolution: 9"),), command="validate"),
    Case("resolution-beyond-the-model", "above the model's largest side, 32 px", edits=(("resolution: 32", "resolution: 64"),)),
    Case("logprob-pool-off-the-grid", "sampler.logprob_pool: 3 does not divide the 32x32 grid of the states",
         edits=(("resolution: 32}", "resolution: 32, logprob_pool: 3}"),)),
    Case("zero-noise-level", "sampler.noise_level: Input should be greater than 0", edits=(("noise_level: 0.7", "noise_level: 0"),)),
    Case("cosine-ends-in-the-warm-up", "train.lr_decay_steps: the cosine ends at step 2, within the 3 warm-up steps",
         edits=(("max_steps: 2", "max_steps: 5\n  lr_decay: cosine\n  lr_decay_steps: 2\n  warmup_steps: 3"),)),
    Case("cosine-ends-before-max-steps", "train.lr_decay_steps: the cosine ends at step 1, before train.max_steps 2",
         edits=(("max_steps: 2", "max_steps: 2\n  lr_decay: cosine\n  lr_decay_steps: 1"),), command="validate"),
    # plug-ins
    Case("builder-raises", "reward './plugins.py:raises_in_builder': its builder raised ValueError: no weights here",
         edits=(("REWARD", "./plugins.py:raises_in_builder"),)),
    Case("builder-returns-a-number", "its builder returned int, not a callable", edits=(("REWARD", "./plugins.py:returns_a_number"),)),
    Case("reward-raises", "scoring raised RuntimeError: scorer crashed", edits=(("REWARD", "./plugins.py:raises_when_scoring"),)),
    Case("reward-absurd", "outside [-1e+06, 1e+06]", edits=(("REWARD", "./plugins.py:huge"),)),
    Case("plugin-exits-at-import", "importing", edits=(("REWARD", "./exits.py:score"),),
         extra_files={"exits.py": "import sys\nsys.exit(3)\n"}),
    Case("plugin-missing-file", "does not exist", edits=(("REWARD", "./nowhere.py:score"),)),
    # numbers
    Case("huge-lr", "the trained weights diverged at step", edits=(("lr: 3.0e-3", "lr: 1.0e+6"),)),
    # run folders
    Case("finished-run", "holds a run", setup=finished_run),
    Case("finished-run-no-checkpoints", "holds a run", setup=finished_run_without_checkpoints),
    Case("resume-other-seed", "--resume with a changed recipe (train.seed: 0 -> 1)", setup=finished_run,
         args=("--resume", "--set", "train.seed=1")),
    Case("resume-other-rank", "train.lora.rank: 2 -> 4", setup=finished_run, args=("--resume", "--set", "train.lora.rank=4")),
    Case("resume-other-kl-beta", "train.kl_beta: 0.0 -> 0.5", setup=finished_run,
         args=("--resume", "--set", "train.kl_beta=0.5")),
    Case("resume-and-overwrite", "pass one of them", setup=finished_run, args=("--resume", "--overwrite")),
    # the OS
    Case("out-is-a-file", "--out is a file", setup=a_file_named_run),
    Case("out-below-a-file", "Not a directory", setup=a_file_named_run, args=("--out", "run/inside")),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_enough_cases() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_clean_line_and_loses_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPDKIT_TENSORBOARD", "0")
    (tmp_path / "plugins.py").write_text(PLUGINS)
    for name, text in case.extra_files.items():
        (tmp_path / name).write_text(text)
    body = case.whole if case.whole is not None else TINY.replace("REWARD", "./plugins.py:ok")
    for old, new in case.edits:
        body = body.replace(old.replace("REWARD", "./plugins.py:ok"), new)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(body) + case.append)
    if case.setup is not None:
        case.setup(tmp_path, recipe)
    before = snapshot(tmp_path)

    args = [case.command, str(recipe)]
    if case.command != "validate":
        args += ["--out", "run", "--no-eval"] if "--out" not in case.args else ["--no-eval"]
    result = RUNNER.invoke(app, [*args, *case.args])

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    # one error line; anything else on stderr is a progress bar the run drew before it stopped
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.expected in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing present was changed


def test_a_model_folder_with_a_broken_config_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # validate reads the model's configs to check sampler.resolution before loading anything
    (tmp_path / "base" / "transformer").mkdir(parents=True)
    (tmp_path / "base" / "transformer" / "config.json").write_text('{"patch_size": 4,')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY.replace(
        "  type: shapes_new\n  params: {patch_size: 4, num_layers: 1, num_heads: 2, head_dim: 8, text_hidden_size: 32, text_heads: 2, text_projection_dim: 32}\n",
        "  type: shapes\n  path: ./base\n",
    ).replace("REWARD", "shapes_quality"))
    monkeypatch.chdir(tmp_path)
    for command in ("validate", "train"):
        result = RUNNER.invoke(app, [command, str(recipe)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "config.json' is not valid JSON" in lines[0] and "Traceback" not in result.output
