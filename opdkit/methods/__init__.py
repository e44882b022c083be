"""Training methods, one short file each over the shared loop (:mod:`opdkit.training.loop`).

A method says what it sets up, what one step does (make a batch, compute a loss, back-propagate
and step the optimizer) and what it saves. ``method: NAME`` in a recipe picks one;
:func:`method_for` imports only the one asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opdkit.recipe import LoadedRecipe
    from opdkit.training.loop import Method


def method_for(name: str) -> Method:
    """A fresh instance of the method ``name`` (``pretrain``, ``grpo`` or ``opd``)."""
    if name == "pretrain":
        from opdkit.methods.pretrain import Pretrain

        return Pretrain()
    if name == "grpo":
        from opdkit.methods.grpo import Grpo

        return Grpo()
    if name == "opd":
        from opdkit.methods.opd import Opd

        return Opd()
    raise ValueError(f"unknown method {name!r} (expected pretrain, grpo or opd)")


def train(
    loaded: LoadedRecipe, out_dir: str | Path, *, resume: bool = False, evaluate: bool = True, overwrite: bool = False
) -> Path:
    """Run a loaded recipe with its method over the shared loop; returns the final model's folder."""
    from opdkit.training.loop import run

    return run(method_for(loaded.recipe.method), loaded, out_dir, resume=resume, evaluate=evaluate, overwrite=overwrite)
