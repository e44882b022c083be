"""The FLUX.1 and Qwen-Image families on tiny random pipelines (real diffusers/transformers classes).

Each family's folder is built once, saved with ``save_pretrained`` and loaded back through
opdkit's loader by its ``model`` plug-in; then: the interface (shapes, schedule, masks and
batch independence), sampling, a GRPO run and its resume, an OPD run with two LoRA teachers, and
LoRA save / load / merge / export.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from opdkit.rundir import read_jsonl
from tests.fixtures.tiny_families import RESOLUTION, build_tiny_flux_pipeline, build_tiny_qwen_image_pipeline
from tests.test_grpo import tensors, train, write_recipe

FAMILIES = ("flux", "qwen-image")
# FLUX.1-dev guides through its embedding (one forward); Qwen-Image runs true CFG.
CFG = {"flux": 1.0, "qwen-image": 2.0}
PROMPTS = ["a photo of a red cube", "a sign that says hello world"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        "flux": build_tiny_flux_pipeline(root / "flux"),
        "qwen-image": build_tiny_qwen_image_pipeline(root / "qwen"),
    }


def build(family: str, pipelines: dict[str, Path], **params: Any) -> Any:
    from opdkit.registry import models

    return models.build(family, {"path": str(pipelines[family]), **params})


def random_adapter(model: Any, name: str, seed: int, path: Path) -> Path:
    """A rank-2 adapter on the family's own targets with small random A and B, saved to ``path``."""
    model.add_lora(name, rank=2, alpha=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters(name):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.save_lora(name, path)


@pytest.mark.parametrize("family", FAMILIES)
def test_interface_schedule_and_batch_independence(family: str, pipelines: dict[str, Path]) -> None:
    from opdkit.sampling import sample_ode, sample_sde

    model = build(family, pipelines)
    assert model.family == family and model.world == "sd3"
    assert model.latent_shape(RESOLUTION) == (4, 8, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.latent_shape(18)
    sigmas = model.sigmas(4, resolution=RESOLUTION)
    assert sigmas.shape == (5,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas.diff() < 0).all())
    # a static shift from the recipe replaces the token-count one: SD3's map of the same grid
    static = model.sigmas(4, shift=3.0, resolution=RESOLUTION)
    if family == "flux":
        grid = torch.linspace(1.0, 0.25, 4, dtype=torch.float64)
        torch.testing.assert_close(static[:-1], (3 * grid / (1 + 2 * grid)).float())
    cond = model.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape[0] == 2 and len(cond.cat(model.uncond(2))) == 4
    if family == "qwen-image":
        assert cond.mask is not None and cond.mask.sum(1).tolist()[0] < cond.mask.shape[1]  # padded row
    cfg = CFG[family]
    both = sample_ode(model, PROMPTS, steps=2, cfg=cfg, resolution=RESOLUTION, seed=[5, 6])
    alone = sample_ode(model, PROMPTS[:1], steps=2, cfg=cfg, resolution=RESOLUTION, seed=[5])
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-4)  # padding changes nothing
    traj = sample_sde(model, PROMPTS, steps=2, cfg=cfg, resolution=RESOLUTION, seed=[5, 6])
    assert traj.states.shape == (3, 2, 4, 8, 8) and torch.isfinite(traj.log_probs).all()
    images = model.decode(both)
    assert (
        images.shape == (2, 3, RESOLUTION, RESOLUTION)
        and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0
    )
    assert model.encode_images(images).shape == (2, 4, 8, 8)


def test_flux_guidance_reaches_the_transformer(pipelines: dict[str, Path]) -> None:
    model = build("flux", pipelines, guidance=1.0)
    x, cond = (
        torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        model.encode_prompts(PROMPTS[:1]),
    )
    low = model.velocity(x, 0.5, cond)
    model.guidance = 7.0
    assert not torch.allclose(low, model.velocity(x, 0.5, cond))
    # benchmarks sample the guidance-distilled model without a CFG branch unless told otherwise
    from opdkit.eval.runner import benchmark_cfg

    assert model.embedded_guidance and benchmark_cfg(model, {"cfg": 4.5}) == 1.0
    assert benchmark_cfg(build("qwen-image", pipelines), {"cfg": 4.5}) == 4.5
    # ... and the settings an eval records (which a study checks its results against) say so too
    from opdkit.eval.runner import eval_settings
    from opdkit.registry import benchmarks

    settings = eval_settings(benchmarks.build("shapes-quality"), model)
    assert settings["cfg"] == 1.0 and settings["weights"] == model.base_fingerprint()


def test_qwen_guidance_keeps_the_conditional_norm_per_patch(pipelines: dict[str, Path]) -> None:
    from opdkit.models.packed import pack_latents

    model = build("qwen-image", pipelines)
    g = torch.Generator().manual_seed(1)
    v_c, v_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    guided = model.guide(v_c, v_u, 4.0)
    torch.testing.assert_close(pack_latents(guided).norm(dim=-1), pack_latents(v_c).norm(dim=-1))
    assert not torch.allclose(guided, v_c)


def test_a_folder_of_another_family_is_refused_by_name(pipelines: dict[str, Path]) -> None:
    from opdkit.errors import OpdkitError

    with pytest.raises(OpdkitError, match="FluxPipeline folder: use model type 'flux'"):
        build("qwen-image", {"qwen-image": pipelines["flux"]})


GRPO = """\
method: grpo
prompts: {dataset: shapes, split: train, tags: [colors]}
rewards: [{type: REWARD}]
sampler: {steps: 3, noise_level: 0.7, cfg: CFG, resolution: 16}
train: {seed: 1, lr: 1.0e-2, batch_size: 2, group_size: 2, max_steps: 2, checkpoint_every: 1, sample_every: 0,
        lora: {rank: 2, alpha: 4}, kl_beta: 0.01}
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_run_then_resume_is_bit_identical(
    family: str, pipelines: dict[str, Path], tmp_path: Path
) -> None:
    model = f"model: {{type: {family}, path: {pipelines[family]}}}\n"
    recipe = write_recipe(tmp_path, GRPO.replace("CFG", str(CFG[family])), model=model)
    whole = train(recipe, tmp_path / "whole")
    metrics = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["ratio_first_max_dev"] == 0.0 for m in metrics)
    adapter = tensors(whole / "lora.safetensors")
    targets = build(family, pipelines).lora_targets  # no targets in the recipe: the family's own
    assert {k.split(".lora_")[0].split(".", 2)[-1] for k in adapter} <= set(targets)
    assert any("add_q_proj" in k for k in adapter) and any("mlp" in k or "ff" in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    # killed after its step-1 checkpoint: resume ends with the same weights
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)
    shutil.rmtree(killed / "final")
    shutil.rmtree(killed / "checkpoints" / "step_000002")
    (killed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": "step_000001"}))
    resumed = tensors(train(recipe, killed, resume=True) / "lora.safetensors")
    assert adapter.keys() == resumed.keys() and all(torch.equal(adapter[k], resumed[k]) for k in adapter)


@pytest.mark.parametrize("family", FAMILIES)
def test_opd_with_two_lora_teachers(family: str, pipelines: dict[str, Path], tmp_path: Path) -> None:
    from opdkit.methods import train as run
    from opdkit.recipe import load_recipe

    model = build(family, pipelines)
    files = [random_adapter(model, f"t{i}", i, tmp_path / f"t{i}.safetensors") for i in (1, 2)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red cube", "tag": "objects"}\n{"prompt": "a sign that says \\"hi\\"", "tag": "text"}\n'
    )
    recipe = tmp_path / "opd.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        method: opd
        model: {{type: {family}, path: {pipelines[family]}}}
        prompts: {{dataset: {prompts}, balance_tags: true}}
        teachers:
          - {{name: objects, type: lora, path: {files[0]}}}
          - {{name: text, type: lora, path: {files[1]}}}
        router: {{type: tag}}
        sampler: {{steps: 3, noise_level: 0.7, cfg: {CFG[family]}, resolution: 16}}
        train: {{seed: 0, lr: 1.0e-3, batch_size: 2, group_size: 2, max_steps: 1, sample_every: 0, lora: {{rank: 2, alpha: 4}}}}
    """)
    )
    run(load_recipe(recipe), tmp_path / "run")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]
    assert metrics[0]["routed/objects"] == 2 and metrics[0]["routed/text"] == 2 and metrics[0]["kl"] > 0
    assert (tmp_path / "run" / "final" / "lora.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_save_load_merge_and_export(family: str, pipelines: dict[str, Path], tmp_path: Path) -> None:
    model = build(family, pipelines)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = model.encode_prompts(PROMPTS)
    base = model.velocity(x, 0.7, cond)
    path = random_adapter(model, "style", 4, tmp_path / "style.safetensors")
    adapted = model.velocity(x, 0.7, cond)
    assert not torch.allclose(base, adapted)
    fresh = build(family, pipelines)
    fresh.load_lora(path, "style")
    torch.testing.assert_close(fresh.velocity(x, 0.7, cond), adapted)
    fresh.merge_lora("style")
    assert fresh.lora_names() == []
    torch.testing.assert_close(fresh.velocity(x, 0.7, cond), adapted, atol=1e-5, rtol=1e-4)
    # the merged model written as its own pipeline folder loads back through the plug-in
    fresh.save_pretrained(tmp_path / "merged")
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["_class_name"] == {"flux": "FluxPipeline", "qwen-image": "QwenImagePipeline"}[family]
    again = build(family, {family: tmp_path / "merged"})
    torch.testing.assert_close(again.velocity(x, 0.7, cond), adapted, atol=1e-5, rtol=1e-4)
    assert again.max_sequence_length == fresh.max_sequence_length


@pytest.mark.parametrize("name", ["flux/grpo", "flux/opd", "qwen_image/grpo", "qwen_image/opd"])
def test_shipped_family_recipes(name: str) -> None:
    """Real-size recipes: their family, guidance as the family samples it, the family's LoRA targets."""
    from opdkit.recipe import load_recipe

    recipe = load_recipe(name).recipe
    family = "flux" if name.startswith("flux") else "qwen-image"
    assert recipe.model.type == family and recipe.sampler.resolution == 512
    assert recipe.sampler.cfg == CFG[family] if family == "flux" else recipe.sampler.cfg > 1.0
    assert recipe.train.lora is not None and recipe.train.lora.targets is None
    if recipe.method == "opd":
        assert len(recipe.teachers) == 3 and all(t.type == "lora" for t in recipe.teachers)
