"""``method: pretrain`` on a tiny shapes model: the lr schedule, the saved model, and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdkit.methods import train
from opdkit.recipe import load_recipe

RECIPE = """\
method: pretrain
model:
  type: shapes_new
  params: {patch_size: 4, num_layers: 1, num_heads: 2, head_dim: 8, text_hidden_size: 32, text_heads: 2, text_projection_dim: 32}
prompts: {dataset: shapes, split: train, balance_tags: true}
sampler: {resolution: 32}
train:
  seed: 0
  lr: 1.0e-3
  lr_decay: cosine
  warmup_steps: 2
  batch_size: 4
  max_steps: 6
  checkpoint_every: 3
  keep_checkpoints: 5
  ema: {decay: 0.9, every: 1}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "pretrain.yaml"
    path.write_text(RECIPE)
    return path


def run(recipe: Path, out: Path, overrides: list[str] | None = None, resume: bool = False) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_recipe(recipe, overrides), out, resume=resume)
    finally:
        torch.set_num_threads(before)


def test_cosine_decay_after_warmup_reaches_zero(recipe: Path, tmp_path: Path) -> None:
    final = run(recipe, tmp_path / "run")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [5e-4, 1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert (final / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_resumed_run_ends_with_the_same_weights(recipe: Path, tmp_path: Path) -> None:
    whole = run(recipe, tmp_path / "whole")
    # A run killed after its step-3 checkpoint: later checkpoints and the final model never written.
    shutil.copytree(tmp_path / "whole", tmp_path / "killed")
    killed = tmp_path / "killed"
    shutil.rmtree(killed / "model")
    shutil.rmtree(killed / "checkpoints" / "step_000006")
    (killed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "dir": "step_000003"}))
    resumed = run(recipe, killed, resume=True)
    for part in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(whole / part)), load_file(str(resumed / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (killed / "metrics.jsonl").read_text().count("\n") == 6


def test_object_sides_choose_the_rendered_training_data(recipe: Path, tmp_path: Path) -> None:
    """``train.object_sides`` reaches the renderer: the two modes train on different images."""
    random_sides = run(recipe, tmp_path / "random", ["train.max_steps=2"])
    by_count = run(recipe, tmp_path / "by_count", ["train.max_steps=2", "train.object_sides=by_count"])
    part = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(random_sides / part)), load_file(str(by_count / part))
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_the_committed_base_records_the_shipped_pretraining_recipe() -> None:
    """shapes-base's resolved recipe is the shipped one (object sides by count included)."""
    from opdkit.models.shapes import checkpoint_path

    committed = load_recipe(checkpoint_path("shapes-base") / "pretrain_recipe.yaml").recipe
    shipped = load_recipe("shapes/pretrain").recipe
    assert committed == shipped and shipped.train.object_sides == "by_count"


def test_object_sides_key_lists_the_renderer_modes() -> None:
    """The recipe key's allowed values are the renderer's modes, no more, no fewer."""
    from typing import get_args

    from opdkit.recipe import PretrainTrainSpec
    from opdkit.shapes.vocab import SIDE_MODES

    assert get_args(PretrainTrainSpec.model_fields["object_sides"].annotation) == SIDE_MODES


def test_a_finished_pretrain_row_of_a_study_is_not_trained_or_evaluated_again(tmp_path: Path) -> None:
    # Pretraining writes model/, not final/: the study took the row for a partial run, resumed it
    # (a time-capped one by one more step each time) and evaluated it again on every invocation.
    import yaml

    from opdkit.runs import finished_step
    from opdkit.study import load_study, plan_lines, run_study, train_state

    (tmp_path / "pre.yaml").write_text(RECIPE.replace("max_steps: 6", "max_steps: 2"))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "description": "a pretrain row", "benchmarks": ["shapes-quality"],
        "eval": {"samples_per_prompt": 1, "seed": 0, "limit": 2, "steps": 2, "batch_size": 8},
        "rows": [{"name": "pre", "recipe": str(tmp_path / "pre.yaml")}], "comparisons": [],
    }))  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(load_study(study_file, out=tmp_path / "out"), echo=lambda line: None)
    finally:
        torch.set_num_threads(before)
    assert finished_step(tmp_path / "out" / "runs" / "pre") == 2
    study = load_study(study_file, out=tmp_path / "out")
    assert train_state(study, study.rows[0]).status == "finished"
    assert plan_lines(study)[0].startswith("pre: trained") and "no eval (results present" in plan_lines(study)[0]
