"""What a benchmark plug-in returns: a plain description the eval runner consumes.

A benchmark builder (registered with ``@benchmarks.register(name)``) takes its YAML/CLI
parameters as keyword arguments and returns a :class:`Benchmark`. The runner
(:mod:`opdkit.eval.runner`) generates ``samples_per_prompt`` images for every prompt record, calls
``score`` on batches, stores one JSONL record per image, and calls ``summarize`` on all records.
``score`` is a scorer (:data:`opdkit.scoring.scorer.Scorer`), the signature rewards share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opdkit.scoring.scorer import Scorer

# per-image records (each has the prompt record's keys plus its scores) -> metrics
SummarizeFn = Callable[[list[dict[str, Any]]], dict[str, float]]


@dataclass
class Benchmark:
    """A fixed prompt set plus a fixed scoring protocol.

    Attributes:
        name: registry name, e.g. ``"shapes-geneval"``.
        world: ``"shapes"`` or ``"sd3"``; a model of another world is refused by the runner.
        prompts: prompt records (each at least ``{"prompt": str, "tag": str}``).
        samples_per_prompt: images generated per prompt (GenEval: 4).
        score: scores a batch: ``(images (B, 3, H, W) in [0, 1], prompts, prompt records) ->
            {"score": (B,), other name: (B,)}``; every returned name becomes a column of the
            per-image records, in the returned order. A batch whose ``score`` is not finite, or
            that has a value too many or too few, is refused before any of its rows is written.
        summarize: turns all per-image records into metrics (numbers); key ``"overall"`` is the
            headline, and a summary without a finite one is refused, not written.
        sampler: default sampler settings for this benchmark (steps, cfg, resolution ...).
        protocol: protocol name and version, e.g. ``"geneval-official/1"``.
        engine: detector or scoring engine used, e.g. ``"shapes-detector"``.
        higher_is_better: direction of every metric.
        family: leaderboard column group, e.g. ``"GenEval"``.
    """

    name: str
    world: str
    prompts: list[dict[str, Any]]
    samples_per_prompt: int
    score: Scorer
    summarize: SummarizeFn
    sampler: dict[str, Any] = field(default_factory=dict)
    protocol: str = ""
    engine: str = ""
    higher_is_better: bool = True
    family: str = ""
