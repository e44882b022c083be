"""The weighted reward of GRPO (and of OPD's ``mixed`` mode and logged task rewards).

A reward plug-in is a scorer: ``(images (N, 3, H, W) in [0, 1], prompts, records) -> {"score":
(N,), ...}``. :class:`WeightedReward` builds the recipe's rewards once and sums them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from opdkit.errors import OpdkitError, prefixed
from opdkit.scoring.scorer import call_scorer

# A score beyond this is a bug or a unit mistake (rewards are O(1)-O(100)); it is refused, unless
# the reward callable declares its own ``score_range = (low, high)``.
MAX_ABS_REWARD = 1e6

if TYPE_CHECKING:
    from opdkit.recipe import RewardSpec


@dataclass
class RewardScores:
    """Scores of a batch: the weighted total and every named part.

    Attributes:
        total: (N,) float32 ``sum_k w_k * r_k``.
        parts: ``label -> (N,)`` for each reward's score, and ``label/key -> (N,)`` for the
            other keys a reward returned (sub-scores, logged only).
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


class WeightedReward:
    """R = sum_k weight_k * r_k over the recipe's ``rewards`` (plug-ins built once).

    A reward plug-in returns ``(images (N, 3, H, W) in [0, 1], prompts, records) -> {"score":
    (N,), ...}``. Labels (``name`` or the plug-in name) must be unique: they name the logged
    metrics. A reward with ``tags`` scores only the images whose prompt record has one of those
    tags (an OCR reward on sign prompts only); the others get 0 in the total and NaN in
    :attr:`RewardScores.parts` (so logged means cover only the images it scored).
    """

    def __init__(self, specs: Sequence[RewardSpec], build: Any = None, where: Any = None) -> None:
        if build is None:
            from opdkit.registry import rewards

            build = rewards.build
        self.labels = [spec.label for spec in specs]
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            raise OpdkitError(
                f"rewards: labels must be unique to be logged apart, {', '.join(repeated)} repeated; "
                "give each a distinct 'name'"
            )
        self.weights = [float(spec.weight) for spec in specs]
        self.tags = [set(spec.tags) if spec.tags is not None else None for spec in specs]
        # "FILE:LINE: rewards.i" for errors found while running (a LoadedRecipe's where)
        self.places = [where("rewards", i) if where is not None else f"rewards.{i}" for i in range(len(specs))]
        self.functions = []
        for place, spec in zip(self.places, specs, strict=True):
            with prefixed(place):
                fn = build(spec.type, spec.params)
            if not callable(fn):
                raise OpdkitError(f"{place}: reward {spec.label!r}: its builder returned {type(fn).__name__}, not a callable")
            self.functions.append(fn)

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> RewardScores:
        n = images.shape[0]
        total = torch.zeros(n, dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for place, label, weight, tags, fn in zip(
            self.places, self.labels, self.weights, self.tags, self.functions, strict=True
        ):
            rows = [i for i, r in enumerate(records) if tags is None or r.get("tag") in tags]
            if not rows:
                parts[label] = torch.full((n,), math.nan)
                continue
            what = f"{place}: reward {label!r}"
            if len(rows) == n:
                out = call_scorer(fn, what, images, prompts, records)
            else:
                out = call_scorer(fn, what, images[rows], [prompts[i] for i in rows], [records[i] for i in rows])
            index = torch.tensor(rows)
            for key, value in out.items():
                value = torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1)
                if value.numel() != len(rows):
                    raise OpdkitError(f"{place}: reward {label!r}: {key!r} has {value.numel()} values for {len(rows)} images")
                full = torch.full((n,), math.nan).index_copy(0, index, value)
                if key == "score":
                    if not bool(torch.isfinite(value).all()):
                        raise OpdkitError(f"{place}: reward {label!r} returned a non-finite score")
                    lo, hi = getattr(fn, "score_range", (-MAX_ABS_REWARD, MAX_ABS_REWARD))
                    if float(value.min()) < lo or float(value.max()) > hi:
                        raise OpdkitError(
                            f"{place}: reward {label!r} returned {float(value.min()):.3g}..{float(value.max()):.3g}, "
                            f"outside [{lo:g}, {hi:g}]: such scores swamp the advantages; rescale it, or give the "
                            "callable a score_range attribute if they are right"
                        )
                    parts[label] = full
                    total = total + weight * torch.nan_to_num(full, nan=0.0)
                else:
                    parts[f"{label}/{key}"] = full
        return RewardScores(total, parts)


