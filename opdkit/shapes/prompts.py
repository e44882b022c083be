"""Prompt records of the shapes world, in GenEval's metadata schema, plus the shipped splits and
the validation fold (over 500 lines: records, splits and fold all derive from one enumeration,
:func:`enumerate_prompts`, and one composition key).

A record is a plain dict, exactly like a line of GenEval's ``evaluation_metadata.jsonl``::

    {"tag": "counting", "include": [{"class": "circle", "count": 3}],
     "exclude": [{"class": "circle", "count": 4}], "prompt": "a photo of three circles"}
    {"tag": "position", "include": [{"class": "square", "count": 1},
     {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a circle left of a square"}

plus the OCR tag: ``{"tag": "ocr", "prompt": "a sign that says \\"K7\\"", "text": "K7"}``.

Templates follow GenEval's (``a photo of a/an ...``, number words two-four, reference object
first in position metadata, two different classes and two different colours in
``color_attr``). The test split uses GenEval's ``a photo of`` phrasing only; the train split
also words its compositions in the other :data:`TRAIN_TEMPLATES` phrasings, so a tag has many
more train prompts than compositions.

Splits are disjoint by composition (the record without its prompt, e.g. "three triangles"),
except ``single_object``, whose eight compositions are all tested (one per shape, as GenEval has
one per class) and trained only in the ten phrasings the test never uses. Every part of a test
prompt (shape, colour, count, relation) appears in the train prompts of its tag: objects seen,
compositions new, as in GenEval, so scores on the test split measure compositional
generalisation.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from opdkit.shapes.vocab import ALPHABET, COLOR_NAMES, MAX_TEXT_LEN, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES

Record = dict[str, Any]

GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
ALL_TAGS: tuple[str, ...] = (*GENEVAL_TAGS, "ocr")
"""The six GenEval tags followed by ``ocr``."""

SPLIT_SEED: int = 20261125
"""Seed of the shipped splits; :func:`make_splits` with its defaults regenerates them."""
N_TEST_PER_TAG: int = 50
TEST_FRACTION: float = 0.5
MAX_TRAIN_PER_TAG: int = 2000
SPLITS: tuple[str, ...] = ("train", "test")

TEST_TEMPLATE: str = "a photo of {}"
"""GenEval's phrasing: every test prompt, and what the record builders write by default."""
TRAIN_TEMPLATES: tuple[str, ...] = (
    TEST_TEMPLATE, "an image of {}", "a picture of {}", "a drawing of {}", "a render of {}",
    "an illustration of {}", "a sketch of {}", "a scene with {}", "a painting of {}", "a view of {}", "{}",
)
"""Phrasings of the train split (GenEval's first): a teacher trained on one sentence frame learns
the frame; several make it learn the words that vary."""


# ------------------------------------------------------------------------------------------
# Record builders (one per tag)
# ------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    """English indefinite article for ``word`` ("an orange", "an hourglass"), as GenEval's prompts use."""
    return "an" if word[:1] in "aeiou" or word.startswith("hour") else "a"


def single_object(shape: str, template: str = TEST_TEMPLATE) -> Record:
    """``a photo of a circle`` (``template`` words the object phrase, e.g. ``"a sketch of {}"``)."""
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}],
            "prompt": template.format(f"{_a(shape)} {shape}")}


def two_object(first: str, second: str, template: str = TEST_TEMPLATE) -> Record:
    """``a photo of a circle and a square`` (two different shapes)."""
    return {"tag": "two_object", "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
            "prompt": template.format(f"{_a(first)} {first} and {_a(second)} {second}")}


def counting(shape: str, count: int, template: str = TEST_TEMPLATE) -> Record:
    """``a photo of three circles``; exclude names ``count + 1`` as GenEval does."""
    return {"tag": "counting", "include": [{"class": shape, "count": count}],
            "exclude": [{"class": shape, "count": count + 1}],
            "prompt": template.format(f"{NUMBER_WORDS[count]} {PLURALS[shape]}")}


def colors(color: str, shape: str, template: str = TEST_TEMPLATE) -> Record:
    """``a photo of a red circle``."""
    return {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": template.format(f"{_a(color)} {color} {shape}")}


def position(shape: str, relation: str, reference: str, template: str = TEST_TEMPLATE) -> Record:
    """``a photo of a circle left of a square``: the reference object is include[0] (GenEval)."""
    return {"tag": "position",
            "include": [{"class": reference, "count": 1},
                        {"class": shape, "count": 1, "position": [relation, 0]}],
            "prompt": template.format(f"{_a(shape)} {shape} {relation} {_a(reference)} {reference}")}


def color_attr(color_a: str, shape_a: str, color_b: str, shape_b: str, template: str = TEST_TEMPLATE) -> Record:
    """``a photo of a red circle and a blue square`` (different shapes, different colours)."""
    return {"tag": "color_attr",
            "include": [{"class": shape_a, "count": 1, "color": color_a},
                        {"class": shape_b, "count": 1, "color": color_b}],
            "prompt": template.format(f"{_a(color_a)} {color_a} {shape_a} and {_a(color_b)} {color_b} {shape_b}")}


def rephrase(record: Record, template: str) -> Record:
    """The same composition worded by ``template`` (a :data:`TRAIN_TEMPLATES` entry); OCR records
    keep their one phrasing."""
    if record["tag"] == "ocr":
        return dict(record)
    prefix, suffix = TEST_TEMPLATE.split("{}")
    phrase = record["prompt"][len(prefix) : len(record["prompt"]) - len(suffix)]
    return {**record, "prompt": template.format(phrase)}


def composition(record: Record) -> str:
    """What a prompt asks for, without its wording: the key splits are disjoint by."""
    return json.dumps({k: v for k, v in record.items() if k != "prompt"}, sort_keys=True)


def parts(record: Record) -> set[tuple[str, object]]:
    """The parts of a record: ``("shape", s)``, ``("color", c)``, ``("count", n)``,
    ``("relation", r)`` (``("glyph", g)`` for OCR)."""
    if record["tag"] == "ocr":
        return {("glyph", g) for g in record["text"]}
    out: set[tuple[str, object]] = set()
    for clause in record["include"]:
        out.add(("shape", clause["class"]))
        if clause["count"] > 1:
            out.add(("count", clause["count"]))
        if "color" in clause:
            out.add(("color", clause["color"]))
        if "position" in clause:
            out.add(("relation", clause["position"][0]))
    return out


def ocr(text: str) -> Record:
    """``a sign that says "K7"`` with the target under ``text``."""
    bad = sorted(set(text) - set(ALPHABET))
    if not text or bad or len(text) > MAX_TEXT_LEN:
        raise ValueError(f"OCR text must be 1-{MAX_TEXT_LEN} glyphs of {ALPHABET!r}, got {text!r}")
    return {"tag": "ocr", "prompt": f'a sign that says "{text}"', "text": text}


# ------------------------------------------------------------------------------------------
# Enumeration and sampling
# ------------------------------------------------------------------------------------------


def _pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    """Ordered pairs of different items."""
    return [(a, b) for a, b in itertools.product(items, items) if a != b]


def enumerate_prompts(tag: str) -> list[Record]:
    """Every distinct record of ``tag``, in a fixed order (``ocr``: all 1-4 glyph strings)."""
    if tag == "single_object":
        return [single_object(s) for s in SHAPES]
    if tag == "two_object":
        return [two_object(a, b) for a, b in _pairs(SHAPES)]
    if tag == "counting":
        return [counting(s, n) for s in SHAPES for n in NUMBER_WORDS]
    if tag == "colors":
        return [colors(c, s) for s in SHAPES for c in COLOR_NAMES]
    if tag == "position":
        return [position(a, r, b) for a, b in _pairs(SHAPES) for r in RELATIONS]
    if tag == "color_attr":
        return [color_attr(ca, a, cb, b) for a, b in _pairs(SHAPES) for ca, cb in _pairs(COLOR_NAMES)]
    if tag == "ocr":
        return [ocr("".join(chars)) for n in range(1, MAX_TEXT_LEN + 1)
                for chars in itertools.product(ALPHABET, repeat=n)]
    raise ValueError(f"unknown shapes tag {tag!r}; expected one of {list(ALL_TAGS)}")


def count_prompts(tag: str) -> int:
    """Number of distinct prompts of ``tag`` (4 single_object ... 22,620 ocr)."""
    if tag == "ocr":
        return sum(len(ALPHABET) ** n for n in range(1, MAX_TEXT_LEN + 1))
    return len(enumerate_prompts(tag))


def sample_record(tag: str, rng: np.random.Generator) -> Record:
    """One random record of ``tag`` (with replacement; e.g. for a pretraining data stream).

    GenEval tags are uniform over their distinct prompts; ``ocr`` draws the length uniformly
    from 1-4 first, so short texts are not drowned by the 20,736 four-glyph strings.
    """
    if tag == "ocr":
        n = int(rng.integers(1, MAX_TEXT_LEN + 1))
        return ocr("".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=n)))
    pool = _pool(tag)
    return json.loads(pool[int(rng.integers(len(pool)))])


def sample_records(n: int, rng: np.random.Generator, tags: Sequence[str] = ALL_TAGS) -> list[Record]:
    """``n`` random records, each of a tag drawn uniformly from ``tags`` (with replacement)."""
    picks = rng.integers(0, len(tags), size=n)
    return [sample_record(tags[int(i)], rng) for i in picks]


@cache
def _pool(tag: str) -> tuple[str, ...]:
    """JSON lines of every record of a GenEval tag (cached: sampling parses a fresh copy)."""
    return tuple(json.dumps(r) for r in enumerate_prompts(tag))


def _strata(tag: str, records: list[Record]) -> list[list[Record]]:
    """Groups sampled in equal shares: OCR by text length, other tags as one group."""
    if tag != "ocr":
        return [records]
    return [[r for r in records if len(r["text"]) == n] for n in range(1, MAX_TEXT_LEN + 1)]


def _tag_rng(seed: int, tag: str) -> np.random.Generator:
    """Independent stream per tag, so selecting a subset of tags leaves each tag's draw unchanged."""
    return np.random.default_rng([seed, ALL_TAGS.index(tag)])


def _check_tags(tags: Iterable[str]) -> list[str]:
    tags = list(tags)
    unknown = [t for t in tags if t not in ALL_TAGS]
    if unknown:
        raise ValueError(f"unknown shapes tags {unknown}; expected a subset of {list(ALL_TAGS)}")
    return tags


def generate_prompts(n_per_tag: int, seed: int, tags: Sequence[str] = ALL_TAGS,
                     unique: bool = True) -> list[Record]:
    """``n_per_tag`` random records per tag, grouped by tag in ``tags`` order.

    Args:
        n_per_tag: records wanted per tag.
        seed: seed of the ``numpy.random.Generator`` (one independent stream per tag).
        tags: subset of :data:`ALL_TAGS`.
        unique: distinct prompts within a tag (sampling without replacement). A tag with fewer
            than ``n_per_tag`` distinct prompts then contributes all of them, shuffled (for
            example ``single_object`` has only 4). With ``unique=False`` prompts are drawn
            with replacement (:func:`sample_record`) and every tag yields exactly ``n_per_tag``.

    Returns:
        A list of new record dicts (GenEval schema; ``ocr`` records carry ``text``).
    """
    out: list[Record] = []
    for tag in _check_tags(tags):
        rng = _tag_rng(seed, tag)
        if not unique:
            out.extend(sample_record(tag, rng) for _ in range(n_per_tag))
            continue
        out.extend(_draw_distinct(tag, n_per_tag, rng))
    return out


def _draw_distinct(tag: str, n: int, rng: np.random.Generator) -> list[Record]:
    """Up to ``n`` distinct records of ``tag``; OCR lengths in equal shares where possible."""
    if tag != "ocr":
        pool = enumerate_prompts(tag)
        return [pool[int(i)] for i in rng.permutation(len(pool))[:n]]
    chosen: dict[str, Record] = {}
    total = count_prompts("ocr")
    while len(chosen) < min(n, total):
        record = sample_record("ocr", rng)
        chosen.setdefault(record["prompt"], record)
    return list(chosen.values())


def make_splits(n_test_per_tag: int = N_TEST_PER_TAG, seed: int = SPLIT_SEED,
                test_fraction: float = TEST_FRACTION, max_train_per_tag: int = MAX_TRAIN_PER_TAG,
                tags: Sequence[str] = ALL_TAGS) -> tuple[list[Record], list[Record]]:
    """Train and test splits, disjoint by composition (GenEval tags) or by text (OCR).

    Per GenEval tag, the compositions are shuffled (seeded) and the test split takes
    ``min(n_test_per_tag, floor(test_fraction * total))`` of them in the ``a photo of`` phrasing;
    the train split takes the other compositions in every :data:`TRAIN_TEMPLATES` phrasing (at
    most ``max_train_per_tag`` prompts, a random subset). The shuffle is redrawn until every
    test prompt's :func:`parts` appear in the tag's train prompts. ``single_object`` is the
    exception: all its compositions are tested, and trained in the phrasings the test never
    uses. OCR draws in equal shares per text length (there are only 12 one-glyph texts but
    20,736 four-glyph ones).

    Returns:
        ``(train, test)`` lists of records, grouped by tag in ``tags`` order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    train: list[Record] = []
    test: list[Record] = []
    for tag in _check_tags(tags):
        rng = _tag_rng(seed, tag)
        if tag == "ocr":
            tag_train, tag_test = _ocr_split(rng, n_test_per_tag, test_fraction, max_train_per_tag)
        elif tag == "single_object":
            tag_test = enumerate_prompts(tag)
            tag_train = [rephrase(r, t) for r in tag_test for t in TRAIN_TEMPLATES if t != TEST_TEMPLATE]
            tag_train = [tag_train[int(i)] for i in rng.permutation(len(tag_train))[:max_train_per_tag]]
        else:
            tag_train, tag_test = _composition_split(tag, rng, n_test_per_tag, test_fraction, max_train_per_tag)
        train.extend(tag_train)
        test.extend(tag_test)
    return train, test


_MAX_REDRAWS = 1000


def _composition_split(tag: str, rng: np.random.Generator, n_test: int, test_fraction: float,
                       max_train: int) -> tuple[list[Record], list[Record]]:
    """One GenEval tag's ``(train, test)``: held-out compositions, train parts covering the test's."""
    pool = enumerate_prompts(tag)
    k = min(n_test, max(1, int(test_fraction * len(pool))))
    for _ in range(_MAX_REDRAWS):
        order = rng.permutation(len(pool))
        test = [pool[int(i)] for i in order[:k]]
        rest = [pool[int(i)] for i in order[k:]]
        worded = [(r, t) for r in rest for t in TRAIN_TEMPLATES]
        pick = rng.permutation(len(worded))[:max_train]
        train = [rephrase(*worded[int(i)]) for i in pick]
        seen = set().union(*(parts(r) for r in train))
        if all(parts(r) <= seen for r in test):
            return train, test
    raise RuntimeError(f"no split of {tag!r} puts every test part in train after {_MAX_REDRAWS} draws")


def _ocr_split(rng: np.random.Generator, n_test: int, test_fraction: float,
               max_train: int) -> tuple[list[Record], list[Record]]:
    """OCR's ``(train, test)``: disjoint texts, equal shares per length where possible."""
    # Strata come smallest first (by length), and each takes an equal share of what is still
    # wanted, so a stratum too small for its share passes the rest on.
    strata = _strata("ocr", enumerate_prompts("ocr"))
    train: list[Record] = []
    test: list[Record] = []
    test_left, train_left = n_test, max_train
    for done, group in enumerate(strata):
        order = rng.permutation(len(group))
        k = min(-(-test_left // (len(strata) - done)), max(1, int(test_fraction * len(group))))
        m = min(-(-train_left // (len(strata) - done)), len(group) - k)
        test.extend(group[int(i)] for i in order[:k])
        train.extend(group[int(i)] for i in order[k : k + m])
        test_left, train_left = test_left - k, train_left - m
    return train, test


# ------------------------------------------------------------------------------------------
# JSONL files and the shipped splits
# ------------------------------------------------------------------------------------------


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8, ``\\n`` line ends, GenEval's key order kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[Record]:
    """Records of a JSONL file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def split_path(split: str) -> Path:
    """Path of a shipped split file inside the package (``opdkit/shapes/data/{split}.jsonl``)."""
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {list(SPLITS)}, got {split!r}")
    return Path(__file__).resolve().parent / "data" / f"{split}.jsonl"


@cache
def _split_lines(split: str) -> tuple[str, ...]:
    return tuple(line for line in split_path(split).read_text(encoding="utf-8").splitlines() if line.strip())


def load_split(split: str) -> list[Record]:
    """The shipped ``"train"`` or ``"test"`` split, or ``"train-minus-fold"`` (the train split
    without the compositions of :func:`validation_fold`): fresh record dicts on every call."""
    if split == TRAIN_MINUS_FOLD:
        held = _fold_compositions()
        return [r for r in load_split("train") if composition(r) not in held]
    return [json.loads(line) for line in _split_lines(split)]


# ------------------------------------------------------------------------------------------
# The validation fold: train compositions held out from RL
# ------------------------------------------------------------------------------------------

TRAIN_MINUS_FOLD: str = "train-minus-fold"
"""The train split without the validation fold: what a run trains on when its settings are to be
scored on the fold (``prompts.split: train-minus-fold``)."""
FOLD_SEED: int = 20261206
FOLD_FRACTION: float = 0.25
FOLD_SINGLE_OBJECT_TEMPLATE: str = TRAIN_TEMPLATES[1]


def validation_fold(tags: Sequence[str] = ALL_TAGS) -> list[Record]:
    """A validation fold cut from the train split: per tag, a quarter of its train compositions
    (at most :data:`N_TEST_PER_TAG`), one record each in the test phrasing (``single_object``:
    ``an image of``, so that no fold prompt is a test prompt), grouped by tag.

    Why: the shipped splits use every composition of most GenEval tags, so no composition is
    left that no model has seen. The fold is the next best thing for choosing post-training
    settings: a run trained on ``train-minus-fold`` never sees the fold's compositions, so its
    score on them (``opdkit eval -p split=fold``) measures how its gain carries over to new
    compositions, as the test split does, rather than how well it fits its train prompts. The
    base model was pretrained on the whole train split, fold included; the test split stays
    unread.

    The draw is seeded (:data:`FOLD_SEED`) and redrawn until every fold record's :func:`parts`
    remain in its tag's train-minus-fold prompts. ``single_object`` is the exception: its
    composition is its one part (the shape), so its two held-out shapes remain in the other
    tags' prompts only.
    """
    out: list[Record] = []
    by_tag: dict[str, list[Record]] = {}
    for r in load_split("train"):
        by_tag.setdefault(r["tag"], []).append(r)
    for tag in _check_tags(tags):
        out.extend(_fold_of_tag(tag, by_tag.get(tag, [])))
    return out


def _fold_of_tag(tag: str, train: list[Record]) -> list[Record]:
    """One tag's fold (see :func:`validation_fold`), in the order of the tag's train records."""
    phrased: dict[str, Record] = {}
    for r in train if tag == "ocr" else enumerate_prompts(tag):  # OCR has one phrasing
        # single_object's test prompts are its compositions in the test phrasing: the fold words
        # its shapes in a train phrasing so that it never repeats a test prompt
        phrased.setdefault(composition(r), rephrase(r, FOLD_SINGLE_OBJECT_TEMPLATE) if tag == "single_object" else r)
    keys = list(dict.fromkeys(composition(r) for r in train))
    if not keys:
        return []
    k = min(N_TEST_PER_TAG, max(1, round(FOLD_FRACTION * len(keys))))
    rng = _tag_rng(FOLD_SEED, tag)
    for _ in range(_MAX_REDRAWS):
        held = {keys[int(i)] for i in rng.permutation(len(keys))[:k]}
        rest = [r for r in train if composition(r) not in held]
        seen = set().union(*(parts(r) for r in rest))
        fold = [r for r in train if composition(r) in held]
        if tag == "single_object" or all(parts(r) <= seen for r in fold):
            break
    else:
        raise RuntimeError(f"no fold of {tag!r} leaves every part in train after {_MAX_REDRAWS} draws")
    return [dict(phrased[key]) for key in keys if key in held]


@cache
def _fold_compositions() -> frozenset[str]:
    return frozenset(composition(r) for r in validation_fold())


def write_shipped_splits(directory: str | Path | None = None) -> dict[str, Path]:
    """Regenerate the shipped split files from :func:`make_splits` defaults; returns their paths."""
    train, test = make_splits()
    base = Path(directory) if directory is not None else split_path("train").parent
    paths = {"train": base / "train.jsonl", "test": base / "test.jsonl"}
    write_jsonl(train, paths["train"])
    write_jsonl(test, paths["test"])
    return paths


__all__ = [
    "ALL_TAGS",
    "GENEVAL_TAGS",
    "SPLIT_SEED",
    "TEST_TEMPLATE",
    "TRAIN_MINUS_FOLD",
    "TRAIN_TEMPLATES",
    "Record",
    "color_attr",
    "colors",
    "composition",
    "count_prompts",
    "counting",
    "enumerate_prompts",
    "generate_prompts",
    "load_split",
    "make_splits",
    "ocr",
    "parts",
    "position",
    "read_jsonl",
    "rephrase",
    "sample_record",
    "sample_records",
    "single_object",
    "split_path",
    "two_object",
    "validation_fold",
    "write_jsonl",
    "write_shipped_splits",
]

if __name__ == "__main__":  # python -m opdkit.shapes.prompts: rewrite the shipped splits
    for name, p in write_shipped_splits().items():
        print(f"{name}: {len(read_jsonl(p))} records -> {p}")
