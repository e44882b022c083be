"""Preference rewards and benchmarks end to end on random-init tiny models of the real classes.

Tiny ``CLIPModel`` / BLIP models with locally built tokenizers are saved (``save_pretrained`` or
through the converters) and loaded back by the plug-ins: preprocessing, batching, scaling and the
shape/range of every result; then ``opdkit eval`` of each benchmark on a tiny random SD3 writes
result files with the fields the leaderboard reads. No network anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from opdkit.errors import OpdkitError
from opdkit.registry import benchmarks, rewards

PROMPTS = [
    "a photo of a red cube",
    "a photo of a blue sphere and a green cone",
    "a sign that says hello world",
    "an orange triangle above a pink circle",
    "a brown square next to a gray star",
]
BERT_WORDS = sorted({w for p in PROMPTS for w in p.split()} | set("abcdefghijklmnopqrstuvwxyz"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))


def random_images(n: int, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every tiny model the plug-ins load, built once: paths and the architectures used."""
    from transformers import BertTokenizer, CLIPConfig, CLIPModel

    from opdkit.models.tokenizers import clip_tokenizer_from_corpus
    from opdkit.scoring.preference.convert import (
        ImageRewardArch,
        OpenClipArch,
        aesthetic_key_shapes,
        convert_hps_checkpoint,
        convert_imagereward_checkpoint,
        imagereward_key_shapes,
        open_clip_key_shapes,
    )
    from opdkit.scoring.preference.images import make_clip_image_processor
    from tests.fixtures.tiny_sd3 import TINY_CORPUS, build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("tiny-preference")
    paths: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # A tiny CLIPModel + CLIP tokenizer + CLIP image processor (32 px) in one directory.
        tok = clip_tokenizer_from_corpus(TINY_CORPUS, 16)
        config = CLIPConfig(
            text_config={
                "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 16, "projection_dim": 16,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            },
            vision_config={
                "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": 32, "patch_size": 8, "projection_dim": 16,
            },
            projection_dim=16,
        )  # fmt: skip
        clip_dir = root / "clip"
        CLIPModel(config).save_pretrained(clip_dir)
        tok.save_pretrained(clip_dir)
        make_clip_image_processor(32).save_pretrained(clip_dir)
        paths["clip"] = clip_dir

        # The Aesthetic head as upstream ships it (a torch state dict), on the tiny CLIP's 16-d embeddings.
        head = {k: torch.randn(s) * 0.3 for k, s in aesthetic_key_shapes(16).items()}
        torch.save(head, root / "aesthetic.pth")
        paths["aesthetic"] = root / "aesthetic.pth"

        # HPS: a tiny open_clip checkpoint, converted like the real one (tokenizer: the tiny CLIP's).
        hps_arch = OpenClipArch(
            embed_dim=16, image_size=32, patch_size=8, vision_width=24, vision_layers=2, vision_heads=2,
            vision_mlp=48, context_length=16, vocab_size=len(tok), text_width=16, text_layers=2, text_heads=2,
            text_mlp=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        hps = {k: torch.randn(s) * 0.2 for k, s in open_clip_key_shapes(hps_arch).items()}
        hps["logit_scale"] = torch.tensor(math.log(100.0))
        torch.save({"state_dict": hps}, root / "HPS_v2.1_tiny.pt")
        paths["hps_pt"] = root / "HPS_v2.1_tiny.pt"

        # ImageReward: a tiny BLIP checkpoint in ImageReward.pt's layout + a local BERT WordPiece tokenizer.
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
        bert = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
        bert.save_pretrained(root / "bert")
        paths["bert"] = root / "bert"
        ir_arch = ImageRewardArch(
            image_size=32, patch_size=16, vision_width=24, vision_layers=2, vision_heads=2, vision_mlp=48,
            vocab_size=len(vocab) + 2, text_width=16, text_layers=2, text_heads=2, text_mlp=32, max_positions=40,
        )  # fmt: skip
        ir = {k: torch.randn(s) * 0.2 for k, s in imagereward_key_shapes(ir_arch).items()}
        torch.save(ir, root / "ImageReward_tiny.pt")
        paths["ir_pt"] = root / "ImageReward_tiny.pt"

        cache = root / "cache"
        import os

        previous = os.environ.get("OPDKIT_CACHE")
        os.environ["OPDKIT_CACHE"] = str(cache)
        try:
            paths["hps"] = convert_hps_checkpoint(paths["hps_pt"], hps_arch)
            paths["imagereward"] = convert_imagereward_checkpoint(paths["ir_pt"], ir_arch)
        finally:
            if previous is None:
                del os.environ["OPDKIT_CACHE"]
            else:
                os.environ["OPDKIT_CACHE"] = previous
        paths["sd3"] = build_tiny_sd3_pipeline(root / "tiny-sd3")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:4]) + "\n")
    paths["prompts"] = prompts_file
    return paths


def reward_params(name: str, tiny: dict[str, Any]) -> dict[str, Any]:
    """Parameters pointing each plug-in at the tiny local models (CPU)."""
    common = {"device": "cpu"}
    return {
        "pickscore": {"model": str(tiny["clip"]), "processor": str(tiny["clip"]), **common},
        "clipscore": {"model": str(tiny["clip"]), **common},
        "aesthetic": {"predictor": str(tiny["aesthetic"]), "clip": str(tiny["clip"]), **common},
        "hpsv2": {"checkpoint": str(tiny["hps"]), "tokenizer": str(tiny["clip"]), **common},
        "imagereward": {"checkpoint": str(tiny["imagereward"]), "tokenizer": str(tiny["bert"]), **common},
    }[name]


RAW_KEY = {"pickscore": "pickscore", "clipscore": "clip_logit", "aesthetic": "aesthetic", "hpsv2": "hps_cosine",
           "imagereward": "imagereward"}  # fmt: skip
SCALE = {"pickscore": 1 / 26, "clipscore": 1 / 100, "aesthetic": 1.0, "hpsv2": 1.0, "imagereward": 1.0}


# ----------------------------------------------------------------------------------------------
# rewards


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward"])
def test_reward_shapes_scale_and_batching(name: str, tiny: dict[str, Any]) -> None:
    images = random_images(5)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]  # a group shares a prompt
    fn = rewards.build(name, reward_params(name, tiny))
    out = fn(images, prompts, [{"prompt": p} for p in prompts])
    score, raw = out["score"], out[RAW_KEY[name]]
    assert score.shape == (5,) and score.dtype == torch.float32 and bool(torch.isfinite(score).all())
    torch.testing.assert_close(score, raw * SCALE[name])
    # batching (and encoding each distinct prompt once) does not change any score
    small = rewards.build(name, {**reward_params(name, tiny), "batch_size": 2})(images, prompts, [{}] * 5)
    torch.testing.assert_close(small["score"], score, atol=1e-5, rtol=1e-5)
    alone = torch.cat([fn(images[i : i + 1], prompts[i : i + 1], [{}])["score"] for i in range(5)])
    torch.testing.assert_close(alone, score, atol=1e-5, rtol=1e-5)
    # identical image and prompt, identical score; a different image, a different score
    assert score[0] != score[1]
    torch.testing.assert_close(fn(images[[0, 0]], [PROMPTS[0]] * 2, [{}] * 2)["score"], score[[0, 0]], atol=1e-5, rtol=1e-5)
    if name in ("pickscore", "clipscore", "hpsv2"):  # similarity models: |cosine| <= 1
        limit = 1.0 if name == "hpsv2" else math.exp(2.6592)  # the tiny CLIP's initial logit scale
        assert bool((raw.abs() <= limit + 1e-5).all())


def test_pickscore_is_logit_scale_times_cosine(tiny: dict[str, Any]) -> None:
    """The reward against a direct CLIPModel computation on the processor's own output."""
    from transformers import AutoTokenizer, CLIPModel

    from opdkit.scoring.preference.images import clip_image_processor_class, to_pil

    images, prompts = random_images(3, 64, 64, seed=5), PROMPTS[:3]
    out = rewards.build("pickscore", reward_params("pickscore", tiny))(images, prompts, [{}] * 3)
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    pixels = clip_image_processor_class().from_pretrained(tiny["clip"])(images=to_pil(images), return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(tiny["clip"])(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        i = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        t = model.text_projection(model.text_model(**tokens).pooler_output)
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(i, t)
    torch.testing.assert_close(out["pickscore"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["score"], expected / 26, atol=1e-6, rtol=1e-5)


def test_imagereward_applies_the_fixed_normalisation(tiny: dict[str, Any]) -> None:
    from opdkit.scoring.preference import IMAGEREWARD_MEAN, IMAGEREWARD_STD
    from opdkit.scoring.preference.scorers import load_imagereward_dir

    model = load_imagereward_dir(tiny["imagereward"]).eval()
    assert (model.mean, model.std) == (IMAGEREWARD_MEAN, IMAGEREWARD_STD)
    images = random_images(2, 32, 32)
    fn = rewards.build("imagereward", reward_params("imagereward", tiny))
    out = fn(images, PROMPTS[:2], [{}, {}])["imagereward"]
    model.mean, model.std = 0.0, 1.0  # the same model without the normalisation
    from opdkit.scoring.preference.images import make_clip_image_processor, pil_pixel_values
    from opdkit.scoring.preference.scorers import imagereward_tokenizer

    tok = imagereward_tokenizer(str(tiny["bert"]))
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(BERT_WORDS) + 5, len(BERT_WORDS) + 6]
    tokens = tok(PROMPTS[:2], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 35)
    with torch.no_grad():
        raw = model(pil_pixel_values(make_clip_image_processor(32), images), tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(out, (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-5, rtol=1e-5)


def test_hpsv2_reward_is_the_raw_cosine_and_accepts_the_checkpoint_dir(tiny: dict[str, Any]) -> None:
    fn = rewards.build("hpsv2", reward_params("hpsv2", tiny))
    out = fn(random_images(3), PROMPTS[:3], [{}] * 3)
    assert bool((out["score"].abs() <= 1.0).all())
    assert "HPSv2.1" in fn.engine  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# preprocessing


def test_pil_path_is_clip_processing_on_8_bit_images() -> None:
    import numpy as np
    from PIL import Image

    from opdkit.scoring.preference.images import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        make_clip_image_processor,
        pil_pixel_values,
    )

    images = random_images(2, 40, 60)
    got = pil_pixel_values(make_clip_image_processor(24), images)
    assert got.shape == (2, 3, 24, 24)
    for b in range(2):
        pixels = (images[b].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        resized = Image.fromarray(pixels).resize((36, 24), Image.BICUBIC)  # shortest edge 24, long int(24 * 60 / 40)
        cropped = np.asarray(resized)[:, 6:30].astype(np.float32) / 255.0
        ref = (torch.from_numpy(cropped).permute(2, 0, 1) - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(
            OPENAI_CLIP_STD
        )[:, None, None]
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-5)


def test_tensor_path_resizes_the_float_tensor_then_crops() -> None:
    from opdkit.scoring.preference.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tensor_pixel_values

    images = random_images(2, 48, 32)  # portrait: the width is the shortest edge
    got = tensor_pixel_values(images, 16)
    assert got.shape == (2, 3, 16, 16)
    x = (images * 255).round() / 255
    x = torch.nn.functional.interpolate(x, size=(24, 16), mode="bicubic", align_corners=False, antialias=True)[:, :, 4:20]
    ref = (x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    torch.testing.assert_close(got, ref)
    square = tensor_pixel_values(random_images(1, 16, 16), 16)  # already the right size: no resampling
    torch.testing.assert_close(square * torch.tensor(OPENAI_CLIP_STD)[:, None, None] + torch.tensor(OPENAI_CLIP_MEAN)[:, None, None],
                               (random_images(1, 16, 16) * 255).round() / 255, atol=1e-6, rtol=0)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# missing weights: one line naming the file and the key


def test_missing_local_weights_name_the_parameter(tiny: dict[str, Any]) -> None:
    with pytest.raises(OpdkitError) as err:
        rewards.build("pickscore", {"model": "/nonexistent/PickScore_v1", "device": "cpu"})
    message = str(err.value)
    assert "\n" not in message
    assert "'/nonexistent/PickScore_v1' does not exist" in message
    assert "`model:`" in message and "--param model=PATH" in message


def test_unreachable_hub_id_says_what_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nand more lines")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(OpdkitError) as err:
        rewards.build("pickscore", {"device": "cpu"})
    message = str(err.value)
    assert "\n" not in message
    assert "hub id 'yuvalkirstain/PickScore_v1'" in message and "`hf download yuvalkirstain/PickScore_v1`" in message
    assert "--param model=PATH" in message


def test_aesthetic_without_predictor_names_the_file_and_url(tiny: dict[str, Any]) -> None:
    with pytest.raises(OpdkitError) as err:
        rewards.build("aesthetic", {"clip": str(tiny["clip"]), "device": "cpu"})
    message = str(err.value)
    assert "\n" not in message
    assert "sac+logos+ava1-l14-linearMSE.pth" in message and "improved-aesthetic-predictor" in message
    assert "`predictor:`" in message


def test_hpsv2_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(OpdkitError, match=r"HPSv2 \(v2\.1\) checkpoint: '.*HPS_v2\.1_compressed\.pt' does not exist \(get it from https://huggingface\.co/xswu/HPSv2\); set `checkpoint:`"):
        rewards.build("hpsv2", {"checkpoint": str(tmp_path / "HPS_v2.1_compressed.pt"), "device": "cpu"})
    with pytest.raises(OpdkitError, match=r"version 'v3': expected one of v2\.0, v2\.1"):
        rewards.build("hpsv2", {"version": "v3", "device": "cpu"})


def test_package_backends_are_optional(tiny: dict[str, Any]) -> None:
    """Without the upstream packages, backend 'package' is one clear line; 'opdkit' needs nothing."""
    import importlib.util

    if importlib.util.find_spec("hpsv2") is None:
        with pytest.raises(OpdkitError, match=r"backend 'package' needs the 'hpsv2' package .*use backend 'opdkit'"):
            rewards.build("hpsv2", {**reward_params("hpsv2", tiny), "checkpoint": str(tiny["hps_pt"]), "backend": "package"})
    with pytest.raises(OpdkitError, match=r"backend 'open_clip': expected one of opdkit, package"):
        rewards.build("hpsv2", {**reward_params("hpsv2", tiny), "backend": "open_clip"})


# ----------------------------------------------------------------------------------------------
# the optional upstream packages agree with our conversions (skipped where they cannot be installed)


@pytest.mark.slow
def test_hpsv2_package_backend_matches_ours(tmp_path: Path) -> None:
    """Real ViT-H-14 architecture with random weights: hpsv2.score vs our conversion (needs the
    hpsv2 package and the LAION ViT-H-14 tokenizer in the local Hugging Face cache)."""
    hpsv2_src = pytest.importorskip("hpsv2.src.open_clip", reason="the hpsv2 package is not installable here")
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", local_files_only=True)
    except OSError:
        pytest.skip("the LAION ViT-H-14 tokenizer is not in the local Hugging Face cache")
    model, _, _ = hpsv2_src.create_model_and_transforms("ViT-H-14", None, precision="fp32", device="cpu", jit=False)
    checkpoint = tmp_path / "HPS_random.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    images, prompts = random_images(2, 64, 64), PROMPTS[:2]
    ours = rewards.build("hpsv2", {"checkpoint": str(checkpoint), "device": "cpu"})(images, prompts, [{}, {}])
    theirs = rewards.build("hpsv2", {"checkpoint": str(checkpoint), "backend": "package", "device": "cpu"})(images, prompts, [{}, {}])
    torch.testing.assert_close(ours["score"], theirs["score"], atol=2e-3, rtol=0)


@pytest.mark.slow
def test_imagereward_package_backend_matches_ours(tmp_path: Path) -> None:
    """Real ImageReward-v1.0 architecture with random weights: ImageReward.score vs our conversion
    (needs the image-reward package, its med_config.json and bert-base-uncased in the local cache)."""
    image_reward = pytest.importorskip("ImageReward", reason="the image-reward package is not installable here")
    med_config = Path(image_reward.__file__).parent / "med_config.json"
    if not med_config.is_file():
        pytest.skip("image-reward's med_config.json is not available offline")
    import importlib

    model = importlib.import_module("ImageReward.ImageReward").ImageReward(med_config=str(med_config), device="cpu")
    checkpoint = tmp_path / "ImageReward_random.pt"
    torch.save(model.state_dict(), checkpoint)
    images, prompts = random_images(2, 64, 64), PROMPTS[:2]
    params = {"checkpoint": str(checkpoint), "device": "cpu", "med_config": str(med_config)}
    ours = rewards.build("imagereward", params)(images, prompts, [{}, {}])
    theirs = rewards.build("imagereward", {**params, "backend": "package"})(images, prompts, [{}, {}])
    torch.testing.assert_close(ours["score"], theirs["score"], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# prompt sets


def test_prompt_sets_read_user_copies_and_the_cache(tmp_path: Path) -> None:
    from opdkit.data.sources import load_prompt_set

    csv_file = tmp_path / "drawbench.csv"
    csv_file.write_text('Prompts,Category\n"A red colored car.",Colors\n"Two cats, one dog.",Counting\n')
    assert load_prompt_set("drawbench", csv_file) == [
        {"prompt": "A red colored car.", "tag": "Colors"},
        {"prompt": "Two cats, one dog.", "tag": "Counting"},
    ]
    hpd = tmp_path / "hpd"
    hpd.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hpd / f"{style}.json").write_text(json.dumps([f"{style} 0", f"{style} 1"]))
    records = load_prompt_set("hpdv2", hpd)
    assert [r["tag"] for r in records] == ["anime"] * 2 + ["concept-art"] * 2 + ["paintings"] * 2 + ["photo"] * 2
    (hpd / "photo.json").unlink()
    with pytest.raises(OpdkitError, match=r"missing photo\.json"):
        load_prompt_set("hpdv2", hpd)

    with pytest.raises(OpdkitError) as err:  # no path, nothing cached: one line naming the source and the cache path
        load_prompt_set("pickscore-test")
    message = str(err.value)
    assert "\n" not in message
    assert "flow_grpo's dataset/pickscore/test.txt" in message and "--param prompts=PATH" in message
    assert "no sha256 is pinned" in message and str(tmp_path / "cache" / "prompts" / "pickscore_test.txt") in message
    cached = tmp_path / "cache" / "prompts" / "pickscore_test.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("one prompt\nanother prompt\n")
    assert [r["prompt"] for r in load_prompt_set("pickscore-test")] == ["one prompt", "another prompt"]


# ----------------------------------------------------------------------------------------------
# benchmarks end to end: opdkit eval on a tiny random SD3


def bench_params(name: str, tiny: dict[str, Any]) -> dict[str, Any]:
    return {**reward_params(name, tiny), "prompts": str(tiny["prompts"]), "prompt_set": "pickscore-test", "resolution": 32}


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward"])
def test_eval_writes_a_preference_result(name: str, tiny: dict[str, Any], tmp_path: Path) -> None:
    from opdkit.eval.runner import run_eval
    from opdkit.rundir import read_jsonl

    summary = run_eval(name, str(tiny["sd3"]), out_dir=tmp_path, limit=4, steps=2, bench_params=bench_params(name, tiny))
    saved = json.loads((tmp_path / "tiny-sd3" / f"{name}.json").read_text())
    assert saved == summary
    assert saved["family"] == "Preference" and saved["higher_is_better"] is True
    assert saved["bench"] == name and saved["world"] == "sd3" and saved["n_images"] == 4
    assert saved["engine"] and saved["protocol"] == f"{name}/pickscore-test/1"
    assert set(saved["metrics"]) == {"overall", "pickscore"} and math.isfinite(saved["metrics"]["overall"])
    rows = read_jsonl(tmp_path / "tiny-sd3" / f"{name}.jsonl")
    assert saved["metrics"]["overall"] == pytest.approx(sum(r["score"] for r in rows) / 4)
    if name == "hpsv2":  # the benchmark reports 100 x cosine and keeps the cosine
        assert all(r["score"] == pytest.approx(100 * r["cosine"], rel=1e-5) for r in rows)


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_a_checkpoint_not_the_default_is_named_in_the_engine(name: str, tiny: dict[str, Any]) -> None:
    """Results of two checkpoints must not share an engine: a rerun with another one is refused."""
    params = bench_params(name, tiny)
    assert benchmarks.build(name, params).engine.endswith(f" from {params['checkpoint']}")


def test_opdkit_eval_cli_and_leaderboard_rows(tiny: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opdkit.cli import app
    from opdkit.eval.leaderboard import load_results

    params = [f"{k}={v}" for k, v in bench_params("pickscore", tiny).items()]
    args = ["eval", "--bench", "pickscore", "--model", str(tiny["sd3"]), "--limit", "4", "--steps", "2", "--out", str(tmp_path)]
    for p in params:
        args += ["--param", p]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    results = load_results(tmp_path)
    assert results["tiny-sd3"]["pickscore"]["family"] == "Preference"
    assert "overall" in results["tiny-sd3"]["pickscore"]["metrics"]
    # the leaderboard shows it as a preference column after GenEval/OCR, with its value
    from opdkit.eval.leaderboard import columns_for, to_markdown

    cols = columns_for(results)
    assert [(c.bench, c.family) for c in cols] == [("pickscore", "Preference")]
    value = results["tiny-sd3"]["pickscore"]["metrics"]["overall"]
    table = to_markdown(results)
    assert "pickscore" in table and f"{value:.3f}" in table


def test_drawbench_summary_has_a_metric_per_category(tiny: dict[str, Any], tmp_path: Path) -> None:
    csv_file = tmp_path / "drawbench.csv"
    csv_file.write_text("Prompts,Category\n" + "".join(f"{p},{c}\n" for p, c in zip(PROMPTS[:4], ["Colors", "Colors", "Text", "Positional"], strict=True)))
    params = {**reward_params("clipscore", tiny), "prompts": str(csv_file), "resolution": 32}
    bench = benchmarks.build("clipscore", params)
    assert bench.samples_per_prompt == 5 and bench.sampler["steps"] == 40 and bench.sampler["cfg"] == 4.5
    rows = [{"tag": t, "score": s} for t, s in [("Colors", 0.1), ("Colors", 0.3), ("Text", 0.5), ("Positional", 0.7)]]
    metrics = bench.summarize(rows)
    assert metrics == pytest.approx({"overall": 0.4, "Colors": 0.2, "Positional": 0.7, "Text": 0.5})
    hps = benchmarks.build("hpsv2", {**reward_params("hpsv2", tiny), "prompts": str(tiny["prompts"]), "prompt_set": "hpdv2"})
    # HPD v2: overall is the mean of the style means (the styles hold 800 prompts each upstream)
    assert hps.summarize(rows) == pytest.approx({"overall": (0.2 + 0.5 + 0.7) / 3, "Colors": 0.2, "Positional": 0.7, "Text": 0.5})
