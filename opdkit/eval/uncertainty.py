"""The standard error of a benchmark's headline ``overall`` over prompts: one formula for the
summary ``opdkit eval`` writes (``stderr``) and the paired difference ``opdkit compare`` reports.

The images of one prompt (4 by default) share the prompt, so their scores are correlated: the
prompt, not the image, is the independent draw. The error is therefore taken over per-prompt
values (the mean over a prompt's samples: its score, or its paired difference):

* a headline that is the mean of all images (OCR, quality, preference scores):
  ``SE = sd_p / sqrt(P)``;
* a GenEval-family ``overall`` (the mean over tags of each tag's mean):
  ``SE = sqrt(sum_t sd_t^2 / n_t) / T``, ``sd_t`` over the ``n_t`` prompts of tag ``t``
  (a tag with a single prompt adds no variance term).

The first is the second with one group holding every prompt. Summaries written before this
recorded ``stderr`` over images (``sd_images / sqrt(N)``) and carry no ``stderr_unit``; they
are read as they are, never recomputed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

TAG_AVERAGED_FAMILIES = frozenset({"GenEval"})
"""Benchmark families whose ``overall`` is the mean over tags of per-tag means, not over images."""

PROMPT_UNIT = "prompt"
"""``stderr_unit`` of a summary whose ``stderr`` is over prompts (what ``opdkit eval`` writes now)."""

IMAGE_UNIT = "image"
"""The unit of a summary without ``stderr_unit``: written before it was recorded, over images."""

STDERR_UNITS = (PROMPT_UNIT, IMAGE_UNIT)
"""The values a summary's ``stderr_unit`` may hold (absent: :data:`IMAGE_UNIT`)."""


def tag_averaged(family: Any) -> bool:
    """Whether a benchmark of ``family`` (a summary's ``family``) averages its ``overall`` over tags."""
    return family in TAG_AVERAGED_FAMILIES


def stderr_unit(summary: Mapping[str, Any]) -> str:
    """What a summary's ``stderr`` is taken over: ``"prompt"``, or ``"image"`` for one written
    before summaries recorded it (no ``stderr_unit``)."""
    return str(summary.get("stderr_unit") or IMAGE_UNIT)


def rows_by_prompt(rows: Iterable[Mapping[str, Any]]) -> dict[int, tuple[str, Any, dict[int, float]]]:
    """``{prompt_index: (tag, prompt, {sample_index: score})}`` of result rows; a prompt's tag and
    prompt text are its first row's."""
    out: dict[int, tuple[str, Any, dict[int, float]]] = {}
    for r in rows:
        _, _, samples = out.setdefault(int(r["prompt_index"]), (str(r.get("tag", "")), r.get("prompt"), {}))
        samples[int(r["sample_index"])] = float(r["score"])
    return out


def prompt_means(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """``(tag, mean score over the prompt's samples)`` per prompt, in prompt order (score units)."""
    return [(tag, statistics.fmean(samples.values())) for _, (tag, _, samples) in sorted(rows_by_prompt(rows).items())]


def stderr_over_prompts(values: Iterable[tuple[str, float]], by_tag: bool) -> float | None:
    """The standard error of the mean of per-prompt ``values`` (``(tag, value)`` pairs), in the
    values' units: over tags (``sqrt(sum_t var_t / n_t) / T``) where ``by_tag``, else over all
    prompts as one group (``sd / sqrt(P)``). None where no group has two prompts to take a
    spread from."""
    groups: dict[str, list[float]] = {}
    for tag, value in values:
        groups.setdefault(tag if by_tag else "", []).append(value)
    if not any(len(xs) > 1 for xs in groups.values()):
        return None
    # a single-prompt group has no spread of its own to add; it still counts in T
    variance = sum(statistics.variance(xs) / len(xs) for _, xs in sorted(groups.items()) if len(xs) > 1)
    return math.sqrt(variance) / len(groups)
