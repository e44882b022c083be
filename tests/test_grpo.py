"""``method: grpo`` end to end on tiny models (CPU fp32): run directory, resume after SIGKILL,
accumulation, full fine-tuning, the SD3 path, runs as eval models, and data parallelism."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch

from opdkit.errors import OpdkitError
from opdkit.rundir import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]

REWARD_PY = '''\
import torch


def redness(scale: float = 1.0):
    """Test reward: how much red exceeds the other channels (continuous, so groups differ)."""

    def reward(images, prompts, metadata):
        red = (images[:, 0] - images[:, 1:].mean(dim=1)).mean(dim=(1, 2))
        return {"score": scale * red, "brightness": images.mean(dim=(1, 2, 3))}

    return reward
'''

TINY_MODEL = """\
model:
  type: shapes_new
  params: {patch_size: 4, num_layers: 1, num_heads: 2, head_dim: 8, text_hidden_size: 32, text_heads: 2, text_projection_dim: 32}
"""


def write_recipe(tmp: Path, body: str, model: str = TINY_MODEL) -> Path:
    (tmp / "reward.py").write_text(REWARD_PY)
    path = tmp / "recipe.yaml"
    path.write_text(model + textwrap.dedent(body).replace("REWARD", f"{tmp / 'reward.py'}:redness"))
    return path


RECIPE = """\
method: grpo
prompts: {dataset: shapes, split: train}
rewards:
  - {type: REWARD, weight: 1.0}
  - {type: shapes_quality, weight: 0.5}
sampler: {steps: 4, noise_level: 0.7, cfg: 3.0, resolution: 32}
train:
  seed: 0
  lr: 3.0e-3
  batch_size: 2
  group_size: 4
  micro_batch: 4
  max_steps: 3
  lora: {rank: 4, alpha: 8}
  kl_beta: 0.04
  ema: {decay: 0.5, every: 2}
  checkpoint_every: 2
  sample_every: 2
"""


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Single-threaded torch (bit-for-bit comparisons with `OMP_NUM_THREADS=1` subprocesses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(recipe: Path, out: Path, overrides: list[str] | None = None, resume: bool = False) -> Path:
    from opdkit.methods import train as train_recipe
    from opdkit.recipe import load_recipe

    return train_recipe(load_recipe(recipe, overrides or []), out, resume=resume)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def without_clock(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPDKIT_TENSORBOARD="0", COLUMNS="200")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


# ----------------------------------------------------------------------------------------------


def test_run_directory_metrics_and_eval_model(tmp_path: Path, one_thread: None) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    final = train(recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert final == run / "final"
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in (
            "reward", "reward_std", "reward/redness/mean", "reward/redness/std", "reward/redness/brightness/mean",
            "reward/shapes_quality/mean", "adv_mean", "adv_std", "adv_min", "adv_max", "ratio_mean", "ratio_min",
            "ratio_max", "clip_frac", "kl", "policy_loss", "loss", "lr", "grad_norm", "seconds",
        ):  # fmt: skip
            assert key in m, key
        assert m["ratio_first_max_dev"] == 0.0  # the sampler and the first update agree bit for bit
        assert abs(m["adv_mean"]) < 1e-5 and m["kl"] >= 0.0
    assert metrics[-1]["kl"] > 0.0  # the adapter moved away from the reference
    assert (run / "recipe.yaml").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png"]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3
    for name in ("transformer", "optimizer", "ema"):
        assert (run / "checkpoints" / "step_000003" / f"{name}.safetensors").is_file()
    info = json.loads((final / "final.json").read_text())
    assert info == {"kind": "lora", "step": 3, "ema": True, "adapter": "default"}
    from opdkit.runs import final_lora_path, is_run_dir

    assert is_run_dir(run) and final_lora_path(run) == final / "lora.safetensors"
    ema_w, online = tensors(final / "lora.safetensors"), tensors(final / "lora_online.safetensors")
    assert set(ema_w) == set(online) and any("lora_B" in k for k in online)
    assert any(float(v.abs().max()) > 0 for k, v in online.items() if "lora_B" in k)  # trained
    assert any(not torch.equal(ema_w[k], online[k]) for k in online)
    if shutil.which("tensorboard") or _importable("tensorboard"):
        events = list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0

    # The run directory is an eval model: base + merged EMA adapter.
    from opdkit.eval.runner import resolve_model
    from opdkit.registry import models
    from opdkit.sampling import sample_ode

    model, name = resolve_model(str(run))
    assert name == "run" and model.lora_names() == []
    base = models.build("shapes_new", {"patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8,
                                       "text_hidden_size": 32, "text_heads": 2, "text_projection_dim": 32})  # fmt: skip
    base.load_lora(final / "lora.safetensors")
    x_run = sample_ode(model, ["a red cube"], steps=3, cfg=3.0, resolution=32, seed=[1])
    x_adapter = sample_ode(base, ["a red cube"], steps=3, cfg=3.0, resolution=32, seed=[1])
    torch.testing.assert_close(x_run, x_adapter, atol=1e-4, rtol=1e-4)
    with base.adapters_disabled():
        x_base = sample_ode(base, ["a red cube"], steps=3, cfg=3.0, resolution=32, seed=[1])
    assert not torch.allclose(x_run, x_base)

    # `opdkit eval --checkpoint N`: the checkpoint of the last step is the final model (EMA weights in
    # both), filed apart from it; a step without a checkpoint names the kept ones
    from opdkit.runs import checkpoint_steps

    assert checkpoint_steps(run) == [2, 3]
    model_3, name_3 = resolve_model(str(run), step=3)
    assert name_3 == "run-step3" and model_3.lora_names() == []
    x_step = sample_ode(model_3, ["a red cube"], steps=3, cfg=3.0, resolution=32, seed=[1])
    torch.testing.assert_close(x_step, x_run, atol=0.0, rtol=0.0)
    model_2, _ = resolve_model(str(run), step=2)
    assert not torch.equal(sample_ode(model_2, ["a red cube"], steps=3, cfg=3.0, resolution=32, seed=[1]), x_run)
    with pytest.raises(OpdkitError, match=r"no checkpoint at step 1 \(kept: 2, 3\)"):
        resolve_model(str(run), step=1)
    with pytest.raises(OpdkitError, match="not a GRPO/OPD run directory"):
        resolve_model(str(tmp_path), step=3)
    from typer.testing import CliRunner

    from opdkit.cli import app

    results = tmp_path / "results"
    args = ["eval", "-b", "shapes-quality", "-m", str(run), "--checkpoint", "2", "--limit", "1", "--samples", "1", "-o", str(results)]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads((results / "run-step2" / "shapes-quality.json").read_text())
    assert summary["model"] == "run-step2" and summary["model_source"] == f"{run} --checkpoint 2"

    with pytest.raises(OpdkitError, match="--resume"):
        train(recipe, run)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path, one_thread: None, signal_when: Callable[..., None]) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    steps = ["--set", "train.max_steps=8", "--set", "train.sample_every=0"]
    command = [sys.executable, "-m", "opdkit.cli", "train", str(recipe), "--out", str(tmp_path / "killed"), *steps]
    killed = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill right after a random step has been logged (so mid-way through the next step, or
    # while it writes a checkpoint). Watching the log, not a clock, keeps the kill inside the
    # run however fast the machine is; the reference run trains only after the kill.
    kill_after = random.randint(3, 6)  # after the step-2 checkpoint, before the last step
    metrics = tmp_path / "killed" / "metrics.jsonl"
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    signal_when(killed, lambda: pointer.exists() and metrics.read_text().count("\n") >= kill_after, "logged no steps")
    train(recipe, tmp_path / "whole", ["train.max_steps=8", "train.sample_every=0"])
    assert killed.returncode == -signal.SIGKILL
    done = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert done and done[-1]["step"] < 8, "the run finished before it was killed"
    # Resume through the same CLI, in this process (saves a second interpreter start).
    from typer.testing import CliRunner

    from opdkit.cli import app

    resumed = CliRunner().invoke(app, [*command[3:], "--resume"])
    assert resumed.exit_code == 0, resumed.output[-3000:]

    whole, again = tmp_path / "whole", tmp_path / "killed"
    assert without_clock(read_jsonl(again / "metrics.jsonl")) == without_clock(read_jsonl(whole / "metrics.jsonl"))
    for name in ("lora.safetensors", "lora_online.safetensors"):
        a, b = tensors(whole / "final" / name), tensors(again / "final" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for name in ("optimizer.safetensors", "ema.safetensors", "transformer.safetensors"):
        a, b = tensors(whole / "checkpoints/step_000008" / name), tensors(again / "checkpoints/step_000008" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_with_lora_dropout_is_bit_identical(tmp_path: Path, one_thread: None) -> None:
    # LoRA dropout draws from torch's global RNG, which no checkpoint holds: each step reseeds it
    # from (seed, step), so step 2 after a resume draws the masks it drew in the whole run.
    recipe = write_recipe(tmp_path, RECIPE.replace("lora: {rank: 4, alpha: 8}", "lora: {rank: 4, alpha: 8, dropout: 0.3}"))
    settings = ["train.checkpoint_every=1", "train.keep_checkpoints=3", "train.sample_every=0", "train.ema=null"]
    whole = train(recipe, tmp_path / "whole", settings)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    shutil.rmtree(killed / "final")
    for step in (2, 3):
        shutil.rmtree(killed / "checkpoints" / f"step_00000{step}")
    (killed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": "step_000001"}))
    torch.manual_seed(12345)  # whatever this process drew before
    again = train(recipe, killed, settings, resume=True)
    a, b = tensors(whole / "lora.safetensors"), tensors(again / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_clock(read_jsonl(killed / "metrics.jsonl")) == without_clock(read_jsonl(tmp_path / "whole" / "metrics.jsonl"))


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The gradient scaler's scale is training state: a resumed fp16 run starts from the checkpoint's,
    # not from 65536 again (autocast is allowed on the CPU here; the loop allows it only on CUDA).
    from opdkit.training import loop

    monkeypatch.setattr(loop, "autocast_supported", lambda device, dtype: True)
    recipe = write_recipe(tmp_path, RECIPE)
    settings = ["train.precision=fp16", "train.max_steps=2", "train.checkpoint_every=1", "train.sample_every=0"]
    train(recipe, tmp_path / "run", settings)
    state_file = tmp_path / "run" / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["grad_scaler"]["scale"] > 0
    state["grad_scaler"]["scale"] = 1024.0  # as if overflows had lowered it
    state_file.write_text(json.dumps(state))
    scales: list[float] = []
    step = loop.Optimization.step
    monkeypatch.setattr(loop.Optimization, "step", lambda self: scales.append(self.scaler.get_scale()) or step(self))
    train(recipe, tmp_path / "run", [*settings[:1], "train.max_steps=3", *settings[2:]], resume=True)
    assert scales and scales[0] == 1024.0


def test_kill_during_the_post_run_eval_then_resume_gives_the_same_results(
    tmp_path: Path, one_thread: None, signal_when: Callable[..., None]
) -> None:
    """SIGKILL while the post-training eval writes its rows; --resume finishes the same results."""
    recipe = write_recipe(tmp_path, RECIPE + "eval: {benchmarks: [shapes-quality], samples_per_prompt: 1, limit: 40}\n")
    steps = ["--set", "train.max_steps=2", "--set", "train.sample_every=0"]
    command = [sys.executable, "-m", "opdkit.cli", "train", str(recipe), "--out", str(tmp_path / "killed"), *steps]
    killed = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = tmp_path / "killed" / "results" / "step_000002" / "killed" / "shapes-quality.jsonl"
    signal_when(killed, lambda: rows.exists() and rows.read_text().count("\n") >= 1, "wrote no eval rows")
    assert killed.returncode == -signal.SIGKILL
    from typer.testing import CliRunner

    from opdkit.cli import app

    resumed = CliRunner().invoke(app, [*command[3:], "--resume"])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    whole = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "whole"), *steps])
    assert whole.exit_code == 0, whole.output[-3000:]

    def results(run: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        folder = tmp_path / run / "results" / "step_000002" / run
        kept = [{k: v for k, v in r.items() if k != "image"} for r in read_jsonl(folder / "shapes-quality.jsonl")]
        summary = json.loads((folder / "shapes-quality.json").read_text())
        return sorted(kept, key=lambda r: (r["prompt_index"], r["sample_index"])), summary["metrics"]

    assert results("killed") == results("whole")
    assert len(results("killed")[0]) == 40


def test_a_runs_checkpoint_is_refused_on_another_base(tmp_path: Path, one_thread: None) -> None:
    """`opdkit eval --checkpoint N` checks the base as the final adapter's load does: a LoRA
    checkpoint is a delta on the base the run trained on (run.json's base_weights)."""
    import yaml

    from opdkit.runs import load_run_checkpoint, load_run_model

    recipe = write_recipe(tmp_path, RECIPE)
    run = tmp_path / "run"
    train(recipe, run, ["train.max_steps=1", "train.checkpoint_every=1", "train.sample_every=0"])
    assert load_run_checkpoint(run, 1).lora_names() == []  # its own base: loaded and merged
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    resolved["model"]["params"]["seed"] = 1  # the recipe's base now has other weights
    (run / "recipe.yaml").write_text(yaml.safe_dump(resolved))
    with pytest.raises(OpdkitError, match=r"checkpoint '.*step_000001.*' was trained on another base model"):
        load_run_checkpoint(run, 1)
    with pytest.raises(OpdkitError, match=r"LoRA file '.*lora\.safetensors' was trained on another base model"):
        load_run_model(run)


def test_accumulation_matches_one_big_batch(tmp_path: Path, one_thread: None) -> None:
    """4 images in one micro-batch vs 2 micro-batches of 2 accumulated: the same update."""
    recipe = write_recipe(tmp_path, RECIPE)
    common = ["train.max_steps=1", "train.ema=null", "train.sample_every=0", "train.group_size=2"]
    one = train(recipe, tmp_path / "one", [*common, "train.micro_batch=4", "train.grad_accum=1"])
    two = train(recipe, tmp_path / "two", [*common, "train.micro_batch=2", "train.grad_accum=2"])
    a, b = tensors(one / "lora.safetensors"), tensors(two / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    m1, m2 = read_jsonl(tmp_path / "one" / "metrics.jsonl")[0], read_jsonl(tmp_path / "two" / "metrics.jsonl")[0]
    assert m1["reward"] == pytest.approx(m2["reward"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    # Two micro-batches with grad_accum 1 make two updates: different weights.
    three = train(recipe, tmp_path / "three", [*common, "train.micro_batch=2", "train.grad_accum=1"])
    c = tensors(three / "lora.safetensors")
    assert any(not torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_full_finetuning_and_bad_micro_batch(tmp_path: Path, one_thread: None) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    final = train(recipe, tmp_path / "full", ["train.lora=null", "train.max_steps=1", "train.sample_every=0", "train.lr=1e-3"])
    info = json.loads((final / "final.json").read_text())
    assert info["kind"] == "full" and info["ema"]
    trained = tensors(final / "transformer_online.safetensors")
    from opdkit.registry import models
    from opdkit.runs import load_run_model

    base = models.build("shapes_new", {"patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8,
                                       "text_hidden_size": 32, "text_heads": 2, "text_projection_dim": 32})  # fmt: skip
    base_params = dict(base.transformer.named_parameters())
    assert set(trained) == set(base_params)
    assert any(not torch.equal(trained[k], base_params[k].detach()) for k in trained)
    loaded = load_run_model(tmp_path / "full")
    ema = tensors(final / "transformer.safetensors")
    for key, value in loaded.transformer.named_parameters():
        assert torch.equal(value.detach(), ema[key])
    from opdkit.runs import final_lora_path

    with pytest.raises(OpdkitError, match="no LoRA adapter"):
        final_lora_path(tmp_path / "full")
    with pytest.raises(OpdkitError, match="micro_batch"):
        train(recipe, tmp_path / "bad", ["train.micro_batch=3"])

    # final weights of another shape are refused, not broadcast by copy_ ((1, n) over every row of
    # an (m, n) weight), and so is a file that leaves a parameter out (it would stay the base's)
    from safetensors.torch import save_file

    key = next(k for k, v in ema.items() if v.ndim == 2 and v.shape[0] > 1)
    save_file({**ema, key: ema[key][:1]}, final / "transformer.safetensors")
    wanted = rf"final/transformer\.safetensors: {key} has shape \(1, {ema[key].shape[1]}\), the model expects \({ema[key].shape[0]}, {ema[key].shape[1]}\)$"
    with pytest.raises(OpdkitError, match=wanted):
        load_run_model(tmp_path / "full")
    save_file({k: v for k, v in ema.items() if k != key}, final / "transformer.safetensors")
    with pytest.raises(OpdkitError, match=rf"lacks 1 of the {len(ema)} tensors of the model \(first: {key}\)"):
        load_run_model(tmp_path / "full")


def test_gradient_checkpointing_gives_the_same_update(tmp_path: Path, one_thread: None) -> None:
    """train.gradient_checkpointing recomputes activations: the same weights and metrics."""
    from opdkit.recipe import LoraSpec
    from opdkit.registry import models
    from opdkit.training.trainable import setup_trainable

    recipe = write_recipe(tmp_path, RECIPE)
    common = ["train.max_steps=2", "train.sample_every=0"]
    plain = train(recipe, tmp_path / "plain", common)
    recomputed = train(recipe, tmp_path / "ckpt", [*common, "train.gradient_checkpointing=true"])
    a, b = tensors(plain / "lora.safetensors"), tensors(recomputed / "lora.safetensors")
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    m1, m2 = read_jsonl(tmp_path / "plain" / "metrics.jsonl"), read_jsonl(tmp_path / "ckpt" / "metrics.jsonl")
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-4, abs=1e-9)
    model = models.build("shapes_new", {"patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8})
    setup_trainable(model, LoraSpec(rank=2, alpha=4), gradient_checkpointing=True)
    assert model.transformer.gradient_checkpointing  # switched on for real


def test_sd3_pipeline_two_steps_through_opdkit_train(tmp_path: Path, one_thread: None) -> None:
    """The SD3.5 code path without weights: a tiny random SD3 pipeline (CLIP x2, T5, VAE)."""
    from typer.testing import CliRunner

    from opdkit.cli import app
    from opdkit.models.adapters import SD3_LORA_TARGETS
    from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(tmp_path / "sd3")
    model = f"model: {{type: sd3, path: {pipe}}}\n"
    recipe = write_recipe(
        tmp_path,
        f"""\
        method: grpo
        prompts: {{dataset: shapes, split: train, tags: [colors]}}
        rewards: [{{type: REWARD}}]
        sampler: {{steps: 3, noise_level: 0.7, cfg: 4.5, resolution: 32}}
        train:
          seed: 1
          lr: 1.0e-2
          batch_size: 2
          group_size: 2
          max_steps: 2
          lora: {{rank: 4, alpha: 8, targets: {list(SD3_LORA_TARGETS)}}}
          kl_beta: 0.01
        """,
        model=model,
    )
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["ratio_first_max_dev"] == 0.0 for m in metrics)
    adapter = tensors(tmp_path / "run" / "final" / "lora.safetensors")
    assert any("add_q_proj" in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)


def test_two_processes_data_parallel(tmp_path: Path, one_thread: None) -> None:
    """`accelerate launch` with two CPU processes (gloo): split prompts, identical weights (~35 s)."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    recipe = write_recipe(tmp_path, RECIPE + "eval: {benchmarks: [shapes-quality], samples_per_prompt: 1, limit: 3}\n")
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000),
        "-m", "opdkit.cli", "train", str(recipe), "--out", str(tmp_path / "ddp"),
        "--set", "train.max_steps=2", "--set", "train.micro_batch=2", "--set", "train.grad_accum=2",
    ]  # fmt: skip
    env = cli_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = [read_jsonl(tmp_path / "ddp" / "ranks" / f"rank_{r}.jsonl") for r in (0, 1)]
    from opdkit.data.sources import load_prompts
    from opdkit.recipe import load_recipe
    from opdkit.training.rollout import step_prompts

    loaded = load_recipe(recipe)
    records = load_prompts(loaded.recipe.prompts)
    for step in (1, 2):
        mine = [next(r for r in log if r["step"] == step and "prompt_indices" in r) for log in logs]
        assert set(mine[0]["prompt_indices"]).isdisjoint(mine[1]["prompt_indices"])
        whole = step_prompts(records, seed=0, step=step, batch_size=2, group_size=4)
        assert mine[0]["prompt_indices"] + mine[1]["prompt_indices"] == whole.indices
        assert mine[0]["seeds"] + mine[1]["seeds"] == whole.seeds
    sums = [next(r["weights_sha256"] for r in log if "weights_sha256" in r) for log in logs]
    assert sums[0] == sums[1]
    assert len(read_jsonl(tmp_path / "ddp" / "metrics.jsonl")) == 2
    # The post-training eval runs on the main process only: each row once.
    results = tmp_path / "ddp" / "results" / "step_000002" / "ddp"
    rows = read_jsonl(results / "shapes-quality.jsonl")
    assert sorted((r["prompt_index"], r["sample_index"]) for r in rows) == [(0, 0), (1, 0), (2, 0)]
    assert json.loads((results / "shapes-quality.json").read_text())["n_images"] == 3
    # The same algorithm as one process over the same micro-batches (4 of them, one update).
    single = train(recipe, tmp_path / "single", ["train.max_steps=2", "train.micro_batch=2", "train.grad_accum=4", "eval.benchmarks=[]"])
    a, b = tensors(tmp_path / "ddp" / "final" / "lora.safetensors"), tensors(single / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    m_ddp, m_single = read_jsonl(tmp_path / "ddp" / "metrics.jsonl"), read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert [m["reward"] for m in m_ddp] == pytest.approx([m["reward"] for m in m_single], abs=1e-6)
    # Per-tag rewards cover both ranks' groups: the same as one process's.
    tagged = [[{k: v for k, v in m.items() if "_by_tag/" in k} for m in log] for log in (m_ddp, m_single)]
    assert any(tagged[1]) and [sorted(m) for m in tagged[0]] == [sorted(m) for m in tagged[1]]
    for ddp_step, single_step in zip(*tagged, strict=True):
        assert ddp_step == pytest.approx(single_step, abs=1e-6)


def test_reward_metrics_per_tag_show_which_task_learns_and_which_gives_no_gradient() -> None:
    from opdkit.methods.grpo import _reward_metrics

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.25, 0.75])  # 4 groups of 2 images
    advantages = torch.zeros(8)
    record = _reward_metrics(rewards, {}, advantages, 2, ["position", "counting", "position", "counting"])
    assert record["zero_std_groups"] == 0.5
    assert record["reward_by_tag/position"] == 0.5 and record["zero_std_groups_by_tag/position"] == 1.0
    assert record["reward_by_tag/counting"] == 0.5 and record["zero_std_groups_by_tag/counting"] == 0.0
    # One task: its curve is the run's own, nothing is repeated per tag.
    alone = _reward_metrics(rewards, {}, advantages, 2, ["ocr"] * 4)
    assert not any("_by_tag/" in k for k in alone)


def test_shipped_grpo_recipes_name_their_rewards_and_tags() -> None:
    from opdkit.recipe import load_recipe

    expected = {
        "shapes/grpo_geneval": ({"shapes_geneval"}, {"single_object", "two_object", "counting", "colors", "position", "color_attr"}),
        "shapes/grpo_ocr": ({"shapes_ocr"}, {"ocr"}),
        "shapes/grpo_quality": ({"shapes_quality"}, None),
        "shapes/grpo_mix": ({"shapes_geneval", "shapes_ocr", "shapes_quality"}, None),
    }
    for name, (rewards, tags) in expected.items():
        recipe = load_recipe(name).recipe
        assert recipe.method == "grpo" and {r.type for r in recipe.rewards if r.weight > 0} == rewards, name
        if name in ("shapes/grpo_geneval", "shapes/grpo_ocr"):  # quality is watched, not optimised
            assert [(r.type, r.weight) for r in recipe.rewards if r.weight == 0] == [("shapes_quality", 0.0)], name
        assert (set(recipe.prompts.tags) if recipe.prompts.tags else None) == tags, name
        assert recipe.model.type == "shapes" and recipe.sampler.resolution == 32
    mix = load_recipe("shapes/grpo_mix").recipe
    assert [r.weight for r in mix.rewards] == [3.0, 1.0, 1.0]
    for name in ("sd35m/grpo_geneval", "sd35m/grpo_ocr", "sd35m/grpo_pickscore", "sd35m/grpo_mix"):
        recipe = load_recipe(name, check_plugins=False).recipe
        assert recipe.sampler.resolution == 512 and recipe.sampler.steps == 10 and recipe.sampler.cfg == 4.5
        assert recipe.train.lora is not None and (recipe.train.lora.rank, recipe.train.lora.alpha) == (32, 64)


def test_train_runs_the_recipes_eval_block(tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`opdkit train` evaluates the final weights on `eval.benchmarks`; `--no-eval` skips it."""
    from typer.testing import CliRunner

    from opdkit.cli import app

    recipe = write_recipe(tmp_path, RECIPE + "eval: {benchmarks: [shapes-quality], samples_per_prompt: 1, limit: 2}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", "evaluated", "--set", "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    # results belong to the run, and to the weights of its last step
    first = tmp_path / "evaluated" / "results" / "step_000001" / "evaluated" / "shapes-quality.json"
    summary = json.loads(first.read_text())
    assert summary["n_images"] == 2 and 0.0 <= summary["metrics"]["overall"] <= 1.0
    assert "eval shapes-quality · evaluated" in result.output
    assert not (tmp_path / "results").exists()  # nothing written into the current directory

    # Resumed for more steps, the run trains on and evaluates its new weights beside the old results.
    resumed = CliRunner().invoke(app, ["train", str(recipe), "--out", "evaluated", "--resume", "--set", "train.max_steps=2"])
    assert resumed.exit_code == 0, resumed.output
    second = tmp_path / "evaluated" / "results" / "step_000002" / "evaluated" / "shapes-quality.json"
    assert json.loads(second.read_text())["n_images"] == 2 and first.is_file()

    skipped = CliRunner().invoke(app, ["train", str(recipe), "--out", "skipped", "--set", "train.max_steps=1", "--no-eval"])
    assert skipped.exit_code == 0, skipped.output
    assert not (tmp_path / "skipped" / "results").exists()


def test_the_recipes_eval_block_scores_the_split_its_params_name(
    tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval.params` reach every benchmark, as `opdkit eval -p` does: a probe scores held-out texts."""
    from typer.testing import CliRunner

    from opdkit.cli import app
    from opdkit.shapes.prompts import load_split

    recipe = write_recipe(tmp_path, RECIPE + "eval: {benchmarks: [shapes-ocr], samples_per_prompt: 1, limit: 3}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", "probe", "--set", "train.max_steps=1",
                                      "--set", "eval.params.split=heldout"])  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = tmp_path / "probe" / "results" / "step_000001" / "probe"
    assert "shapes-heldout" in json.loads((folder / "shapes-ocr.settings.json").read_text())["protocol"]
    scored = {r["prompt"] for r in read_jsonl(folder / "shapes-ocr.jsonl")}
    shipped = {r["prompt"] for split in ("train", "test") for r in load_split(split)}
    assert len(scored) == 3 and not scored & shipped  # texts of neither shipped split


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes (to show a refused call changed nothing)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_folders_are_never_lost_or_mixed(tmp_path: Path, one_thread: None) -> None:
    """A finished run is refused without --overwrite; --resume refuses a changed lr with the diff,
    accepts a larger max_steps (recorded in run.json), and a run killed before its first
    checkpoint restarts cleanly."""
    from typer.testing import CliRunner

    from opdkit.cli import app

    runner = CliRunner()
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(recipe), "--out", str(out), "--set", "train.max_steps=2"]).exit_code == 0

    # A finished run without checkpoints/ (a committed teacher folder) is still a run.
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    again = runner.invoke(app, ["train", str(recipe), "--out", str(out), "--set", "train.max_steps=2"])
    assert again.exit_code == 1 and "holds a run" in again.output and "--overwrite" in again.output
    assert snapshot(out) == before

    # --resume with a changed lr names the key and both values; nothing is written.
    assert runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "b"), "--set", "train.max_steps=2"]).exit_code == 0
    before = snapshot(tmp_path / "b")
    changed = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "b"), "--resume", "--set", "train.lr=0.01"])
    assert changed.exit_code == 1 and "train.lr: 0.003 -> 0.01" in changed.output, changed.output
    assert snapshot(tmp_path / "b") == before
    # ... and extends it to more steps, with the change in the run's history; the .tmp files of
    # writes killed half-way are cleared on the way.
    orphans = [tmp_path / "b" / ".metrics.jsonl.x1.tmp", tmp_path / "b" / "checkpoints" / "step_000002" / ".ema.x2.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"torn")
    longer = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "b"), "--resume", "--set", "train.max_steps=3"])
    assert longer.exit_code == 0, longer.output
    history = json.loads((tmp_path / "b" / "run.json").read_text())["history"]
    assert [h["event"] for h in history] == ["created", "resumed"]
    assert history[1]["changed"] == {"train.max_steps": [2, 3]}
    assert [m["step"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    assert not any(orphan.exists() for orphan in orphans)
    # fewer steps than the run holds: its weights would stay step 3's under a recipe saying 2
    before = snapshot(tmp_path / "b")
    fewer = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "b"), "--resume", "--set", "train.max_steps=2"])
    assert fewer.exit_code == 1 and "already at step 3 (its last checkpoint); pass train.max_steps >= 3" in fewer.output
    assert snapshot(tmp_path / "b") == before

    # --overwrite replaces the run.
    replaced = runner.invoke(app, ["train", str(recipe), "--out", str(out), "--overwrite", "--set", "train.max_steps=1"])
    assert replaced.exit_code == 0, replaced.output
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]




def test_a_run_folder_in_use_is_refused_until_its_process_ends(
    tmp_path: Path, one_thread: None, lock_held_elsewhere: Callable[[Path], AbstractContextManager[None]]
) -> None:
    """Two trainings in one folder would interleave their metrics and checkpoints (the same command
    twice, a --resume while the first still runs): while another process holds the run's lock,
    a new run, --resume and --overwrite are each refused with one line, and nothing changes; so is
    an eval of the run, whose final weights are about to change."""
    from typer.testing import CliRunner

    from opdkit.cli import app

    runner = CliRunner()
    recipe = write_recipe(tmp_path, RECIPE)
    out = tmp_path / "run"
    train(recipe, out, ["train.max_steps=1"])
    before = snapshot(out)
    with lock_held_elsewhere(out / ".lock"):
        for extra in ([], ["--resume"], ["--overwrite"]):
            result = runner.invoke(app, ["train", str(recipe), "--out", str(out), *extra, "--set", "train.max_steps=2"])
            assert result.exit_code == 1, result.output
            assert "another opdkit process is training this run" in result.output and "Traceback" not in result.output
        # an eval would score the final weights the training is about to replace
        results = tmp_path / "results"
        evaluate = ["eval", "--bench", "shapes-quality", "--model", str(out), "--limit", "1", "--samples", "1",
                    "--steps", "2", "--out", str(results)]  # fmt: skip
        refused = runner.invoke(app, evaluate)
        assert refused.exit_code == 1, refused.output
        assert "is training this run" in refused.output and "evaluate it when that training ends" in refused.output
        assert not results.exists()
    assert snapshot(out) == before
    resumed = runner.invoke(app, ["train", str(recipe), "--out", str(out), "--resume", "--set", "train.max_steps=2"])
    assert resumed.exit_code == 0, resumed.output
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    evaluated = runner.invoke(app, evaluate)
    assert evaluated.exit_code == 0, evaluated.output
    assert (results / "run" / "shapes-quality.json").is_file()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock's folder is made before the model loads; a run that fails there removes it again."""
    from opdkit.registry import models

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise OpdkitError("no weights here")

    recipe = write_recipe(tmp_path, RECIPE)
    monkeypatch.setattr(models, "build", no_model)
    with pytest.raises(OpdkitError, match="no weights here"):
        train(recipe, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()

    # a parent folder that another run wrote to meanwhile stays, and the run's own error is raised
    def no_model_beside_another_run(*args: Any, **kwargs: Any) -> None:
        (tmp_path / "new" / "other").mkdir()
        raise OpdkitError("no weights here")

    monkeypatch.setattr(models, "build", no_model_beside_another_run)
    with pytest.raises(OpdkitError, match="no weights here"):
        train(recipe, tmp_path / "new" / "run")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["other"]


def test_resume_where_there_is_no_run_says_it_starts_a_new_one(tmp_path: Path) -> None:
    """A mistyped --out with --resume would otherwise start a long run from scratch unnoticed."""
    recipe = write_recipe(tmp_path, RECIPE)
    with pytest.warns(UserWarning, match=r"new: --resume found no run here to continue; starting a new one"):
        train(recipe, tmp_path / "new", ["train.max_steps=1"], resume=True)
    assert [m["step"] for m in read_jsonl(tmp_path / "new" / "metrics.jsonl")] == [1]


def test_resume_before_the_first_checkpoint_starts_over(tmp_path: Path, one_thread: None) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    train(recipe, tmp_path / "run", ["train.max_steps=1", "train.checkpoint_every=5"])
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed after logging step 1
    shutil.rmtree(tmp_path / "run" / "final")
    train(recipe, tmp_path / "run", ["train.max_steps=1", "train.checkpoint_every=5"], resume=True)
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_a_spent_time_budget_ends_the_run_at_a_checkpoint_and_says_so(tmp_path: Path, one_thread: None) -> None:
    """``train.max_minutes`` ends the run after the step that spends it, checkpointed and final,
    with a warning: a run ended by the clock ends at a step that depends on the machine."""
    recipe = write_recipe(tmp_path, RECIPE)
    with pytest.warns(UserWarning, match=r"train.max_minutes \(1e-09\) spent at step 1 of 3"):
        final = train(recipe, tmp_path / "run", ["train.max_minutes=1e-9", "train.sample_every=0"])
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert json.loads((final / "final.json").read_text())["step"] == 1
    assert (tmp_path / "run" / "checkpoints" / "step_000001").is_dir()
