"""Preference benchmarks of the real (SD3) world: PickScore, CLIPScore, Aesthetic, HPSv2.1, ImageReward.

Every benchmark scores generated images with one preference model on a prompt set (default:
DrawBench, 200 prompts x 5 images; ``hpsv2`` defaults to HPD v2's four styles x 800 prompts x 1
image, as the HPSv2 benchmark) and reports, in family ``Preference``:

* ``overall``: the mean score (for HPD v2: the mean of the four per-style means, as HPSv2 reports);
* one metric per prompt tag (DrawBench category, HPD v2 style).

Scales (the per-image ``score``): PickScore raw (~21-24), CLIPScore logits / 100, Aesthetic raw
(~1-10), HPSv2.1 100 x cosine (per-image ``cosine`` kept too), ImageReward normalised.

Common parameters: ``prompts`` (a file/directory, see :mod:`opdkit.prompt_sets`), ``prompt_set``
(``drawbench``, ``pickscore-test``, ``hpdv2``), ``samples_per_prompt`` (default: the set's),
``resolution`` (default 512; sampler steps 40, CFG 4.5 as the SD3.5-M evaluations), ``device``,
``dtype``, ``batch_size``, plus each model's weight parameters (as the rewards of the same name).
"""

from __future__ import annotations

from typing import Any

from opdkit.benchmark import Benchmark
from opdkit.registry import benchmarks
from opdkit.scoring.preference import (
    BERT_BASE_UNCASED,
    IMAGEREWARD_CHECKPOINT,
    LAION_VIT_H14,
    OPENAI_VIT_L14,
    PICKSCORE_MODEL,
)

PROTOCOL_VERSION = "1"
FAMILY = "Preference"


def _records(prompts: str | None, prompt_set: str) -> list[dict[str, Any]]:
    from opdkit.prompt_sets import load_prompt_set

    return load_prompt_set(prompt_set, prompts)


def _summarize(per_tag_mean: bool) -> Any:
    """Mean score overall and per tag; ``per_tag_mean``: overall = mean of the tag means."""

    def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
        if not rows:
            return {"overall": float("nan")}
        by_tag: dict[str, list[float]] = {}
        for r in rows:
            by_tag.setdefault(str(r.get("tag", "default")), []).append(float(r["score"]))
        tag_means = {tag: sum(v) / len(v) for tag, v in sorted(by_tag.items())}
        if per_tag_mean:
            overall = sum(tag_means.values()) / len(tag_means)
        else:
            overall = sum(float(r["score"]) for r in rows) / len(rows)
        return {"overall": overall, **tag_means}

    return summarize


def _bench(
    name: str,
    scorer: Any,
    key: str,
    scale: float,
    records: list[dict[str, Any]],
    prompt_set: str,
    samples_per_prompt: int | None,
    resolution: int,
    extra: dict[str, str] | None = None,
) -> Benchmark:
    """A Benchmark whose per-image score is ``scale * scorer(...)[key]`` (other outputs kept as named)."""
    from opdkit.prompt_sets import prompt_set as spec_of

    spec = spec_of(prompt_set)
    keep = dict(extra or {})

    def score(images: Any, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = scorer(images, [r["prompt"] for r in batch])
        return {"score": out[key] * scale, **{name_: out[k] for k, name_ in keep.items()}}

    return Benchmark(
        name=name,
        world="sd3",
        prompts=records,
        samples_per_prompt=samples_per_prompt or spec.samples_per_prompt,
        score=score,
        summarize=_summarize(per_tag_mean=prompt_set == "hpdv2"),
        sampler={"steps": 40, "cfg": 4.5, "resolution": resolution, "shift": None},
        protocol=f"{name}/{prompt_set}/{PROTOCOL_VERSION}",
        engine=scorer.engine,
        higher_is_better=True,
        family=FAMILY,
    )


@benchmarks.register("pickscore")
def pickscore_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    model: str = PICKSCORE_MODEL,
    processor: str = LAION_VIT_H14,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Benchmark:
    """PickScore_v1 (raw, ~21-24) on DrawBench (200 x 5) or another prompt set."""
    from opdkit.scoring.preference.scorers import build_pickscore

    records = _records(prompts, prompt_set)
    scorer = build_pickscore(model, processor, device, dtype, batch_size)
    return _bench("pickscore", scorer, "logit", 1.0, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("clipscore")
def clipscore_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    model: str = OPENAI_VIT_L14,
    processor: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Benchmark:
    """CLIP ViT-L/14 logits_per_image / 100 on DrawBench (200 x 5) or another prompt set."""
    from opdkit.scoring.preference import CLIPSCORE_SCALE
    from opdkit.scoring.preference.scorers import build_clipscore

    records = _records(prompts, prompt_set)
    scorer = build_clipscore(model, processor, device, dtype, batch_size)
    return _bench("clipscore", scorer, "logit", CLIPSCORE_SCALE, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("aesthetic")
def aesthetic_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    predictor: str | None = None,
    clip: str = OPENAI_VIT_L14,
    processor: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Benchmark:
    """LAION aesthetic predictor v2 (~1-10) on DrawBench (200 x 5) or another prompt set."""
    from opdkit.scoring.preference.scorers import build_aesthetic

    records = _records(prompts, prompt_set)
    scorer = build_aesthetic(predictor, clip, processor, device, dtype, batch_size)
    return _bench("aesthetic", scorer, "aesthetic", 1.0, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("hpsv2")
def hpsv2_bench(
    prompts: str | None = None,
    prompt_set: str = "hpdv2",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    checkpoint: str | None = None,
    version: str = "v2.1",
    tokenizer: str = LAION_VIT_H14,
    backend: str = "opdkit",
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Benchmark:
    """HPSv2.1, 100 x cosine; HPD v2's four styles x 800 prompts by default (overall = style mean)."""
    from opdkit.scoring.preference.scorers import build_hpsv2

    records = _records(prompts, prompt_set)
    scorer = build_hpsv2(checkpoint, version, tokenizer, backend, device, dtype, batch_size)
    return _bench(
        "hpsv2", scorer, "cosine", 100.0, records, prompt_set, samples_per_prompt, resolution, extra={"cosine": "cosine"}
    )


@benchmarks.register("imagereward")
def imagereward_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    checkpoint: str = IMAGEREWARD_CHECKPOINT,
    tokenizer: str = BERT_BASE_UNCASED,
    backend: str = "opdkit",
    med_config: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 32,
) -> Benchmark:
    """ImageReward-v1.0 (normalised) on DrawBench (200 x 5) or another prompt set."""
    from opdkit.scoring.preference.scorers import build_imagereward

    records = _records(prompts, prompt_set)
    scorer = build_imagereward(checkpoint, tokenizer, backend, med_config, device, dtype, batch_size)
    return _bench("imagereward", scorer, "imagereward", 1.0, records, prompt_set, samples_per_prompt, resolution)
