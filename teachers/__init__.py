"""Teacher plug-ins: where a teacher's weights come from.

A teacher builder returns a :class:`TeacherSource`, a plain description; the OPD run loads every
LoRA teacher as a named adapter on ONE shared copy of the base weights (K teachers cost K adapters,
not K models) and switches adapters per sub-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opdkit.registry import teachers


@dataclass(frozen=True)
class TeacherSource:
    """kind: ``lora`` (adapter on the shared base), ``full`` (separate checkpoint) or ``base``."""

    kind: str
    path: Path | None = None


@teachers.register("lora")
def lora(path: str) -> TeacherSource:
    """A LoRA adapter on the shared base: a GRPO run directory, an adapter file, or a committed one."""
    from opdkit.checkpoint import resolve_weights_path

    return TeacherSource("lora", resolve_weights_path(path))


@teachers.register("full")
def full(path: str) -> TeacherSource:
    """A separate full checkpoint in the diffusers pipeline layout (costs a whole model)."""
    from opdkit.checkpoint import resolve_weights_path

    return TeacherSource("full", resolve_weights_path(path))


@teachers.register("base")
def base() -> TeacherSource:
    """The base model itself (all adapters disabled): the reference / default MAR anchor."""
    return TeacherSource("base")
