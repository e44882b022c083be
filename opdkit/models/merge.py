"""Cold start for OPD: merge several LoRA teachers into one student adapter, on the weight deltas.

A LoRA adapter changes a linear layer by ``delta = (alpha / r) * B @ A`` with ``A (r, in)`` and
``B (out, r)``. Averaging A and B separately (as Flow-OPD's code does) gives
``mean(B) @ mean(A)``, which is NOT the mean of the deltas (cross terms B_i @ A_j appear). Here
merges act on the deltas themselves:

- ``mean`` / ``weighted``: ``sum_k w_k delta_k``. Represented EXACTLY by concatenation:
  ``A = [A_1; ...; A_K]`` and ``B = [w_1 s_1 B_1, ..., w_K s_K B_K]`` (s_k = alpha_k / r_k) with
  rank ``sum r_k`` and scale 1; pass ``rank`` to compress it by truncated SVD instead.
- ``ties``: TIES-merging (Yadav et al. 2023) per delta matrix: keep the ``density`` largest-
  magnitude entries of each delta, elect a sign per entry from the weighted sum, take the weighted
  mean of the kept entries that agree with it; then a truncated SVD back to LoRA factors (rank
  default: max r_k).

Adapters are read and written in opdkit's LoRA format (:mod:`opdkit.models.lora`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from opdkit.errors import OpdkitError
from opdkit.models.lora import LoraFile, read_lora, write_lora

if TYPE_CHECKING:
    import torch

MERGE_METHODS = ("mean", "weighted", "ties")


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-merge ``(out, in)`` deltas: trim to ``density``, elect signs, disjoint weighted mean.

    Each entry is ``sum_k w_k d_k / sum_k w_k`` over the deltas ``k`` whose kept entry agrees with
    the elected sign (0 where none does): a weighted mean, so merging an adapter with itself gives
    it back at any weights (dividing by the count of agreeing deltas instead shrank the default
    ``1/K`` weights' merge K-fold). Weights must be positive.
    """
    import torch

    trimmed = []
    for delta in deltas:
        flat = delta.abs().flatten()
        keep = max(1, round(density * flat.numel()))
        threshold = torch.topk(flat, keep).values.min()
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stack = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).reshape(-1, *([1] * (stack.ndim - 1)))
    sign = torch.sign((w * stack).sum(dim=0))
    agree = ((torch.sign(stack) == sign) & (stack != 0)).to(stack.dtype)
    total = (w * agree).sum(dim=0)
    return torch.where(total > 0, (w * agree * stack).sum(dim=0) / total.clamp_min(torch.finfo(stack.dtype).tiny), 0.0)


def _factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A (r, in), B (out, r)) of ``delta`` with scale 1 (truncated SVD)."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if r < rank:  # pad with zero directions so every module has the same rank
        a = torch.cat([a, torch.zeros(rank - r, a.shape[1], dtype=a.dtype)])
        b = torch.cat([b, torch.zeros(b.shape[0], rank - r, dtype=b.dtype)], dim=1)
    return a, b


def merge_loras(
    loras: list[LoraFile],
    method: str = "mean",
    weights: list[float] | None = None,
    rank: int | None = None,
    density: float = 0.2,
) -> LoraFile:
    """Merge adapters on their weight deltas (see the module docstring). Returns a new adapter."""
    import torch

    if method not in MERGE_METHODS:
        raise OpdkitError(f"merge method {method!r} unknown; expected one of {', '.join(MERGE_METHODS)}")
    if not loras:
        raise OpdkitError("merge needs at least one adapter")
    if weights is None:
        weights = [1.0 / len(loras)] * len(loras)
    elif method == "mean":
        raise OpdkitError("merge method 'mean' takes no weights; use 'weighted'")
    if len(weights) != len(loras):
        raise OpdkitError(f"merge: {len(weights)} weights for {len(loras)} adapters")
    if not all(math.isfinite(w) for w in weights):  # one NaN would make every merged entry NaN
        raise OpdkitError(f"merge: weights must be finite numbers, got {weights}")
    if method == "ties" and not all(w > 0 for w in weights):  # a weighted mean of the agreeing entries
        raise OpdkitError(f"merge: ties weights must be positive, got {weights}")
    if rank is not None and rank < 1:
        raise OpdkitError(f"merge: rank must be >= 1, got {rank}")
    modules = set(loras[0].factors)
    for lora in loras[1:]:
        if set(lora.factors) != modules:
            raise OpdkitError("merge: adapters target different modules; they must share target modules")
    if not 0.0 < density <= 1.0:
        raise OpdkitError(f"merge: density must be in (0, 1], got {density}")
    # adapters of different bases have deltas of different weights: their sum fits neither base
    bases = sorted({lora.base_fingerprint for lora in loras if lora.base_fingerprint is not None})
    if len(bases) > 1:
        raise OpdkitError(f"merge: the adapters were trained on different base models ({', '.join(bases)})")
    base = bases[0] if bases else None  # kept, so the merged file is refused on another base too
    targets = sorted({t for lora in loras for t in lora.target_modules})
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if method != "ties" and rank is None:
        for module in sorted(modules):
            a = torch.cat([lora.factors[module][0].double() for lora in loras], dim=0)
            b = torch.cat([w * lora.scale * lora.factors[module][1].double() for w, lora in zip(weights, loras, strict=True)], dim=1)
            merged[module] = (a, b)
        total = sum(lora.rank for lora in loras)
        return LoraFile(merged, total, float(total), targets, base_fingerprint=base)
    out_rank = rank or max(lora.rank for lora in loras)
    for module in sorted(modules):
        deltas = [lora.delta(module) for lora in loras]
        if method == "ties":
            delta = ties_merge(deltas, weights, density)
        else:
            delta = sum(w * d for w, d in zip(weights, deltas, strict=True))
        merged[module] = _factorize(delta, out_rank)
    return LoraFile(merged, out_rank, float(out_rank), targets, base_fingerprint=base)


def merge_files(
    inputs: list[str | Path],
    out: str | Path,
    method: str = "mean",
    weights: list[float] | None = None,
    rank: int | None = None,
    density: float = 0.2,
) -> Path:
    """Read adapters (files or run directories), merge them, write the result; returns its path."""
    merged = merge_loras([read_lora(p) for p in inputs], method, weights, rank, density)
    return write_lora(merged, out)
