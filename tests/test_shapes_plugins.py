"""The shapes-world reward and benchmark plug-ins, built through the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opdkit.registry import benchmarks, rewards
from opdkit.shapes.prompts import load_split
from opdkit.shapes.render import render_batch


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def test_records() -> list[dict]:
    records = load_split("test")
    by_tag: dict[str, list[dict]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
    return [r for rs in by_tag.values() for r in rs[:3]]


def test_rewards_are_perfect_on_ground_truth_and_low_on_blank(test_records: list[dict]) -> None:
    geneval = [r for r in test_records if r["tag"] != "ocr"]
    signs = [r for r in test_records if r["tag"] == "ocr"]
    clean = as_tensor(render_batch(geneval, seed=1))
    out = rewards.build("shapes_geneval")(clean, [r["prompt"] for r in geneval], geneval)
    assert set(out) == {"score", "partial", "strict"}
    assert out["score"].shape == (len(geneval),)
    assert torch.all(out["strict"] == 1.0) and torch.all(out["partial"] == 1.0)
    strict = rewards.build("shapes_geneval", {"strict": True})(clean, [r["prompt"] for r in geneval], geneval)
    assert torch.equal(strict["score"], strict["strict"])

    ocr = rewards.build("shapes_ocr")
    assert torch.all(ocr(as_tensor(render_batch(signs, seed=2)), [r["prompt"] for r in signs], signs)["score"] == 1.0)
    blank = torch.zeros(len(signs), 3, 32, 32)
    assert torch.all(ocr(blank, [r["prompt"] for r in signs], signs)["score"] == 0.0)
    assert torch.all(rewards.build("shapes_geneval")(torch.zeros(len(geneval), 3, 32, 32), [], geneval)["strict"] == 0.0)


def test_quality_reward_prefers_clean_images(test_records: list[dict]) -> None:
    clean = as_tensor(render_batch(test_records, seed=3))
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    quality = rewards.build("shapes_quality")
    q_clean = quality(clean, [], test_records)["score"]
    q_noisy = quality(noisy, [], test_records)["score"]
    assert q_clean.min() >= 0.9 and torch.all(q_noisy < q_clean) and q_noisy.max() <= 1.0


@pytest.mark.parametrize(("name", "tags"), [("shapes-geneval", 6), ("shapes-ocr", 1), ("shapes-quality", 7)])
def test_benchmarks_score_ground_truth_perfectly(name: str, tags: int) -> None:
    bench = benchmarks.build(name)
    assert bench.world == "shapes" and bench.samples_per_prompt == 4
    assert len({r["tag"] for r in bench.prompts}) == tags
    records = bench.prompts[:: max(1, len(bench.prompts) // 24)]
    scores = bench.score(as_tensor(render_batch(records, seed=4)), [r["prompt"] for r in records], records)
    rows = [{**r, "score": float(s)} for r, s in zip(records, scores["score"], strict=True)]
    metrics = bench.summarize(rows)
    assert metrics["overall"] >= (0.9 if name == "shapes-quality" else 1.0)


@pytest.mark.parametrize("name", ["shapes-geneval", "shapes-ocr", "shapes-quality"])
def test_validation_split_mirrors_test_counts_without_test_prompts(name: str) -> None:
    from collections import Counter

    from opdkit.errors import OpdkitError

    test, val = benchmarks.build(name), benchmarks.build(name, {"split": "train"})
    assert Counter(r["tag"] for r in val.prompts) == Counter(r["tag"] for r in test.prompts)
    assert not {r["prompt"] for r in val.prompts} & {r["prompt"] for r in test.prompts}
    train = {r["prompt"] for r in load_split("train")}
    assert {r["prompt"] for r in val.prompts} <= train
    assert [r["prompt"] for r in benchmarks.build(name, {"split": "train"}).prompts] == [r["prompt"] for r in val.prompts]
    assert "shapes-train" in val.protocol and "shapes-test" in test.protocol
    with pytest.raises(OpdkitError, match=r"split='val' is not one of 'test', 'train', "):
        benchmarks.build(name, {"split": "val"})


def test_validation_fold_is_cut_from_train_and_left_out_of_train_minus_fold() -> None:
    """The fold: a quarter of each tag's train compositions, none in train-minus-fold, no prompt
    of the test split, every part still trained (single_object: in the other tags); the recipe's
    ``prompts.split: train-minus-fold`` loads train without it and shapes benchmarks score it."""
    from collections import Counter
    from types import SimpleNamespace

    from opdkit.data.sources import load_prompts
    from opdkit.errors import OpdkitError
    from opdkit.recipe import PromptsSpec
    from opdkit.shapes.prompts import TRAIN_MINUS_FOLD, composition, parts, validation_fold

    fold, train = validation_fold(), load_split("train")
    rest = load_prompts(PromptsSpec(dataset="shapes", split=TRAIN_MINUS_FOLD))
    held = {composition(r) for r in fold}
    assert len(held) == len(fold)
    assert held <= {composition(r) for r in train}
    assert not held & {composition(r) for r in rest}
    assert len(rest) == sum(composition(r) not in held for r in train) < len(train)
    assert not {r["prompt"] for r in fold} & {r["prompt"] for r in load_split("test")}
    for tag, n in Counter(r["tag"] for r in fold).items():
        n_train = len({composition(r) for r in train if r["tag"] == tag})
        assert n == min(50, max(1, round(0.25 * n_train))), tag
        pool = [r for r in rest if tag == "single_object" or r["tag"] == tag]
        trained = set().union(*(parts(r) for r in pool))
        assert all(parts(r) <= trained for r in fold if r["tag"] == tag), tag
    assert set(Counter(r["tag"] for r in fold)) == {r["tag"] for r in train}
    assert [r["prompt"] for r in validation_fold()] == [r["prompt"] for r in fold]
    bench = benchmarks.build("shapes-geneval", {"split": "fold"})
    assert [r["prompt"] for r in bench.prompts] == [r["prompt"] for r in fold if r["tag"] != "ocr"]
    assert "shapes-fold" in bench.protocol
    with pytest.raises(OpdkitError, match="'train-minus-fold' needs the shapes dataset"):
        load_prompts(SimpleNamespace(dataset="drawbench", split=TRAIN_MINUS_FOLD, tags=None, tag=None, limit=None))


def test_heldout_split_holds_only_unseen_compositions() -> None:
    """shapes-ocr's held-out set: the test's count of texts, none in train or test, every glyph of
    them trained, drawn the same way twice; benchmarks over tags without spares refuse it."""
    from opdkit.benchmarks.shapes import _split_records

    from opdkit.errors import OpdkitError
    from opdkit.shapes.prompts import composition, parts

    test, heldout = benchmarks.build("shapes-ocr"), benchmarks.build("shapes-ocr", {"split": "heldout"})
    assert len(heldout.prompts) == len(test.prompts) == len({r["text"] for r in heldout.prompts})
    used = {composition(r) for split in ("train", "test") for r in load_split(split)}
    assert not {composition(r) for r in heldout.prompts} & used
    trained = set().union(*(parts(r) for r in load_split("train") if r["tag"] == "ocr"))
    assert all(parts(r) <= trained for r in heldout.prompts)
    again = benchmarks.build("shapes-ocr", {"split": "heldout"})
    assert [r["prompt"] for r in again.prompts] == [r["prompt"] for r in heldout.prompts]
    assert "shapes-heldout" in heldout.protocol
    for name in ("shapes-geneval", "shapes-quality"):  # their split has no such value: refused by the signature
        with pytest.raises(OpdkitError, match=r"split='heldout' is not one of 'test', 'train', 'fold'"):
            benchmarks.build(name, {"split": "heldout"})
    with pytest.raises(OpdkitError, match=r"too few prompts outside the train and test splits for tags \['single_object'"):
        _split_records("heldout", None)  # what the signature keeps them from asking
