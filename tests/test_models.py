"""Model adapter, SD3-family loader and tiny builders (CPU, fp32, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from opdkit.errors import OpdkitError
from opdkit.models.flow_model import Cond, FlowModel
from opdkit.models.loading import load_flow_model, parse_dtype
from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, build_shapes_tokenizer
from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

SHAPES_WORDS = [
    "a", "an", "photo", "of", "and", "the", "red", "blue", "green", "circle", "square",
    "triangle", "left", "right", "above", "below", "to", "sign", "that", "says", "two", "three",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "pipe", seed=0)


@pytest.fixture(scope="module")
def tiny_pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No T5, no VAE: zero tokens appended, pixel space."""
    return build_tiny_sd3_pipeline(
        tmp_path_factory.mktemp("tiny_px") / "pipe", seed=1, with_t5=False, with_vae=False
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> FlowModel:
    return load_flow_model(tiny_dir)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ShapesModelConfig(
        num_layers=1, num_heads=2, head_dim=16, text_hidden_size=32, text_projection_dim=32
    )
    return build_shapes_pipeline(tmp_path_factory.mktemp("shapes") / "pipe", SHAPES_WORDS, config, seed=0)


def _diffusers_pipeline(path: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(path), **kwargs)


# -- build / save / load -------------------------------------------------------------------------


def test_tiny_sd3_roundtrip(tiny_dir: Path, tiny: FlowModel) -> None:
    from safetensors.torch import load_file

    assert json.loads((tiny_dir / "opdkit.json").read_text())["world"] == "sd3"
    assert tiny.world == "sd3" and tiny.shift == 3.0 and tiny.max_sequence_length == 16
    assert tiny.encoder_kinds == ["clip", "clip", "t5"] and len(tiny.tokenizers) == 3
    assert tiny.vae is not None and tiny.dtype == torch.float32 and tiny.device.type == "cpu"
    saved = load_file(str(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    loaded = tiny.transformer.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # Frozen encoders, trainable transformer.
    assert not any(p.requires_grad for e in tiny.text_encoders for p in e.parameters())
    assert all(p.requires_grad for p in tiny.transformer.parameters())


def test_tiny_build_is_seeded_and_leaves_global_rng(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_sd3_pipeline(tmp_path / "a", seed=7, with_t5=False)
    assert torch.equal(torch.rand(1), expected_next)  # builder used a forked RNG
    b = build_tiny_sd3_pipeline(tmp_path / "b", seed=7, with_t5=False)
    c = build_tiny_sd3_pipeline(tmp_path / "c", seed=8, with_t5=False)
    name = "transformer/diffusion_pytorch_model.safetensors"
    wa, wb, wc = (load_file(str(p / name)) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_diffusers_pipeline_loads_tiny(tiny_dir: Path) -> None:
    pipe = _diffusers_pipeline(tiny_dir)
    out = pipe(
        "a red cube", num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="pt"
    )
    assert out.images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("prompts", [["a red cube", "two dogs on the left of a cat"], ["hello"]])
def test_encode_prompts_matches_diffusers(tiny_dir: Path, tiny: FlowModel, prompts: list[str]) -> None:
    pipe = _diffusers_pipeline(tiny_dir)
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompts, None, None, max_sequence_length=16, do_classifier_free_guidance=True
    )
    cond = tiny.encode_prompts(prompts)
    assert cond.prompt_embeds.shape == (len(prompts), 16 + 16, 64) and cond.pooled.shape == (len(prompts), 64)
    torch.testing.assert_close(cond.prompt_embeds, embeds.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled.detach(), atol=1e-5, rtol=1e-5)
    uncond = tiny.uncond(len(prompts))
    torch.testing.assert_close(uncond.prompt_embeds, neg_embeds.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond.pooled, neg_pooled.detach(), atol=1e-5, rtol=1e-5)


def test_encode_prompts_without_t5_matches_diffusers(tiny_pixel_dir: Path) -> None:
    model = load_flow_model(tiny_pixel_dir)
    assert model.encoder_kinds == ["clip", "clip"] and model.vae is None
    pipe = _diffusers_pipeline(tiny_pixel_dir, text_encoder_3=None, tokenizer_3=None, vae=None)
    embeds, _, pooled, _ = pipe.encode_prompt(
        ["a blue sphere"], None, None, max_sequence_length=16, do_classifier_free_guidance=False
    )
    cond = model.encode_prompts(["a blue sphere"])
    torch.testing.assert_close(cond.prompt_embeds, embeds.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled.detach(), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(cond.prompt_embeds[:, 16:]) == 0  # the appended zero tokens


def test_velocity_shape_and_timestep(tiny: FlowModel) -> None:
    cond = tiny.encode_prompts(["a red cube", "a blue sphere"])
    assert tiny.latent_shape(32) == (4, 32, 32)
    x = torch.randn(2, *tiny.latent_shape(32))
    sigma = torch.tensor([0.25, 0.9])
    v = tiny.velocity(x, sigma, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    direct = tiny.transformer(
        hidden_states=x,
        timestep=sigma * 1000,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled,
        return_dict=False,
    )[0]
    torch.testing.assert_close(v, direct)
    torch.testing.assert_close(tiny.velocity(x, 0.5, cond), tiny.velocity(x, torch.tensor([0.5, 0.5]), cond))
    with pytest.raises(ValueError, match="batch"):
        tiny.velocity(x, sigma, cond[0])


def test_vae_decode_uses_scaling_and_shift(tiny: FlowModel) -> None:
    assert tiny.vae is not None
    x = torch.randn(1, 4, 32, 32)
    images = tiny.decode(x)
    assert images.shape == (1, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    raw = tiny.vae.decode(x / 1.5305 + 0.0609, return_dict=False)[0]
    torch.testing.assert_close(images, ((raw + 1) / 2).clamp(0, 1))
    z = tiny.encode_images(images)
    mode = tiny.vae.encode(images * 2 - 1, return_dict=False)[0].mode()
    torch.testing.assert_close(z, (mode - 0.0609) * 1.5305)


def test_pixel_space_decode_encode_inverse(tiny_pixel_dir: Path) -> None:
    model = load_flow_model(tiny_pixel_dir)
    assert model.latent_shape(32) == (3, 32, 32) and model.vae_scale_factor == 1
    images = torch.rand(2, 3, 32, 32)
    x = model.encode_images(images)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(model.decode(x), images)
    assert model.decode(torch.full((1, 3, 4, 4), 5.0)).max() == 1.0  # clamped
    with pytest.raises(ValueError, match="multiple"):
        model.latent_shape(33)


def test_cond_helpers() -> None:
    cond = Cond(torch.arange(6.0).view(3, 2, 1), torch.arange(3.0).view(3, 1))
    assert len(cond) == 3 and len(cond.cat(cond)) == 6
    assert cond[1].prompt_embeds.shape == (1, 2, 1)
    assert torch.equal(cond.repeat_interleave(2).pooled.view(-1), torch.tensor([0.0, 0, 1, 1, 2, 2]))
    assert cond[0].expand(4).prompt_embeds.shape == (4, 2, 1)


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(OpdkitError, match="unknown dtype"):
        parse_dtype("float8")


def test_save_pretrained_roundtrip(tiny: FlowModel, tmp_path: Path) -> None:
    out = tiny.save_pretrained(tmp_path / "saved")
    again = load_flow_model(out)
    assert again.encoder_kinds == tiny.encoder_kinds and again.shift == tiny.shift
    assert again.max_sequence_length == tiny.max_sequence_length and again.world == tiny.world
    prompts = ["a red cube", ""]
    a, b = tiny.encode_prompts(prompts), again.encode_prompts(prompts)
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds)
    x = torch.randn(2, 4, 32, 32)
    torch.testing.assert_close(tiny.velocity(x, 0.3, a), again.velocity(x, 0.3, a))
    torch.testing.assert_close(tiny.decode(x), again.decode(x))
    assert _diffusers_pipeline(out).text_encoder_3 is not None  # still a diffusers pipeline


def test_encode_prompts_grad_for_pretraining(shapes_dir: Path, tmp_path: Path) -> None:
    model = load_flow_model(shapes_dir)
    assert not model.encode_prompts(["a red circle"]).pooled.requires_grad
    for encoder in model.text_encoders:
        encoder.requires_grad_(True)
    cond = model.encode_prompts(["a red circle", 'a sign that says "K7"'], grad=True)
    v = model.velocity(torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8]), cond)
    v.square().mean().backward()
    grads = [p.grad for p in model.text_encoders[0].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # A trained shapes model saves back with its world and config.
    out = model.save_pretrained(tmp_path / "trained")
    again = load_flow_model(out)
    assert again.world == "shapes" and again.max_sequence_length == 0 and again.vae is None
    assert again.extra_config["shapes_model"]["num_layers"] == 1
    torch.testing.assert_close(again.encode_prompts(["a red circle"]).pooled, cond.pooled[:1].detach())
    model.add_lora("x", rank=2, alpha=2)
    with pytest.raises(OpdkitError, match="LoRA adapters attached"):
        model.save_pretrained(tmp_path / "with_lora")


# -- loader errors -------------------------------------------------------------------------------


def test_loader_missing_path(tmp_path: Path) -> None:
    with pytest.raises(OpdkitError, match="does not exist") as err:
        load_flow_model(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(OpdkitError, match="hf:owner/name"):
        load_flow_model("stabilityai/stable-diffusion-3.5-medium")
    with pytest.raises(OpdkitError, match=r"model_index\.json"):
        load_flow_model(tmp_path)


def test_loader_broken_and_missing_components(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pixel_dir, broken)
    (broken / "text_encoder_2" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OpdkitError, match="text_encoder_2") as err:
        load_flow_model(broken)
    assert str(broken) in str(err.value) and "\n" not in str(err.value)

    missing = tmp_path / "missing"
    shutil.copytree(tiny_pixel_dir, missing)
    shutil.rmtree(missing / "transformer")
    with pytest.raises(OpdkitError, match="'transformer' is listed"):
        load_flow_model(missing)

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_pixel_dir, foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["vae"] = ["some_package", "Evil"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(OpdkitError, match="only diffusers, transformers"):
        load_flow_model(foreign)


# -- shapes model ----------------------------------------------------------------------------------


def test_shapes_tokenizer_splits_quoted_text() -> None:
    tok = build_shapes_tokenizer(SHAPES_WORDS, max_length=16)
    ids = tok('a sign that says "K7"').input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a", "sign", "that", "says", '"', "K", "7", '"', "<|endoftext|>",
    ]  # fmt: skip
    words = tok.convert_ids_to_tokens(tok("a red circle to the left of a zebra").input_ids)
    assert words[1:-1] == ["a", "red", "circle", "to", "the", "left", "of", "a", "<|unk|>"]
    padded = tok(["a"], padding="max_length", max_length=16, truncation=True).input_ids[0]
    assert len(padded) == 16 and padded[3:] == [tok.pad_token_id] * 13
    assert tok.eos_token_id != 2  # transformers' CLIP treats eos id 2 as a legacy checkpoint


def test_shapes_pipeline_loads_in_pixel_space(shapes_dir: Path) -> None:
    model = load_flow_model(shapes_dir)
    assert model.world == "shapes" and model.vae is None and model.max_sequence_length == 0
    assert model.encoder_kinds == ["clip"] and model.shift == 3.0
    assert model.latent_shape(32) == (3, 32, 32)
    cond = model.encode_prompts(['a sign that says "K7"', "two red squares"])
    assert cond.prompt_embeds.shape == (2, 24, 32) and cond.pooled.shape == (2, 32)
    # Different glyphs give different conditioning (the tokens are not unknown).
    other = model.encode_prompts(['a sign that says "Q3"'])
    assert not torch.allclose(other.pooled, cond.pooled[:1])
    v = model.velocity(torch.randn(2, 3, 32, 32), torch.tensor([0.1, 0.7]), cond)
    assert v.shape == (2, 3, 32, 32)
    saved = json.loads((shapes_dir / "opdkit.json").read_text())
    assert saved["shapes_model"]["num_layers"] == 1


def test_shapes_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        build_shapes_pipeline(tmp_path, SHAPES_WORDS, ShapesModelConfig(resolution=30, patch_size=4))


# -- LoRA ------------------------------------------------------------------------------------------


def test_lora_add_disable_save_load(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    model = load_flow_model(tiny_pixel_dir)
    cond = model.encode_prompts(["a red cube"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model.velocity(x, 0.5, cond)
    model.add_lora("policy", rank=4, alpha=8)
    assert model.lora_names() == ["policy"] and model.active_adapters() == ["policy"]
    trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, 0.5, cond), base)  # B starts at zero
        for p in model.lora_parameters("policy"):
            p.add_(0.1 * torch.randn_like(p))
        tuned = model.velocity(x, 0.5, cond)
        assert not torch.allclose(tuned, base)
        with model.adapters_disabled():
            torch.testing.assert_close(model.velocity(x, 0.5, cond), base)
        torch.testing.assert_close(model.velocity(x, 0.5, cond), tuned)
    assert all(p.requires_grad for p in model.lora_parameters("policy"))

    path = model.save_lora("policy", tmp_path / "policy.safetensors")
    fresh = load_flow_model(tiny_pixel_dir)
    assert fresh.load_lora(path, name="teacher") == "teacher"
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, 0.5, cond), tuned)
    with pytest.raises(OpdkitError, match="no LoRA adapter"):
        model.save_lora("missing", tmp_path / "x.safetensors")

    # Two adapters: switching selects which one runs.
    model.add_lora("other", rank=2, alpha=2)
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, 0.5, cond), base)  # "other" is fresh
        model.set_adapter("policy")
        torch.testing.assert_close(model.velocity(x, 0.5, cond), tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no peft warning about deleting the active adapter
        model.merge_lora("policy")
    assert model.lora_names() == ["other"] and model.active_adapters() == ["other"]
    with torch.no_grad():  # policy is now in the base weights, and "other" (B = 0) adds nothing
        torch.testing.assert_close(model.velocity(x, 0.5, cond), tuned)


def test_lora_on_a_bf16_base_trains_in_fp32(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    """A bf16 base (the memory-saving set-up for SD3.5-M) keeps its LoRA weights in fp32.

    peft would create them in bf16, where an AdamW step below 1/256 of a weight rounds away.
    """
    model = load_flow_model(tiny_pixel_dir, dtype=torch.bfloat16)
    model.add_lora("policy", rank=4, alpha=8)
    params = model.lora_parameters("policy")
    assert params and {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for n, p in model.transformer.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    cond = model.encode_prompts(["a red cube"]).expand(2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in params:  # weights of size ~0.1, where bf16's spacing is ~5e-4
            p.add_(0.1 * torch.randn_like(p))
    with torch.enable_grad():
        model.velocity(x, 0.5, cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    # (the last block's context queries get no gradient: SD3 drops its context output)
    learning = [p for p in params if p.grad is not None and bool(p.grad.abs().max() > 0)]
    assert len(learning) >= len(params) - 2
    before = [p.detach().clone() for p in learning]
    torch.optim.AdamW(learning, lr=1e-5, weight_decay=0.0).step()  # |update| ~ 1e-5
    assert all(not torch.equal(p, b) for p, b in zip(learning, before, strict=True))
    with torch.no_grad():
        tuned = model.velocity(x, 0.5, cond)
    path = model.save_lora("policy", tmp_path / "policy.safetensors")
    fresh = load_flow_model(tiny_pixel_dir, dtype=torch.bfloat16)
    fresh.load_lora(path, name="teacher")
    assert {p.dtype for p in fresh.lora_parameters("teacher")} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, 0.5, cond), tuned)
        fresh.merge_lora("teacher")  # folded into the bf16 base: equal up to bf16 rounding
        merged = fresh.velocity(x, 0.5, cond)
    assert fresh.lora_names() == [] and next(fresh.transformer.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(merged, tuned, atol=0.05, rtol=0.05)


def test_text_encoders_in_their_own_dtype(tiny_dir: Path, tiny: FlowModel) -> None:
    """``text_dtype: bf16`` next to an fp32 transformer: bf16 encoders, fp32 embeddings."""
    from opdkit.registry import models

    model = models.build("sd3", {"path": str(tiny_dir), "text_dtype": "bf16"})
    assert len(model.text_encoders) == 3
    assert {p.dtype for e in model.text_encoders for p in e.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.float32
    cond = model.encode_prompts(["a red circle left of a blue square"])
    reference = tiny.encode_prompts(["a red circle left of a blue square"])
    assert cond.prompt_embeds.dtype == torch.float32 and cond.pooled.dtype == torch.float32
    torch.testing.assert_close(cond.prompt_embeds, reference.prompt_embeds, atol=0.05, rtol=0.05)
    assert not torch.equal(cond.prompt_embeds, reference.prompt_embeds)  # bf16 really ran


def test_lora_refuses_another_base(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    """A LoRA delta only means something on the base it was trained on: loading it elsewhere fails."""
    model = load_flow_model(tiny_pixel_dir)
    fingerprint = model.base_fingerprint()
    model.add_lora("policy", rank=4, alpha=8)
    assert model.base_fingerprint() == fingerprint  # adapters are not part of the base
    path = model.save_lora("policy", tmp_path / "policy.safetensors")

    same = load_flow_model(tiny_pixel_dir, dtype=torch.bfloat16)  # same weights, other dtype: accepted
    assert same.base_fingerprint() == fingerprint
    same.load_lora(path, name="teacher")

    other = load_flow_model(tiny_pixel_dir)
    with torch.no_grad():
        next(other.transformer.parameters()).add_(1e-2)
    other._base_fingerprint = None  # weights edited behind the model's back in this test only
    with pytest.raises(OpdkitError, match="trained on another base model"):
        other.load_lora(path, name="teacher")



def test_lora_of_another_shape_is_refused_in_one_line(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    """A LoRA file whose factors do not fit the layers (another model's, or another rank than the
    adapter it is loaded into) is refused naming the file, the first tensor and both shapes, not
    by peft's many-line RuntimeError, and leaves no half-made adapter behind."""
    from opdkit.models.lora import read_lora, write_lora

    model = load_flow_model(tiny_pixel_dir)
    model.add_lora("policy", rank=4, alpha=8)
    path = model.save_lora("policy", tmp_path / "policy.safetensors")
    lora = read_lora(path)
    module, (a, b) = sorted(lora.factors.items())[0]
    lora.factors[module] = (torch.cat([a, a[:, :1]], dim=1), b)  # one input column too many
    wide = write_lora(lora, tmp_path / "wide.safetensors")
    fresh = load_flow_model(tiny_pixel_dir)
    wanted = rf"LoRA file '.*wide\.safetensors': {module}\.lora_A\.weight has shape \(4, {a.shape[1] + 1}\), this transformer expects \(4, {a.shape[1]}\)$"
    with pytest.raises(OpdkitError, match=wanted):
        fresh.load_lora(wide, name="teacher")
    assert fresh.lora_names() == []
    fresh.add_lora("teacher", rank=2, alpha=4)  # an existing adapter of another rank
    with pytest.raises(OpdkitError, match=r"LoRA file '.*policy\.safetensors': .*lora_A\.weight has shape \(4, \d+\), adapter 'teacher' expects \(2, \d+\)$"):
        fresh.load_lora(path, name="teacher")
    fresh.load_lora(path, name="other")  # the same file as a new adapter fits


def test_lora_with_a_fractional_alpha_keeps_its_exact_scale(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    """A file's alpha 6.5 (a foreign tool's) scales B @ A by 6.5 / r, not int(6.5) / r: it draws
    what the same delta written with alpha 13 and B halved draws. Loading into an existing adapter
    of another alpha is refused (that adapter would keep its own scale)."""
    from opdkit.models.lora import LoraFile, read_lora, write_lora

    model = load_flow_model(tiny_pixel_dir)
    model.add_lora("policy", rank=4, alpha=8)
    with torch.no_grad():
        for p in model.lora_parameters("policy"):
            p.add_(0.1 * torch.randn_like(p))
    lora = read_lora(model.save_lora("policy", tmp_path / "policy.safetensors"))
    fractional = write_lora(LoraFile(lora.factors, 4, 6.5, lora.target_modules, 0.0, lora.base_fingerprint), tmp_path / "f.safetensors")
    halved = {m: (a, b / 2) for m, (a, b) in lora.factors.items()}
    whole = write_lora(LoraFile(halved, 4, 13, lora.target_modules, 0.0, lora.base_fingerprint), tmp_path / "w.safetensors")
    cond = model.encode_prompts(["a red cube"])
    x = torch.randn(1, 3, 32, 32)
    drawn = []
    for path in (fractional, whole):
        fresh = load_flow_model(tiny_pixel_dir)
        fresh.load_lora(path, name="teacher")
        with torch.no_grad():
            drawn.append(fresh.velocity(x, 0.5, cond))
    torch.testing.assert_close(drawn[0], drawn[1])
    with pytest.raises(OpdkitError, match=r"f\.safetensors' has alpha 6\.5, but adapter 'teacher' has alpha 13; load it under a new name$"):
        fresh.load_lora(fractional, name="teacher")


def test_weights_fingerprint_sees_what_the_rounded_one_cannot(tiny_pixel_dir: Path) -> None:
    """The fingerprint results record (``weights_fingerprint``) tells apart weights a bf16 step
    cannot, an attached adapter, and a bf16 copy (which draws other images); reloading the same
    files gives the same one."""
    model = load_flow_model(tiny_pixel_dir)
    base, exact = model.base_fingerprint(), model.weights_fingerprint()
    assert load_flow_model(tiny_pixel_dir).weights_fingerprint() == exact

    nudged = load_flow_model(tiny_pixel_dir)
    with torch.no_grad():
        first = next(nudged.transformer.parameters())
        first.view(-1)[0] *= 1 + 1e-5  # far below a bf16 step (2**-8)
    assert nudged.base_fingerprint() == base and nudged.weights_fingerprint() != exact

    assert load_flow_model(tiny_pixel_dir, dtype=torch.bfloat16).weights_fingerprint() != exact
    model.add_lora("policy", rank=4, alpha=8)
    assert model.base_fingerprint() == base and model.weights_fingerprint() != exact

# -- registry ----------------------------------------------------------------------------------------


def test_sd3_registered_builder(tiny_pixel_dir: Path) -> None:
    from opdkit.registry import models

    model = models.build("sd3", {"path": str(tiny_pixel_dir), "dtype": "float32", "device": "cpu"})
    assert isinstance(model, FlowModel) and model.world == "sd3"


def test_models_package_import_is_light() -> None:
    code = "import sys, opdkit.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
