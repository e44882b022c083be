"""Preference benchmarks of the real (SD3) world: PickScore, CLIPScore, Aesthetic, HPSv2.1, ImageReward.

Every benchmark scores generated images with one preference model on a prompt set (default:
DrawBench, 200 prompts x 5 images; ``hpsv2`` defaults to HPD v2's four styles x 800 prompts x 1
image, as the HPSv2 benchmark) and reports, in family ``Preference``:

* ``overall``: the mean score (for HPD v2: the mean of the four per-style means, as HPSv2 reports);
* one metric per prompt tag (DrawBench category, HPD v2 style).

Scales (the per-image ``score``): PickScore raw (~21-24), CLIPScore logits / 100, Aesthetic raw
(~1-10), HPSv2.1 100 x cosine (per-image ``cosine`` kept too), ImageReward normalised.

Common parameters: ``prompts`` (a file/directory, see :mod:`opdkit.data.sources`), ``prompt_set``
(``drawbench``, ``pickscore-test``, ``hpdv2``), ``samples_per_prompt`` (default: the set's),
``resolution`` (default 512; sampler steps 40, CFG 4.5 as the SD3.5-M evaluations), ``device``,
``dtype``, ``batch_size``, plus each model's weight parameters: those of its builder in
:mod:`opdkit.scoring.preference.builders`, the scorer the reward of the same name ranks by too.
"""

from __future__ import annotations

from typing import Any

from opdkit.data.sources import load_prompt_set
from opdkit.eval.benchmark import Benchmark
from opdkit.registry import benchmarks, with_params_of
from opdkit.scoring.preference import CLIPSCORE_SCALE
from opdkit.scoring.preference.builders import (
    build_aesthetic,
    build_clipscore,
    build_hpsv2,
    build_imagereward,
    build_pickscore,
)
from opdkit.scoring.scorer import WithScore

PROTOCOL_VERSION = "1"
FAMILY = "Preference"


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
    score: WithScore,
    records: list[dict[str, Any]],
    prompt_set: str,
    samples_per_prompt: int | None,
    resolution: int,
) -> Benchmark:
    """A preference Benchmark of ``score`` on the ``records`` of ``prompt_set``."""
    from opdkit.data.sources import prompt_set as spec_of

    spec = spec_of(prompt_set)
    return Benchmark(
        name=name,
        world="sd3",
        prompts=records,
        samples_per_prompt=samples_per_prompt or spec.samples_per_prompt,
        score=score,
        summarize=_summarize(per_tag_mean=prompt_set == "hpdv2"),
        sampler={"steps": 40, "cfg": 4.5, "resolution": resolution, "shift": None},
        protocol=f"{name}/{prompt_set}/{PROTOCOL_VERSION}",
        engine=score.engine,
        higher_is_better=True,
        family=FAMILY,
    )


@benchmarks.register("pickscore")
@with_params_of(build_pickscore)
def pickscore_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    **model: Any,
) -> Benchmark:
    """PickScore_v1 (raw, ~21-24) on DrawBench (200 x 5) or another prompt set."""
    records = load_prompt_set(prompt_set, prompts)
    score = WithScore(build_pickscore(**model), "logit")
    return _bench("pickscore", score, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("clipscore")
@with_params_of(build_clipscore)
def clipscore_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    **model: Any,
) -> Benchmark:
    """CLIP ViT-L/14 logits_per_image / 100 on DrawBench (200 x 5) or another prompt set."""
    records = load_prompt_set(prompt_set, prompts)
    score = WithScore(build_clipscore(**model), "logit", CLIPSCORE_SCALE)
    return _bench("clipscore", score, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("aesthetic")
@with_params_of(build_aesthetic)
def aesthetic_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    **model: Any,
) -> Benchmark:
    """LAION aesthetic predictor v2 (~1-10) on DrawBench (200 x 5) or another prompt set."""
    records = load_prompt_set(prompt_set, prompts)
    score = WithScore(build_aesthetic(**model), "aesthetic")
    return _bench("aesthetic", score, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("hpsv2")
@with_params_of(build_hpsv2)
def hpsv2_bench(
    prompts: str | None = None,
    prompt_set: str = "hpdv2",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    **model: Any,
) -> Benchmark:
    """HPSv2.1, 100 x cosine; HPD v2's four styles x 800 prompts by default (overall = style mean)."""
    records = load_prompt_set(prompt_set, prompts)
    score = WithScore(build_hpsv2(**model), "cosine", 100.0, keep=("cosine",))
    return _bench("hpsv2", score, records, prompt_set, samples_per_prompt, resolution)


@benchmarks.register("imagereward")
@with_params_of(build_imagereward)
def imagereward_bench(
    prompts: str | None = None,
    prompt_set: str = "drawbench",
    samples_per_prompt: int | None = None,
    resolution: int = 512,
    **model: Any,
) -> Benchmark:
    """ImageReward-v1.0 (normalised) on DrawBench (200 x 5) or another prompt set."""
    records = load_prompt_set(prompt_set, prompts)
    score = WithScore(build_imagereward(**model), "imagereward")
    return _bench("imagereward", score, records, prompt_set, samples_per_prompt, resolution)
