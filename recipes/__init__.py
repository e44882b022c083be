"""Shipped YAML recipes (package data): ``shapes/*.yaml`` run on a CPU, ``sd35m/*.yaml`` on GPUs."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def shipped_recipes() -> list[str]:
    """Names like ``shapes/pretrain`` of every shipped recipe."""
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.glob("*/*.yaml"))


def shipped_recipe(name: str) -> Path | None:
    """The path of a shipped recipe by name (``shapes/pretrain`` or ``shapes/pretrain.yaml``)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = RECIPES_DIR / f"{stem}.yaml"
    return path if path.is_file() and RECIPES_DIR in path.resolve().parents else None
