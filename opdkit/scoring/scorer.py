"""The one scorer signature that reward and benchmark plug-ins share, and the few adapters around it.

A **scorer** reads a batch of generated images with their prompts and prompt records::

    scorer(images: Tensor (N, 3, H, W) float in [0, 1], prompts: list[str] (N), records: list[dict] (N))
        -> dict[str, Tensor (N,)]   # float32 on the CPU

A reward plug-in returns a scorer whose ``"score"`` is the training reward (what
:class:`opdkit.training.rewards.WeightedReward` calls); a benchmark carries one as
:attr:`opdkit.eval.benchmark.Benchmark.score`, whose ``"score"`` is the per-image metric. Model
scorers (GenEval's detector + rules, an OCR engine + metric, a preference model) return named
measurements, not necessarily a ``"score"``; :class:`WithScore` says which measurement a reward or
a benchmark ranks by, at which scale, and which others it keeps. So a reward and a benchmark over
the same model differ in one call, and cannot drift apart.

Kept apart from the models so that importing it costs nothing (torch is imported on use).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Scorer", "Scores", "WithScore", "call_scorer", "stack_results", "to_uint8", "to_uint8_images"]

Scores = dict[str, "torch.Tensor"]
"""Per-image values by name: each a float32 ``(N,)`` tensor on the CPU."""

Scorer = Callable[["torch.Tensor", list[str], list[dict[str, Any]]], Scores]
"""``(images (N, 3, H, W) float in [0, 1], prompts (N), records (N)) -> {name: (N,)}``."""


def call_scorer(
    fn: Callable[..., Any], what: str, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """``fn(images, prompts, records)`` of a plug-in (a reward's scorer, a benchmark's ``score``);
    its own failure, or a result without ``"score"``, is one line naming ``what`` (training and
    eval alike), not a traceback from inside the plug-in."""
    from opdkit.errors import OpdkitError, first_line

    try:
        out = fn(images, prompts, records)
    except OpdkitError:
        raise
    except Exception as exc:  # the plug-in's own failure, named, in one line
        raise OpdkitError(f"{what}: scoring raised {first_line(exc)}") from exc
    if not isinstance(out, dict) or "score" not in out:
        raise OpdkitError(f"{what} must return a dict with a 'score' tensor")
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, 3, H, W) uint8 on the CPU (round half to even, as ``torch.round``).

    Every scorer reads the 8-bit levels, so a score equals the score of the PNG the eval runner
    saves.
    """
    import torch

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 numpy, what detectors and OCR engines read."""
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def stack_results(results: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> Scores:
    """One float32 ``(N,)`` tensor per key from ``N`` per-image result dicts."""
    import torch

    return {key: torch.tensor([float(r[key]) for r in results], dtype=torch.float32) for key in keys}


class WithScore:
    """A scorer whose ``"score"`` is one measurement of another scorer, scaled and floored.

    Output: ``{"score": max(scale * measured[key], floor), **kept}`` in that order (the order of the
    columns a benchmark writes); ``keep`` names the other measurements to pass on, as a list or as
    ``{output name: measurement}`` to rename them. ``engine`` is the inner scorer's (benchmark
    result files name it).
    """

    def __init__(
        self,
        scorer: Scorer,
        key: str,
        scale: float = 1.0,
        keep: Iterable[str] | Mapping[str, str] = (),
        floor: float | None = None,
    ) -> None:
        self.scorer = scorer
        self.key = key
        self.scale = float(scale)
        self.keep = dict(keep) if isinstance(keep, Mapping) else {name: name for name in keep}
        self.floor = floor

    @property
    def engine(self) -> str:
        return str(getattr(self.scorer, "engine", ""))

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> Scores:
        measured = self.scorer(images, prompts, records)
        score = measured[self.key] * self.scale
        if self.floor is not None:
            score = score.clamp_min(self.floor)
        return {"score": score, **{name: measured[key] for name, key in self.keep.items()}}
