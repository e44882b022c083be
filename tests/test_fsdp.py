"""``train.fsdp``: a full fine-tune sharded over two CPU processes (gloo) trains as one process
does, and its checkpoints resume on a different number of processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from opdkit.errors import RecipeError
from opdkit.rundir import read_jsonl
from tests.test_grpo import RECIPE, TINY_MODEL, cli_env, one_thread, tensors, train, write_recipe

__all__ = ["one_thread"]  # the fixture, used by name

TINY_PARAMS = {"patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8, "text_hidden_size": 32, "text_heads": 2, "text_projection_dim": 32}  # fmt: skip

# The GRPO test recipe as a full fine-tune: the reference is the frozen copy (kl_beta 0.04), an
# EMA, a checkpoint every step. grad_accum 2 makes a step one update whatever the number of
# processes: two micro-batches of 4 images in one process, one on each of two.
FULL = [
    "train.lora=null", "train.fsdp=true", "train.lr=1e-3", "train.grad_accum=2", "train.sample_every=0",
    "train.checkpoint_every=1", "train.keep_checkpoints=4",
]  # fmt: skip

# Reduction order differs in the last bits: the gradients are averaged by a reduce-scatter
# instead of summed in one process, the norm is taken over shards. Measured (2 processes vs 1,
# steps 1-3): |d reward| <= 3e-9, |d kl| <= 2e-10, |d grad_norm| <= 2e-9, |d loss| <= 4e-8 (the
# GRPO loss is ~1e-8..1e-5: centred advantages). Weights differ by <= 2.3e-6 after the first
# AdamW step (lr 1e-3): an element whose gradient is ~1e-8, near AdamW's eps, moves by
# lr * g / (|g| + eps), so a rounding of its gradient moves the step; moments by <= 5e-10.
# The loss is a mean of terms ratio x advantage of size ~1 that cancel to ~1e-5 (centred
# advantages): summed in another order it moves by a few float32 ulps of the terms, not of the
# result. Measured on the 8-shape world's prompts: |d loss| = 1.0e-7 at step 3. The reward scores
# images sampled by those slightly different weights, so its difference depends on the CPU's
# kernels: 3e-9 on the machine of the first measurement, 1.4e-8 at step 3 (0.0152, so 1e-6 of it)
# on an AMD EPYC of 2026-12-07. A mis-sharded batch moves it by 1e-3 or more.
METRIC_TOL = {"loss": 5e-7, "policy_loss": 5e-7, "reward": 1e-7, "kl": 1e-9, "grad_norm": 1e-8}
WEIGHT_TOL = 1e-5  # 1% of one step of lr 1e-3
MOMENT_TOL = 1e-8


def launch_two(recipe: Path, out: Path, overrides: list[str], resume: bool = False) -> None:
    """``accelerate launch`` of ``opdkit train`` on two CPU processes talking gloo."""
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
        "-m", "opdkit.cli", "train", str(recipe), "--out", str(out), *(["--resume"] if resume else []),
    ]  # fmt: skip
    for item in overrides:
        command += ["--set", item]
    env = cli_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def assert_same_metrics(run: Path, reference: Path, steps: list[int]) -> None:
    ours = {m["step"]: m for m in read_jsonl(run / "metrics.jsonl")}
    theirs = {m["step"]: m for m in read_jsonl(reference / "metrics.jsonl")}
    for step in steps:
        for key, tol in METRIC_TOL.items():
            assert ours[step][key] == pytest.approx(theirs[step][key], abs=tol, rel=0), (step, key)
        assert ours[step]["ratio_first_max_dev"] == 0.0  # sampler and update agree bit for bit, sharded too


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same files, same keys, values within the tolerances: the format does not see the processes."""
    for name, tol in (("transformer", WEIGHT_TOL), ("ema", WEIGHT_TOL), ("optimizer", MOMENT_TOL)):
        x, y = tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")
        assert x.keys() == y.keys(), name
        for key in x:
            where = f"{a.name}/{name} {key}"
            torch.testing.assert_close(x[key], y[key], atol=tol, rtol=0, msg=lambda m, w=where: f"{w}: {m}")


def assert_same_final(a: Path, b: Path) -> None:
    for name in ("transformer", "transformer_online"):
        x, y = tensors(a / "final" / f"{name}.safetensors"), tensors(b / "final" / f"{name}.safetensors")
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=WEIGHT_TOL, rtol=0)


needs_launcher = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")


@needs_launcher
def test_fsdp_two_processes_train_as_one_and_resume_on_one(tmp_path: Path, one_thread: None) -> None:
    """3 steps sharded over 2 processes = 3 steps in 1; then 1 process resumes the sharded run to
    step 4 and matches the uninterrupted run (~25 s)."""
    recipe = write_recipe(tmp_path, RECIPE)
    launch_two(recipe, tmp_path / "fsdp", [*FULL, "train.max_steps=3"])
    single = tmp_path / "single"
    train(recipe, single, [*FULL, "train.max_steps=4"])

    assert_same_metrics(tmp_path / "fsdp", single, [1, 2, 3])
    for step in (1, 2, 3):
        name = f"checkpoints/step_{step:06d}"
        assert_same_checkpoint(tmp_path / "fsdp" / name, single / name)
    # Every rank logged the hash of the same gathered weights.
    sums = [next(r["weights_sha256"] for r in read_jsonl(tmp_path / "fsdp" / "ranks" / f"rank_{r}.jsonl") if "weights_sha256" in r) for r in (0, 1)]  # fmt: skip
    assert sums[0] == sums[1]
    final = tensors(tmp_path / "fsdp" / "final" / "transformer_online.safetensors")
    at_three = tensors(tmp_path / "fsdp" / "checkpoints" / "step_000003" / "transformer.safetensors")
    assert final.keys() == at_three.keys() and all(torch.equal(final[k], at_three[k]) for k in final)

    train(recipe, tmp_path / "fsdp", [*FULL, "train.max_steps=4"], resume=True)  # one process
    assert_same_metrics(tmp_path / "fsdp", single, [4])
    assert_same_checkpoint(
        tmp_path / "fsdp" / "checkpoints" / "step_000004", single / "checkpoints" / "step_000004"
    )
    assert_same_final(tmp_path / "fsdp", single)


# OPD's `direct` loss is the KL to the teacher itself (~0.07 here), a loss that does not centre on 0.
OPD_FULL = """\
method: opd
prompts: {dataset: shapes, split: train}
teachers: [{name: other, type: full, path: TEACHER}]
router: {type: tag, params: {fallback: other}}
sampler: {steps: 4, noise_level: 0.7, cfg: 3.0, resolution: 32}
train:
  seed: 0
  lr: 1.0e-3
  batch_size: 2
  group_size: 2
  micro_batch: 2
  grad_accum: 2
  loss_mode: direct
  ema: {decay: 0.5, every: 1}
  checkpoint_every: 1
  fsdp: true
"""


@needs_launcher
def test_fsdp_opd_resumes_a_one_process_run_on_two(tmp_path: Path, one_thread: None) -> None:
    """The reverse, on OPD: step 1 in one process, steps 2-3 sharded over two, = 3 steps in one;
    the KL loss per step to 1e-6 relative (measured 1e-7) (~22 s)."""
    from opdkit.registry import models

    teacher = models.build("shapes_new", {**TINY_PARAMS, "seed": 1})  # another random model: KL > 0
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = tmp_path / "opd.yaml"
    recipe.write_text(TINY_MODEL + OPD_FULL.replace("TEACHER", str(tmp_path / "teacher")))
    train(recipe, tmp_path / "run", ["train.max_steps=1"])
    launch_two(recipe, tmp_path / "run", ["train.max_steps=3"], resume=True)
    single = train(recipe, tmp_path / "single", ["train.max_steps=3"]).parent
    ours, theirs = read_jsonl(tmp_path / "run" / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
    assert [m["step"] for m in ours] == [1, 2, 3] and all(m["loss"] > 0.01 for m in ours)
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=1e-6, abs=0)
    assert [m["grad_norm"] for m in ours] == pytest.approx([m["grad_norm"] for m in theirs], rel=1e-6, abs=0)
    assert_same_checkpoint(
        tmp_path / "run" / "checkpoints" / "step_000003", single / "checkpoints" / "step_000003"
    )
    assert_same_final(tmp_path / "run", single)


def test_fsdp_refuses_lora_and_fp16(tmp_path: Path) -> None:
    from opdkit.recipe import load_recipe

    recipe = write_recipe(tmp_path, RECIPE)
    with pytest.raises(RecipeError, match=r"train\.fsdp: .*shards a full fine-tune; remove train\.lora"):
        load_recipe(recipe, ["train.fsdp=true"])
    with pytest.raises(RecipeError, match=r"train\.fsdp: .*fp16's gradient scaler"):
        load_recipe(recipe, ["train.fsdp=true", "train.lora=null", "train.precision=fp16"])
    assert load_recipe(
        recipe, ["train.fsdp=true", "train.lora=null", "train.precision=bf16"]
    ).recipe.train.fsdp


def test_fsdp_needs_two_processes() -> None:
    """One process has nothing to share the state with: it trains unsharded (the same numbers)."""
    from types import SimpleNamespace

    from opdkit.training import fsdp

    assert not fsdp.wanted(SimpleNamespace(fsdp=True), 1)
    assert fsdp.wanted(SimpleNamespace(fsdp=True), 2)
    assert not fsdp.wanted(SimpleNamespace(fsdp=False), 2) and not fsdp.wanted(SimpleNamespace(), 8)
