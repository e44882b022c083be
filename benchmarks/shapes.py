"""Benchmarks of the shapes world: GenEval's protocol with the exact shapes detector, OCR, quality.

Same rules as the real benchmarks (the GenEval verdicts and the OCR metric live in
:mod:`opdkit.scoring`), on the shapes world's shipped test split, 4 images per prompt.
"""

from __future__ import annotations

from typing import Any

from opdkit.benchmark import Benchmark
from opdkit.registry import benchmarks

# Sampler settings of every shapes benchmark: the base model was pretrained at 32 px.
SHAPES_SAMPLER: dict[str, Any] = {"steps": 20, "cfg": 3.0, "resolution": 32, "shift": None}
# 2: objects on the placement grid may touch the border; the majority filter replicates edge pixels.
PROTOCOL_VERSION = "2"


def _test_records(tags: tuple[str, ...] | None) -> list[dict[str, Any]]:
    from opdkit.shapes.prompts import load_split

    records = load_split("test")
    return [r for r in records if tags is None or r["tag"] in tags]


def _mean(rows: list[dict[str, Any]], key: str = "score") -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")


@benchmarks.register("shapes-geneval")
def shapes_geneval_bench(samples_per_prompt: int = 4) -> Benchmark:
    """GenEval protocol on the shapes test split (six tags), exact shapes detector, strict verdicts."""
    from opdkit.rewards.shapes import to_uint8_hwc

    from opdkit.scoring.geneval import GENEVAL_TAGS, summarize
    from opdkit.shapes.detect import score_geneval

    def score(images: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        results = score_geneval(to_uint8_hwc(images), records)
        return {
            "score": torch.tensor([float(r["correct"]) for r in results]),
            "partial": torch.tensor([float(r["partial"]) for r in results]),
        }

    def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
        return summarize([{"tag": r["tag"], "correct": r["score"]} for r in rows])

    return Benchmark(
        name="shapes-geneval",
        world="shapes",
        prompts=_test_records(tuple(GENEVAL_TAGS)),
        samples_per_prompt=samples_per_prompt,
        score=score,
        summarize=summarize_rows,
        sampler=dict(SHAPES_SAMPLER),
        protocol=f"geneval-official/shapes-test/{PROTOCOL_VERSION}",
        engine="shapes-detector",
        family="GenEval",
    )


@benchmarks.register("shapes-ocr")
def shapes_ocr_bench(samples_per_prompt: int = 4) -> Benchmark:
    """flow_grpo's OCR metric (1 - capped edit distance / length) on the shapes test split's signs."""
    from opdkit.rewards.shapes import to_uint8_hwc

    from opdkit.shapes.detect import score_ocr

    def score(images: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {"score": torch.tensor(score_ocr(to_uint8_hwc(images), records), dtype=torch.float32)}

    return Benchmark(
        name="shapes-ocr",
        world="shapes",
        prompts=_test_records(("ocr",)),
        samples_per_prompt=samples_per_prompt,
        score=score,
        summarize=lambda rows: {"overall": _mean(rows)},
        sampler=dict(SHAPES_SAMPLER),
        protocol=f"flow_grpo-ocr/shapes-test/{PROTOCOL_VERSION}",
        engine="shapes-glyph-reader",
        family="OCR",
    )


@benchmarks.register("shapes-quality")
def shapes_quality_bench(samples_per_prompt: int = 4) -> Benchmark:
    """Task-agnostic image quality in [0, 1] over every prompt of the shapes test split."""
    from opdkit.rewards.shapes import to_uint8_hwc

    from opdkit.shapes.quality import score_quality

    def score(images: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {"score": torch.tensor(score_quality(to_uint8_hwc(images)), dtype=torch.float32)}

    def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
        by_tag: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_tag.setdefault(r["tag"], []).append(r)
        return {"overall": _mean(rows), **{tag: _mean(rs) for tag, rs in sorted(by_tag.items())}}

    return Benchmark(
        name="shapes-quality",
        world="shapes",
        prompts=_test_records(None),
        samples_per_prompt=samples_per_prompt,
        score=score,
        summarize=summarize_rows,
        sampler=dict(SHAPES_SAMPLER),
        protocol=f"shapes-quality/shapes-test/{PROTOCOL_VERSION}",
        engine="shapes-quality",
        family="Quality",
    )
