"""Benchmarks of the shapes world: GenEval's protocol with the exact shapes detector, OCR, quality.

Same rules as the real benchmarks (the GenEval verdicts and the OCR metric live in
:mod:`opdkit.scoring`), on the shapes world's shipped test split, 4 images per prompt; the scorers
are the ``shapes_*`` rewards' (:mod:`opdkit.scoring.shapes`).

``split: train`` (``opdkit eval -p split=train``) scores a validation set instead: as many train
prompts per tag as the test split has (all of the small tags, a seeded sample of the large ones),
so a recipe's settings can be chosen without looking at the test split. Its protocol names the
split, so a leaderboard never ranks it beside test numbers as the same column.

``split: heldout`` scores prompts that neither shipped split holds: compositions (OCR texts) no
model has trained on, so a setting chosen on them is chosen for generalisation, not for a better
fit to the train prompts. Only ``color_attr`` and ``ocr`` have such compositions to spare (the
other tags' spaces are all in train or test), so it serves ``shapes-ocr``; the other benchmarks'
``split`` does not offer it, so a recipe or study that asks them for it fails when it loads.

``split: fold`` scores the validation fold (:func:`opdkit.shapes.prompts.validation_fold`): a
quarter of each tag's train compositions, which a run trained with ``prompts.split:
train-minus-fold`` has never seen. It serves every shapes benchmark; it is how a GenEval setting
is chosen for generalisation (the base was pretrained on the fold, the run was not).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from opdkit.eval.benchmark import Benchmark
from opdkit.registry import benchmarks
from opdkit.scoring.scorer import WithScore
from opdkit.scoring.shapes import score_shapes_geneval, score_shapes_ocr, score_shapes_quality

# Sampler settings of every shapes benchmark: the base model was pretrained at 32 px.
SHAPES_SAMPLER: dict[str, Any] = {"steps": 20, "cfg": 3.0, "resolution": 32, "shift": None}
# 2: objects on the placement grid may touch the border; the majority filter replicates edge pixels.
# 3: the eight-shape world: new prompt splits (disjoint by composition), quality purity scale 20 and
#    detector IoU sharpness 40, so no score of version 2 is comparable to one of version 3.
PROTOCOL_VERSION = "3"


# seeds the sample of the large train tags (color_attr, ocr) in the validation set
VALIDATION_SEED = 0
# seeds the sample of the held-out prompts (its own stream: the train-drawn set stays as it was)
HELDOUT_SEED = 1
# a Literal, so that a misspelt split in a recipe's or study's eval params fails when it loads
BenchSplit = Literal["test", "train", "heldout", "fold"]
BENCH_SPLITS: tuple[str, ...] = get_args(BenchSplit)
# the splits of a benchmark over tags whose compositions are all in train or test: no held-out set
CoveredSplit = Literal["test", "train", "fold"]


def _split_records(split: str, tags: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """Records of the benchmark: the test split, (``"train"``) the validation set drawn from the
    train split, or (``"heldout"``) prompts of neither split, the last two with the test split's
    count per tag (per text length for OCR), or (``"fold"``) the validation fold; in all, only
    ``tags`` (None: all)."""
    from collections import Counter

    import numpy as np

    from opdkit.errors import OpdkitError
    from opdkit.shapes.prompts import load_split

    if split not in BENCH_SPLITS:
        raise OpdkitError(f"shapes benchmarks: param split must be one of {list(BENCH_SPLITS)} "
                          f"('train', 'heldout' and 'fold' are validation sets), got {split!r}")
    if split == "fold":
        from opdkit.shapes.prompts import ALL_TAGS, validation_fold

        return validation_fold([t for t in ALL_TAGS if tags is None or t in tags])
    test = [r for r in load_split("test") if tags is None or r["tag"] in tags]
    if split == "test":
        return test
    if split == "heldout":
        return _heldout_records(test)
    wanted = Counter(r["tag"] for r in test)  # in the test split's tag order
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for r in load_split("train"):
        if r["tag"] in wanted:
            by_tag.setdefault(r["tag"], []).append(r)
    out: list[dict[str, Any]] = []
    for i, (tag, count) in enumerate(wanted.items()):
        pool = by_tag.get(tag, [])
        order = np.random.default_rng([VALIDATION_SEED, i]).permutation(len(pool))
        out.extend(pool[int(j)] for j in sorted(order[:count]))  # train order kept: stable rows
    return out


def _heldout_records(test: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prompts whose composition (OCR: text) is in neither shipped split, in the test phrasing:
    per tag as many as ``test`` has, a seeded sample kept in the space's order.

    OCR keeps the test's count per text length where it can; the 1- and 2-glyph texts are all in
    train or test, so their share passes to the next length that has spares (3 and 4 glyphs)."""
    from collections import Counter

    import numpy as np

    from opdkit.errors import OpdkitError
    from opdkit.shapes.prompts import composition, enumerate_prompts, load_split

    def length(r: dict[str, Any]) -> int:
        return len(r["text"]) if r["tag"] == "ocr" else 0

    used = {composition(r) for split in ("train", "test") for r in load_split(split)}
    tags = list(dict.fromkeys(r["tag"] for r in test))
    out: list[dict[str, Any]] = []
    short: list[str] = []
    for i, tag in enumerate(tags):
        wanted = Counter(length(r) for r in test if r["tag"] == tag)
        spare: dict[int, list[dict[str, Any]]] = {}
        for r in enumerate_prompts(tag):
            if composition(r) not in used:
                spare.setdefault(length(r), []).append(r)
        if sum(len(pool) for pool in spare.values()) < sum(wanted.values()):
            short.append(tag)
            continue
        carry = 0
        for n in sorted(set(wanted) | set(spare)):
            pool = spare.get(n, [])
            take = min(wanted.get(n, 0) + carry, len(pool))
            carry += wanted.get(n, 0) - take
            order = np.random.default_rng([HELDOUT_SEED, i, n]).permutation(len(pool))
            out.extend(pool[int(j)] for j in sorted(order[:take]))
    if short:
        raise OpdkitError(f"shapes benchmarks: split 'heldout' has too few prompts outside the train and "
                          f"test splits for tags {short} (their compositions are all in train or test); "
                          f"only color_attr and ocr have spares: use shapes-ocr, or split=train")
    return out


def _mean(rows: list[dict[str, Any]], key: str = "score") -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")


@benchmarks.register("shapes-geneval")
def shapes_geneval_bench(samples_per_prompt: int = 4, split: CoveredSplit = "test") -> Benchmark:
    """GenEval protocol on the shapes test split (six tags), exact shapes detector, strict verdicts.

    ``split="train"`` or ``"fold"``: a validation set instead (module docstring)."""
    from opdkit.scoring.geneval import GENEVAL_TAGS, summarize

    def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
        return summarize([{"tag": r["tag"], "correct": r["score"]} for r in rows])

    return Benchmark(
        name="shapes-geneval",
        world="shapes",
        prompts=_split_records(split, tuple(GENEVAL_TAGS)),
        samples_per_prompt=samples_per_prompt,
        score=WithScore(score_shapes_geneval, "correct", keep=("partial",)),
        summarize=summarize_rows,
        sampler=dict(SHAPES_SAMPLER),
        protocol=f"geneval-official/shapes-{split}/{PROTOCOL_VERSION}",
        engine="shapes-detector",
        family="GenEval",
    )


@benchmarks.register("shapes-ocr")
def shapes_ocr_bench(samples_per_prompt: int = 4, split: BenchSplit = "test") -> Benchmark:
    """flow_grpo's OCR metric (1 - capped edit distance / length) on the shapes test split's signs.

    ``split="train"``, ``"heldout"`` or ``"fold"``: a validation set instead (module docstring)."""
    return Benchmark(
        name="shapes-ocr",
        world="shapes",
        prompts=_split_records(split, ("ocr",)),
        samples_per_prompt=samples_per_prompt,
        score=score_shapes_ocr,
        summarize=lambda rows: {"overall": _mean(rows)},
        sampler=dict(SHAPES_SAMPLER),
        protocol=f"flow_grpo-ocr/shapes-{split}/{PROTOCOL_VERSION}",
        engine="shapes-glyph-reader",
        family="OCR",
    )


@benchmarks.register("shapes-quality")
def shapes_quality_bench(samples_per_prompt: int = 4, split: CoveredSplit = "test") -> Benchmark:
    """Task-agnostic image quality in [0, 1] over every prompt of the shapes test split.

    ``split="train"`` or ``"fold"``: a validation set instead (module docstring)."""
    def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
        by_tag: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_tag.setdefault(r["tag"], []).append(r)
        return {"overall": _mean(rows), **{tag: _mean(rs) for tag, rs in sorted(by_tag.items())}}

    return Benchmark(
        name="shapes-quality",
        world="shapes",
        prompts=_split_records(split, None),
        samples_per_prompt=samples_per_prompt,
        score=score_shapes_quality,
        summarize=summarize_rows,
        sampler=dict(SHAPES_SAMPLER),
        protocol=f"shapes-quality/shapes-{split}/{PROTOCOL_VERSION}",
        engine="shapes-quality",
        family="Quality",
    )
