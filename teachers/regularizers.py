"""Regularizer plug-ins: extra KL terms of the OPD loss, each toward a frozen anchor.

A regularizer builder returns a :class:`KLAnchor`; the recipe entry's ``weight`` scales it:
``L += weight * KL(student || anchor)`` on every prompt of every task.
"""

from __future__ import annotations

from dataclasses import dataclass

from opdkit.registry import regularizers


@dataclass(frozen=True)
class KLAnchor:
    """anchor: a teacher name from the recipe's ``teachers``, or ``"base"`` (adapters disabled)."""

    anchor: str


@regularizers.register("mar")
def mar(anchor: str = "base") -> KLAnchor:
    """Manifold Anchor Regularization: KL to a task-agnostic anchor teacher (default: the base)."""
    return KLAnchor(anchor)


@regularizers.register("ref_kl")
def ref_kl() -> KLAnchor:
    """KL to the reference model (the base with every adapter disabled)."""
    return KLAnchor("base")
