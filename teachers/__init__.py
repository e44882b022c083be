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
    """A LoRA adapter on the shared base: a GRPO run directory or an adapter directory/file."""
    return TeacherSource("lora", Path(path).expanduser())


@teachers.register("full")
def full(path: str) -> TeacherSource:
    """A separate full checkpoint in the diffusers pipeline layout (costs a whole model)."""
    return TeacherSource("full", Path(path).expanduser())


@teachers.register("base")
def base() -> TeacherSource:
    """The base model itself (all adapters disabled): the reference / default MAR anchor."""
    return TeacherSource("base")
