"""``method: opd`` on tiny models (CPU fp32): zero KL against itself, per-sample routing, MAR,
cold start by delta merging, the run directory, and the SD3 path with two LoRA teachers."""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch

from opdkit.errors import OpdkitError
from opdkit.rundir import read_jsonl

TINY = {"patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8, "text_hidden_size": 32, "text_heads": 2, "text_projection_dim": 32}
TINY_YAML = "model:\n  type: shapes_new\n  params: {patch_size: 4, num_layers: 1, num_heads: 2, head_dim: 8, text_hidden_size: 32, text_heads: 2, text_projection_dim: 32}\n"


def tiny_model() -> Any:
    from opdkit.registry import models

    torch.manual_seed(0)
    return models.build("shapes_new", TINY)


def make_adapter(path: Path, seed: int, scale: float = 0.05, model: Any = None) -> Path:
    """A LoRA teacher on the tiny base with random (non-zero) A and B."""
    model = model or tiny_model()
    name = f"t{seed}"
    model.add_lora(name, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters(name):
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model.save_lora(name, path)


def write_recipe(tmp: Path, body: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "opd.yaml"
    path.write_text(TINY_YAML + textwrap.dedent(body))
    return path


OPD = """\
method: opd
prompts: {dataset: shapes, split: train, tags: [single_object, ocr], balance_tags: true}
teachers:
  - {name: shapes, type: lora, path: TEACHER_A}
  - {name: signs, type: lora, path: TEACHER_B}
router:
  type: tag
  params: {mapping: {single_object: shapes, ocr: signs}}
sampler: {steps: 4, noise_level: 0.7, cfg: 3.0, resolution: 32}
train:
  seed: 0
  lr: 1.0e-2
  batch_size: 2
  group_size: 2
  max_steps: 2
  lora: {rank: 4, alpha: 8, targets: [to_q, to_k, to_v, to_out.0]}
  loss_mode: kl_only
  checkpoint_every: 1
"""


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("teachers")
    return make_adapter(tmp / "a.safetensors", 1), make_adapter(tmp / "b.safetensors", 2, scale=0.08)


def run_opd(tmp: Path, body: str, teachers: tuple[Path, Path], overrides: list[str] | None = None) -> list[dict]:
    from opdkit.methods import train as run
    from opdkit.recipe import load_recipe

    text = body.replace("TEACHER_A", str(teachers[0])).replace("TEACHER_B", str(teachers[1]))
    loaded = load_recipe(write_recipe(tmp, text), overrides or [])
    run(loaded, tmp / "run")
    return read_jsonl(tmp / "run" / "metrics.jsonl")


def test_kl_is_zero_when_the_student_is_its_teacher(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    # One teacher for every prompt, and the student starts as exactly that adapter.
    body = OPD.replace("mapping: {single_object: shapes, ocr: signs}", "mapping: {single_object: shapes, ocr: shapes}")
    metrics = run_opd(tmp_path, body + f"init: {{adapter: {teachers[0]}}}\n", teachers, ["train.max_steps=1"])
    assert metrics[0]["kl"] == 0.0
    assert metrics[0]["ratio_first_max_dev"] == 0.0
    assert metrics[0]["routed/shapes"] == 4 and metrics[0]["routed/signs"] == 0


def test_routing_sends_each_sample_to_its_teacher(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    from opdkit.recipe import TeacherSpec
    from opdkit.registry import routers
    from opdkit.training.rollout import rollout
    from opdkit.training.teachers import frozen_means, load_teachers, routed_teacher_means
    from opdkit.training.trainable import setup_trainable

    model = tiny_model()
    loaded = load_teachers(
        model, [TeacherSpec(name="shapes", type="lora", path=str(teachers[0])), TeacherSpec(name="signs", type="lora", path=str(teachers[1]))], "cpu"
    )
    trainable = setup_trainable(model, _lora())
    records = [{"prompt": "a photo of a circle", "tag": "single_object"}, {"prompt": 'a sign that says "K7"', "tag": "ocr"}] * 2
    routes = routers.build("tag", {"mapping": {"single_object": "shapes", "ocr": "signs"}})(records, ["shapes", "signs"])
    assert routes == ["shapes", "signs", "shapes", "signs"]
    batch = rollout(model, records, [1, 2, 3, 4], steps=3, cfg=3.0, noise_level=0.7, resolution=32, decode=False)
    mixed = routed_teacher_means(model, trainable, batch, 0, slice(0, 4), routes, loaded)
    only_a = frozen_means(model, trainable, batch, loaded["shapes"], 0, torch.arange(4))
    only_b = frozen_means(model, trainable, batch, loaded["signs"], 0, torch.arange(4))
    assert not torch.allclose(only_a, only_b)  # the teachers are distinguishable
    torch.testing.assert_close(mixed[0::2], only_a[0::2])
    torch.testing.assert_close(mixed[1::2], only_b[1::2])
    # the student adapter is active again and is the only trainable one
    assert model.active_adapters() == ["default"]
    trainable = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def _lora() -> Any:
    from opdkit.recipe import LoraSpec

    return LoraSpec(rank=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"])


def test_mar_gradient_pulls_toward_the_anchor(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    # Student starts as teacher A and is distilled toward A itself (zero teacher KL), so only the
    # MAR term (anchor: the base) moves it: its KL to the base must fall.
    body = OPD.replace("mapping: {single_object: shapes, ocr: signs}", "mapping: {single_object: shapes, ocr: shapes}")
    body += f"init: {{adapter: {teachers[0]}}}\nregularizers:\n  - {{type: mar, weight: 10.0, params: {{anchor: base}}}}\n"
    metrics = run_opd(tmp_path, body, teachers, ["train.loss_mode=direct", "train.max_steps=6", "train.lr=5e-3"])
    anchor = [m["kl_anchor/mar:base"] for m in metrics]
    # Each step measures the KL on its own fresh rollouts, so it need not fall at every step
    # (8-shape prompts: 1.2e-6, 5.0e-7, 3.4e-7, 2.0e-7, 2.7e-7, 1.7e-7); it must fall for good.
    assert anchor[0] > 0 and anchor[-1] < 0.25 * anchor[0]
    assert all(later < 0.5 * anchor[0] for later in anchor[1:])


def test_opd_run_with_merge_init_writes_a_loadable_student(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    body = OPD + "init: {method: mean}\nrewards: [{type: shapes_quality, weight: 1.0}]\n"  # logged only
    metrics = run_opd(tmp_path, body, teachers, ["train.lora.rank=8", "train.lora.alpha=16"])
    assert len(metrics) == 2
    m = metrics[0]
    assert m["routed/shapes"] == 2 and m["routed/signs"] == 2  # balanced tags, routed per sample
    assert m["kl/shapes"] is not None and m["kl/signs"] is not None and m["kl"] > 0
    # Per task tag: each tag goes to one teacher here, so its KL is that teacher's; one group per
    # tag, so the run's mean reward is the mean of the two tags'.
    assert m["kl_by_tag/single_object"] == pytest.approx(m["kl/shapes"]) and m["kl_by_tag/ocr"] == pytest.approx(m["kl/signs"])
    assert m["kl_by_tag/single_object"] != m["kl_by_tag/ocr"]
    by_tag = [m["reward_by_tag/single_object"], m["reward_by_tag/ocr"]]
    assert by_tag[0] != by_tag[1] and sum(by_tag) / 2 == pytest.approx(m["reward"])
    assert m["init_merge_rel_error"] == pytest.approx(0.0, abs=1e-5)  # rank 8 = 4 + 4: exact merge
    assert m["ratio_first_max_dev"] == 0.0
    assert (tmp_path / "run" / "final" / "lora.safetensors").is_file()
    from opdkit.runs import load_run_model

    assert load_run_model(tmp_path / "run").world == "shapes"


def test_sft_cold_start_draws_each_image_from_its_routed_teacher(teachers: tuple[Path, Path]) -> None:
    from types import SimpleNamespace

    from opdkit.recipe import TeacherSpec
    from opdkit.sampling import sample_ode
    from opdkit.training.rollout import encode_unique
    from opdkit.training.teachers import acting_as, load_teachers, teacher_samples
    from opdkit.training.trainable import setup_trainable

    model = tiny_model()
    loaded = load_teachers(
        model, [TeacherSpec(name="shapes", type="lora", path=str(teachers[0])), TeacherSpec(name="signs", type="lora", path=str(teachers[1]))], "cpu"
    )
    trainable = setup_trainable(model, _lora())
    prompts = ["a photo of a circle", 'a sign that says "K7"', "a photo of a square", 'a sign that says "A"', "a photo of two circles"]
    routes = ["shapes", "signs", "signs", "shapes", "shapes"]
    seeds = [11, 12, 13, 14, 15]
    sampler = SimpleNamespace(steps=3, cfg=3.0, shift=None, resolution=32)
    cond = encode_unique(model, prompts)
    x0 = teacher_samples(model, trainable, loaded, routes, cond, seeds, sampler, micro_batch=2)
    for name in ("shapes", "signs"):
        rows = torch.tensor([i for i, r in enumerate(routes) if r == name])
        with torch.no_grad(), acting_as(model, loaded[name], trainable):
            alone = sample_ode(model, steps=3, cfg=3.0, resolution=32, seed=[seeds[i] for i in rows], cond=cond[rows], uncond=model.uncond(len(rows)))
        torch.testing.assert_close(x0[rows], alone)
    with torch.no_grad(), acting_as(model, loaded["signs"], trainable):
        other = sample_ode(model, steps=3, cfg=3.0, resolution=32, seed=seeds[:1], cond=cond[:1], uncond=model.uncond(1))
    assert not torch.allclose(x0[:1], other)  # the teachers draw different images


def test_sft_cold_start_fits_the_student_to_teacher_samples(teachers: tuple[Path, Path]) -> None:
    from types import SimpleNamespace

    from opdkit.methods.cold_start import sft_cold_start
    from opdkit.recipe import SftSpec, TeacherSpec
    from opdkit.registry import routers
    from opdkit.shapes.prompts import load_split
    from opdkit.training.losses import flow_matching_loss
    from opdkit.training.rollout import encode_unique
    from opdkit.training.teachers import load_teachers, teacher_samples
    from opdkit.training.trainable import setup_trainable

    model = tiny_model()
    loaded = load_teachers(model, [TeacherSpec(name="shapes", type="lora", path=str(teachers[1]))], "cpu")
    trainable = setup_trainable(model, _lora())
    records = [r for r in load_split("train") if r["tag"] == "single_object"]
    route = routers.build("tag", {"mapping": {"single_object": "shapes"}})
    sampler = SimpleNamespace(steps=3, cfg=3.0, shift=None, resolution=32)
    prompts = [r["prompt"] for r in records] * 4
    cond = encode_unique(model, prompts)
    held_out = teacher_samples(
        model, trainable, loaded, ["shapes"] * len(prompts), cond, list(range(100, 100 + len(prompts))), sampler, micro_batch=8
    )

    def loss_on_teacher_images() -> float:
        with torch.no_grad():
            return float(flow_matching_loss(model, held_out, cond, torch.Generator().manual_seed(0), model.shift))

    before = loss_on_teacher_images()
    sft = SftSpec(steps=40, samples=16, batch_size=8, lr=1e-2)
    stats = sft_cold_start(model, trainable, loaded, route, records, sft, sampler, seed=0, balance_tags=False)
    after = loss_on_teacher_images()
    assert stats["sft_loss_last"] < stats["sft_loss_first"]
    assert after < before  # on fresh teacher images, not only those it trained on
    assert any(float(p.detach().abs().max()) > 0 for n, p in zip(trainable.names, trainable.params, strict=True) if "lora_B" in n)


def test_opd_run_with_sft_init_logs_it_and_refuses_an_empty_init(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    body = OPD + "init: {method: none, sft: {steps: 3, samples: 4, batch_size: 2}}\n"
    metrics = run_opd(tmp_path / "a", body, teachers, ["train.max_steps=1"])
    assert "init_merge_rel_error" not in metrics[0]
    assert metrics[0]["sft_loss_first"] > 0 and metrics[0]["sft_seconds"] > 0
    from opdkit.errors import RecipeError
    from opdkit.recipe import load_recipe

    with pytest.raises(RecipeError, match="method none merges nothing"):
        load_recipe(write_recipe(tmp_path / "b", OPD + "init: {method: none}\n"))


def test_cold_start_refuses_an_adapter_of_another_base(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    """init.adapter and the merged teachers pass the base check load_lora makes: an adapter trained
    on another base is refused in one line, never merged into the student's starting weights."""
    from opdkit.registry import models

    other_base = models.build("shapes_new", {**TINY, "seed": 1})
    foreign = make_adapter(tmp_path / "foreign.safetensors", 3, model=other_base)
    with pytest.raises(OpdkitError, match=r"init: LoRA file '.*foreign\.safetensors' was trained on another base model"):
        run_opd(tmp_path / "adapter", OPD + f"init: {{adapter: {foreign}}}\n", teachers, ["train.max_steps=1"])
    # a foreign teacher to merge is refused the same way when it is loaded as a teacher
    with pytest.raises(OpdkitError, match=r"LoRA file '.*foreign\.safetensors' was trained on another base model"):
        run_opd(tmp_path / "teachers", OPD + "init: {method: mean}\n", (teachers[0], foreign), ["train.max_steps=1"])


def test_cold_start_refuses_an_adapter_that_does_not_fit_the_student(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    """An init adapter with a factor of another shape, or on layers the student does not adapt, is
    refused in one line naming the file and the tensor, not by a RuntimeError from copy_."""
    from opdkit.models.lora import read_lora, write_lora

    lora = read_lora(teachers[0])
    module, (a, b) = sorted(lora.factors.items())[0]
    lora.factors[module] = (torch.cat([a, a[:, :3]], dim=1), b)  # three input columns too many
    wide = write_lora(lora, tmp_path / "wide.safetensors")
    wanted = rf"init: LoRA file '.*wide\.safetensors': {module}\.lora_A\.weight has shape \(4, {a.shape[1] + 3}\), this transformer expects \(4, {a.shape[1]}\)$"
    with pytest.raises(OpdkitError, match=wanted):
        run_opd(tmp_path / "wide", OPD + f"init: {{adapter: {wide}}}\n", teachers, ["train.max_steps=1"])
    narrow = OPD.replace("targets: [to_q, to_k, to_v, to_out.0]", "targets: [to_q]")  # the student adapts less
    assert narrow != OPD
    with pytest.raises(OpdkitError, match=r"init: LoRA file '.*a\.safetensors': \d+ tensors are not in adapter 'default' \(first: .*to_k\.lora_A\.weight\)"):
        run_opd(tmp_path / "narrow", narrow + f"init: {{adapter: {teachers[0]}}}\n", teachers, ["train.max_steps=1"])


def test_opd_refusals_are_one_line(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    body = OPD + "regularizers:\n  - {type: mar, weight: 0.04, params: {anchor: nobody}}\n"
    with pytest.raises(OpdkitError, match="anchors to 'nobody', which is not a teacher"):
        run_opd(tmp_path / "a", body, teachers)
    with pytest.raises(OpdkitError, match="loss_mode: mixed needs 'rewards'"):
        run_opd(tmp_path / "b", OPD, teachers, ["train.loss_mode=mixed"])
    unrouted = OPD.replace("mapping: {single_object: shapes, ocr: signs}", "mapping: {single_object: shapes}")
    with pytest.raises(OpdkitError, match=r"unrouted prompt .*tag 'ocr'"):
        run_opd(tmp_path / "c", unrouted, teachers)
    missing = OPD.replace("path: TEACHER_A", f"path: {tmp_path / 'no_such_run'}")
    with pytest.raises(OpdkitError, match=r"opd\.yaml:\d+: teachers\.0: "):
        run_opd(tmp_path / "missing", missing, teachers)
    (tmp_path / "routers.py").write_text(
        "def nobody():\n    return lambda records, names: ['nobody'] * len(records)\n\n"
        "def crashes():\n    def route(records, names):\n        raise KeyError('tag')\n    return route\n"
    )
    for name, message in (("nobody", r"naming nobody, not a teacher \(shapes, signs\)"), ("crashes", r"router: .*crashes' raised KeyError")):
        custom = OPD.replace(
            "router:\n  type: tag\n  params: {mapping: {single_object: shapes, ocr: signs}}\n",
            f"router: {{type: {tmp_path}/routers.py:{name}}}\n",
        )
        assert custom != OPD
        with pytest.raises(OpdkitError, match=message):
            run_opd(tmp_path / name, custom, teachers)


def test_a_teacher_run_another_process_is_training_is_refused(
    tmp_path: Path, lock_held_elsewhere: Callable[[Path], AbstractContextManager[None]]
) -> None:
    """A teacher run being extended (``--resume`` with more steps) is about to get another final
    adapter: distilling from the old one now (or starting from it) is refused with one line until it ends."""
    import shutil

    from opdkit.checkpoint import COMMITTED_DIR
    from opdkit.training.teachers import adapter_file

    run = tmp_path / "ocr"
    shutil.copytree(COMMITTED_DIR / "shapes-teachers" / "ocr", run)
    with lock_held_elsewhere(run / ".lock"), pytest.raises(OpdkitError, match="another opdkit process is training this run"):
        adapter_file(run)
    assert adapter_file(run).is_file()


def test_full_teacher_loads_only_its_transformer_and_is_what_the_student_consults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opdkit.models import loading
    from opdkit.recipe import TeacherSpec
    from opdkit.training.teachers import acting_as, load_teachers
    from opdkit.training.trainable import Trainable

    other = tiny_model()
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "full")
    student = tiny_model()

    loaded_components: list[str] = []
    real_load = loading._load_component

    def spy(root: Path, name: str, cls: Any, *, dtype: Any) -> Any:
        loaded_components.append(name)
        return real_load(root, name, cls, dtype=dtype)

    monkeypatch.setattr(loading, "_load_component", spy)
    teacher = load_teachers(student, [TeacherSpec(name="t", type="full", path=str(tmp_path / "full"))], "cpu")["t"]
    assert loaded_components == ["transformer"]  # no text encoder, tokenizer or VAE
    assert teacher.kind == "full" and not any(p.requires_grad for p in teacher.transformer.parameters())

    x = torch.randn(2, *student.latent_shape(32), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    prompts = ["a photo of a square", 'a sign that says "K7"']
    cond = student.encode_prompts(prompts)
    with torch.no_grad():
        expected = other.velocity(x, sigma, other.encode_prompts(prompts))
        with acting_as(student, teacher, Trainable([], [], lora=True)):  # a full teacher needs no reference
            as_teacher = student.velocity(x, sigma, cond)
        as_student = student.velocity(x, sigma, cond)
    torch.testing.assert_close(as_teacher, expected)
    assert not torch.allclose(as_student, expected, atol=1e-4)  # and the student is back afterwards


def test_a_lora_teacher_trained_with_dropout_gives_the_same_targets_every_time(tmp_path: Path) -> None:
    # OPD computes teacher means while the shared transformer is in training mode; a teacher's
    # dropout (recorded in its file) would make its targets noise, different at every call.
    from opdkit.recipe import TeacherSpec
    from opdkit.training.teachers import acting_as, load_teachers
    from opdkit.training.trainable import setup_trainable

    source = tiny_model()
    source.add_lora("t", rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], dropout=0.5)
    with torch.no_grad():
        for p in source.lora_parameters("t"):
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    path = source.save_lora("t", tmp_path / "t.safetensors")
    model = tiny_model()
    loaded = load_teachers(model, [TeacherSpec(name="t", type="lora", path=str(path))], "cpu")
    trainable = setup_trainable(model, _lora())
    x = torch.randn(2, *model.latent_shape(32), generator=torch.Generator().manual_seed(1))
    sigma, cond = torch.tensor([0.9, 0.4]), model.encode_prompts(["a photo of a square", "a photo of two circles"])
    model.transformer.train()
    with torch.no_grad(), acting_as(model, loaded["t"], trainable):
        first, second = model.velocity(x, sigma, cond), model.velocity(x, sigma, cond)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_a_full_fine_tuned_students_base_is_its_frozen_copy(tmp_path: Path) -> None:
    # With train.lora: null there are no adapters to switch off: the base (a 'base' teacher, MAR's
    # default anchor, ref_kl) must be the frozen copy GRPO's KL uses, not the live student.
    from opdkit.training.teachers import acting_as
    from opdkit.training.trainable import setup_trainable

    student = tiny_model()
    trainable = setup_trainable(student, None)
    x = torch.randn(2, *student.latent_shape(32), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    cond = student.encode_prompts(["a photo of a square", "a photo of two circles"])
    with torch.no_grad():
        before = student.velocity(x, sigma, cond)
        for p in trainable.params:
            p.add_(0.05 * torch.randn_like(p))
        with acting_as(student, None, trainable):
            as_base = student.velocity(x, sigma, cond)
        moved = student.velocity(x, sigma, cond)
    torch.testing.assert_close(as_base, before)
    assert not torch.allclose(moved, before, atol=1e-4)  # the student is back afterwards

    other = tiny_model()
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "full")
    body = f"""\
method: opd
prompts: {{dataset: shapes, split: train, tags: [single_object]}}
teachers:
  - {{name: t, type: full, path: {tmp_path / 'full'}}}
router: {{type: tag, params: {{mapping: {{single_object: t}}}}}}
regularizers:
  - {{type: ref_kl, weight: 1.0}}
sampler: {{steps: 3, noise_level: 0.7, cfg: 3.0, resolution: 32, train_window: [0, 1]}}
train: {{seed: 0, lr: 1.0e-2, batch_size: 2, group_size: 2, max_steps: 3, loss_mode: direct, checkpoint_every: 10}}
"""
    anchor = [m["kl_anchor/ref_kl:base"] for m in run_opd(tmp_path / "opd", body, ("", ""))]
    assert anchor[0] == 0.0  # step 1: the student is still the base
    assert all(kl > 0 for kl in anchor[1:])  # was 0.0 at every step: the student against itself


def test_sd3_path_with_two_lora_teachers(tmp_path: Path) -> None:
    from opdkit.methods import train as run
    from opdkit.models.loading import load_flow_model
    from opdkit.recipe import load_recipe
    from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(tmp_path / "sd3")
    files = []
    for seed in (1, 2):
        model = load_flow_model(pipe)
        files.append(make_adapter(tmp_path / f"t{seed}.safetensors", seed, model=model))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red cube", "tag": "objects"}\n{"prompt": "a sign that says \\"hi\\"", "tag": "text"}\n')
    recipe = tmp_path / "opd.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        method: opd
        model: {{type: sd3, path: {pipe}}}
        prompts: {{dataset: {prompts}, balance_tags: true}}
        teachers:
          - {{name: objects, type: lora, path: {files[0]}}}
          - {{name: text, type: lora, path: {files[1]}}}
        router: {{type: tag}}
        regularizers: [{{type: mar, weight: 0.04}}]
        init: {{method: mean}}
        sampler: {{steps: 3, noise_level: 0.7, cfg: 2.0, resolution: 32}}
        train: {{seed: 0, lr: 1.0e-3, batch_size: 2, group_size: 2, max_steps: 2, lora: {{rank: 4, alpha: 8, targets: [to_q, to_k, to_v, to_out.0]}}}}
    """))
    run(load_recipe(recipe), tmp_path / "run")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["routed/objects"] == 2 and metrics[0]["routed/text"] == 2
    assert metrics[0]["kl_anchor/mar:base"] is not None
    assert (tmp_path / "run" / "final" / "lora.safetensors").is_file()


# -- the committed shapes teachers ----------------------------------------------------------------

COMMITTED_TEACHERS = ("geneval", "ocr", "quality")
# what a run may change without being a different recipe: its budget and its logging
BUDGET_KEYS = {"max_steps", "max_minutes", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every"}


def test_keys_a_loss_mode_never_reads_are_named_in_a_warning(tmp_path: Path, teachers: tuple[Path, Path]) -> None:
    import warnings

    from opdkit.recipe import load_recipe

    text = OPD.replace("TEACHER_A", str(teachers[0])).replace("TEACHER_B", str(teachers[1]))
    path = write_recipe(tmp_path, text.replace("  loss_mode: kl_only\n", "  loss_mode: direct\n  adv_clip: 3.0\n"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(path, ["train.detach_kl=false"])
    said = [str(w.message) for w in caught]
    assert any(f"{path}:" in m and "train.adv_clip has no effect with train.loss_mode direct" in m for m in said), said
    assert any("--set train.detach_kl=false: train.detach_kl has no effect" in m for m in said), said
    with warnings.catch_warnings(record=True) as caught:  # kl_only reads adv_clip; the shipped recipes set nothing unread
        warnings.simplefilter("always")
        load_recipe(write_recipe(tmp_path / "b", text + "  adv_clip: 3.0\n"))
        for name in ("shapes/opd", "sd35m/opd", "flux/opd", "qwen_image/opd"):
            load_recipe(name, check_plugins=False)
    assert not [w for w in caught if "no effect" in str(w.message)]


def test_shipped_opd_recipe_uses_the_committed_teachers() -> None:
    from opdkit.checkpoint import COMMITTED_DIR
    from opdkit.recipe import load_recipe, resolve_recipe_path
    from opdkit.registry import teachers

    recipe = load_recipe(resolve_recipe_path("shapes/opd")).recipe
    assert sorted(t.name for t in recipe.teachers) == ["geneval", "ocr", "quality"]
    for spec in recipe.teachers:
        source = teachers.build(spec.type, {"path": spec.path})
        assert source.path is not None and source.path.is_relative_to(COMMITTED_DIR), source.path
        assert (source.path / "final" / "lora.safetensors").is_file()


@pytest.mark.parametrize("name", COMMITTED_TEACHERS)
def test_committed_teacher_is_a_run_of_its_shipped_recipe_and_loads_by_name(name: str) -> None:
    from opdkit.checkpoint import COMMITTED_DIR
    from opdkit.eval.runner import resolve_model
    from opdkit.recipe import load_recipe, resolve_recipe_path
    from opdkit.registry import models
    from opdkit.runs import final_info, read_run_recipe

    run = COMMITTED_DIR / "shapes-teachers" / name
    made_by = read_run_recipe(run)
    shipped = load_recipe(resolve_recipe_path(f"shapes/grpo_{name}")).recipe
    # The recipe that made it (seed included) is the shipped one, up to the run's own budget keys.
    assert made_by.method == "grpo" and made_by.model == shipped.model and made_by.prompts == shipped.prompts
    assert made_by.rewards == shipped.rewards and made_by.sampler == shipped.sampler
    made, ship = (r.train.model_dump(exclude=BUDGET_KEYS) for r in (made_by, shipped))
    assert made == ship
    assert final_info(run)["kind"] == "lora"

    # A LoRA is a delta on one base: it was trained on the committed shapes-base, not an older one.
    base_weights = COMMITTED_DIR / "shapes-base" / "transformer" / "diffusion_pytorch_model.safetensors"
    made_on = json.loads((run / "TRAINING.json").read_text())["base_transformer_sha256"]
    assert made_on == hashlib.sha256(base_weights.read_bytes()).hexdigest()

    model, filed_as = resolve_model(f"shapes-teachers/{name}")
    assert filed_as == f"shapes-teachers-{name}"
    base = models.build("shapes-base")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        emb = base.encode_prompts(["a red circle", "a sign that says \"K7\""])
        moved = (model.velocity(x, t, emb) - base.velocity(x, t, emb)).abs().max()
    assert moved > 1e-4  # the adapter is really applied


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_opd_runs_its_forwards_in_the_recipes_precision(
    tmp_path: Path, teachers: tuple[Path, Path], precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.precision reaches OPD's rollout, student and teacher forwards; fp16 steps through a
    gradient scaler. Autocast is allowed on the CPU here: the loop allows it only on CUDA."""
    import collections

    from opdkit.training import loop

    monkeypatch.setattr(loop, "autocast_supported", lambda device, dtype: True)
    seen: collections.Counter[torch.dtype] = collections.Counter()

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            seen[output.dtype] += 1

    scalers: list[bool] = []
    step = loop.Optimization.step
    monkeypatch.setattr(loop.Optimization, "step", lambda self: scalers.append(self.scaler.is_enabled()) or step(self))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        metrics = run_opd(tmp_path, OPD, teachers, [f"train.precision={precision}", "train.max_steps=1"])
    finally:
        handle.remove()
    low = torch.bfloat16 if precision == "bf16" else torch.float16
    assert seen[low] > 0 and seen[torch.float32] == 0, seen  # every transformer and encoder Linear
    assert scalers and all(enabled == (precision == "fp16") for enabled in scalers)
    assert metrics[0]["ratio_first_max_dev"] < 1e-2
