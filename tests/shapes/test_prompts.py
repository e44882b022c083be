"""Prompt generator, GenEval schema conformity and the shipped splits of the shapes world."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from opdkit.shapes import prompts as P
from opdkit.shapes.vocab import ALPHABET, COLOR_NAMES, MAX_TEXT_LEN, SHAPES

# One upstream record per tag, verbatim from GenEval's prompts/evaluation_metadata.jsonl
# (djghosh13/geneval, MIT): our records must have the same keys, key order and value types.
UPSTREAM = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "two_object", "include": [{"class": "toaster", "count": 1}, {"class": "oven", "count": 1}], '
    '"prompt": "a photo of a toaster and an oven"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], '
    '"prompt": "a photo of two clocks"}',
    '{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "orange"}], "prompt": "a photo of an orange cow"}',
    '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, '
    '"position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}',
    '{"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"}, {"class": "microwave", '
    '"count": 1, "color": "purple"}], "prompt": "a photo of a green bus and a purple microwave"}',
]


def _skeleton(value: object) -> object:
    """Keys (in order) and value types of a record, recursively: its schema."""
    if isinstance(value, dict):
        return [(k, _skeleton(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_skeleton(v) for v in value]
    return type(value).__name__


def _template(prompt: str, words: list[str]) -> str:
    """The prompt with the record's class/colour/number words blanked out."""
    for w in sorted(words, key=len, reverse=True):
        prompt = re.sub(rf"\b{re.escape(w)}\b", "X", prompt)
    return re.sub(r"\ban X\b", "a X", prompt)


def _words(record: dict) -> list[str]:
    words = []
    for clause in record["include"]:
        words += [clause["class"], clause["class"] + "s", clause["class"] + "es"]
        if "color" in clause:
            words.append(clause["color"])
        if "position" in clause:
            words.append(clause["position"][0])
    return [*words, "two", "three", "four"]


@pytest.mark.parametrize("upstream", UPSTREAM)
def test_records_follow_geneval_schema_and_templates(upstream: str) -> None:
    ref = json.loads(upstream)
    ours = P.enumerate_prompts(ref["tag"])
    assert ours, ref["tag"]
    for record in ours:
        assert _skeleton(record) == _skeleton(ref)
        assert _template(record["prompt"], _words(record)) == _template(ref["prompt"], _words(ref))


def test_record_contents() -> None:
    assert P.counting("cross", 3) == {
        "tag": "counting", "include": [{"class": "cross", "count": 3}], "exclude": [{"class": "cross", "count": 4}],
        "prompt": "a photo of three crosses"}
    # GenEval puts the reference object first; the described object refers to it.
    assert P.position("circle", "left of", "square") == {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a circle left of a square"}
    assert P.ocr("K7") == {"tag": "ocr", "prompt": 'a sign that says "K7"', "text": "K7"}
    with pytest.raises(ValueError):
        P.ocr("K7!")
    with pytest.raises(ValueError):
        P.ocr("K" * (MAX_TEXT_LEN + 1))


def test_combinatorics() -> None:
    s, c = len(SHAPES), len(COLOR_NAMES)
    expected = {"single_object": s, "two_object": s * (s - 1), "counting": 3 * s, "colors": s * c,
                "position": 4 * s * (s - 1), "color_attr": s * (s - 1) * c * (c - 1),
                "ocr": sum(len(ALPHABET) ** n for n in range(1, MAX_TEXT_LEN + 1))}
    for tag in P.ALL_TAGS:
        records = P.enumerate_prompts(tag)
        assert len(records) == expected[tag] == P.count_prompts(tag)
        assert len({r["prompt"] for r in records}) == len(records)  # prompts are unique keys
    for r in P.enumerate_prompts("color_attr"):  # GenEval: two classes, two colours, all different
        a, b = r["include"]
        assert a["class"] != b["class"] and a["color"] != b["color"]


def test_generate_prompts_is_deterministic_and_distinct() -> None:
    a = P.generate_prompts(20, seed=3)
    assert a == P.generate_prompts(20, seed=3)
    assert a != P.generate_prompts(20, seed=4)
    per_tag = Counter(r["tag"] for r in a)
    assert per_tag == {t: min(20, P.count_prompts(t)) for t in P.ALL_TAGS}
    for tag in P.ALL_TAGS:
        prompts = [r["prompt"] for r in a if r["tag"] == tag]
        assert len(set(prompts)) == len(prompts)
    # A tag's draw does not depend on which other tags are requested.
    assert P.generate_prompts(20, seed=3, tags=["ocr"]) == [r for r in a if r["tag"] == "ocr"]
    loose = P.generate_prompts(30, seed=3, tags=["single_object", "ocr"], unique=False)
    assert Counter(r["tag"] for r in loose) == {"single_object": 30, "ocr": 30}
    with pytest.raises(ValueError, match="unknown"):
        P.generate_prompts(1, seed=0, tags=["nope"])


def test_sample_record_ocr_lengths_are_balanced() -> None:
    rng = np.random.default_rng(0)
    lengths = Counter(len(P.sample_record("ocr", rng)["text"]) for _ in range(400))
    assert set(lengths) == set(range(1, MAX_TEXT_LEN + 1)) and min(lengths.values()) > 60


def test_splits_are_disjoint_by_composition_and_sized() -> None:
    train, test = P.make_splits()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in train}) == len(train) and len({r["prompt"] for r in test}) == len(test)
    test_counts = Counter(r["tag"] for r in test)
    train_counts = Counter(r["tag"] for r in train)
    phrasings = len(P.TRAIN_TEMPLATES)
    for tag in P.ALL_TAGS:
        total = P.count_prompts(tag)
        tag_test = [r for r in test if r["tag"] == tag]
        tag_train = [r for r in train if r["tag"] == tag]
        if tag == "single_object":  # every shape tested once; trained in the other phrasings
            assert test_counts[tag] == total == len(SHAPES)
            assert train_counts[tag] == total * (phrasings - 1)
        elif tag == "ocr":
            assert test_counts[tag] == P.N_TEST_PER_TAG
            assert train_counts[tag] == P.MAX_TRAIN_PER_TAG
        else:
            k = min(P.N_TEST_PER_TAG, total // 2)
            assert test_counts[tag] == k
            assert train_counts[tag] == min(P.MAX_TRAIN_PER_TAG, (total - k) * phrasings)
            # Held-out compositions: no test composition is trained in any phrasing.
            assert not {P.composition(r) for r in tag_train} & {P.composition(r) for r in tag_test}, tag
        assert all(r["prompt"].startswith("a photo of ") for r in tag_test if tag != "ocr")
        # Objects seen, compositions new: every part of a test prompt is trained in its tag.
        seen = set().union(*(P.parts(r) for r in tag_train))
        assert all(P.parts(r) <= seen for r in tag_test), tag
        assert train_counts[tag] >= 10 * test_counts[tag], tag


def test_every_test_tag_has_the_paper_scale_where_its_space_allows() -> None:
    """At least 50 test prompts per tag wherever the tag has 100+ compositions; single_object all 8."""
    test = P.load_split("test")
    counts = Counter(r["tag"] for r in test)
    for tag in P.GENEVAL_TAGS:
        if P.count_prompts(tag) >= 2 * P.N_TEST_PER_TAG:
            assert counts[tag] >= 50, tag
    assert counts["single_object"] == len(SHAPES) >= 8


def test_rephrase_keeps_the_composition() -> None:
    record = P.position("arch", "above", "hourglass")
    assert record["prompt"] == "a photo of an arch above an hourglass"
    sketch = P.rephrase(record, "a sketch of {}")
    assert sketch["prompt"] == "a sketch of an arch above an hourglass"
    assert P.composition(sketch) == P.composition(record) and sketch["include"] == record["include"]
    assert P.rephrase(record, "{}")["prompt"] == "an arch above an hourglass"
    assert P.parts(record) == {("shape", "arch"), ("shape", "hourglass"), ("relation", "above")}


def test_shipped_splits_equal_regeneration(tmp_path: Path) -> None:
    paths = P.write_shipped_splits(tmp_path)
    for split in P.SPLITS:
        assert P.split_path(split).read_bytes() == paths[split].read_bytes(), (
            f"shipped {split} split is stale: run python -m opdkit.shapes.prompts")
    train, test = P.make_splits()
    assert P.load_split("train") == train
    assert P.load_split("test") == test


def test_load_split_returns_fresh_records() -> None:
    first = P.load_split("test")
    first[0]["prompt"] = "mutated"
    assert P.load_split("test")[0]["prompt"] != "mutated"
    with pytest.raises(ValueError, match="split"):
        P.load_split("validation")


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = P.generate_prompts(3, seed=1)
    P.write_jsonl(records, tmp_path / "sub" / "r.jsonl")
    assert P.read_jsonl(tmp_path / "sub" / "r.jsonl") == records
