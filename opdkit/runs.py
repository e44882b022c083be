"""A finished training run as a model: ``opdkit eval --model runs/grpo_geneval``.

A GRPO (or OPD) run directory holds its resolved ``recipe.yaml`` and a ``final/`` folder written
by the trainer (see :mod:`opdkit.training.onpolicy`):

* ``final/final.json`` — ``{"kind": "lora" | "full", "step": N, "ema": bool, "adapter": name}``;
* ``final/lora.safetensors`` — the LoRA adapter (EMA weights when the run used EMA), or
* ``final/transformer.safetensors`` — the fine-tuned transformer's weights.

Loading rebuilds the base model from the recipe's ``model`` section (so the base must still be
where the recipe says: a relative ``model.path`` is read relative to the current directory),
then loads the adapter and merges it into the base weights (sampling then costs what the base
costs), or copies the full weights in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    from opdkit.models.flow_model import FlowModel
    from opdkit.recipe import AnyRecipe

FINAL = "final"


def is_run_dir(path: str | Path) -> bool:
    """True for a directory holding a training run's ``recipe.yaml`` and ``final/final.json``."""
    root = Path(path)
    return (root / "recipe.yaml").is_file() and (root / FINAL / "final.json").is_file()


def read_run_recipe(path: str | Path) -> AnyRecipe:
    """The resolved recipe a run directory was trained with (schema-checked, plug-ins not resolved)."""
    import yaml
    from pydantic import ValidationError

    from opdkit.recipe import parse_recipe

    file = Path(path) / "recipe.yaml"
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        return parse_recipe(data, lenient=True)  # runs written before per-method schemas list every key
    except FileNotFoundError:
        raise OpdkitError(f"{path}: not a run directory (no recipe.yaml)") from None
    except (yaml.YAMLError, ValidationError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise OpdkitError(f"{file}: unreadable run recipe: {first}") from None


def final_info(path: str | Path) -> dict[str, Any]:
    """``final/final.json`` of a run directory (what kind of weights it holds)."""
    file = Path(path) / FINAL / "final.json"
    if not file.is_file():
        raise OpdkitError(f"{path}: the run has no final weights yet ({FINAL}/final.json is missing); is it still training?")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise OpdkitError(f"{file}: not valid JSON: {exc.msg}") from None
    if info.get("kind") not in ("lora", "full"):
        raise OpdkitError(f"{file}: unknown kind {info.get('kind')!r} (expected 'lora' or 'full')")
    return info


def final_lora_path(path: str | Path) -> Path:
    """The final LoRA adapter file of a LoRA run (e.g. to load a GRPO teacher as a named adapter)."""
    info = final_info(path)
    if info["kind"] != "lora":
        raise OpdkitError(f"{path}: the run fine-tuned the whole transformer; it has no LoRA adapter")
    file = Path(path) / FINAL / "lora.safetensors"
    if not file.is_file():
        raise OpdkitError(f"{path}: {FINAL}/lora.safetensors is missing")
    return file


def load_run_model(path: str | Path, *, merge: bool = True, device: str | None = None) -> FlowModel:
    """The model a run trained: its base (from ``recipe.yaml``) plus its final weights.

    Args:
        path: the run directory.
        merge: fold a LoRA adapter into the base weights (else it stays attached as the active
            adapter named as in ``final.json``).
        device: move the model there (default: where the model builder put it).
    """
    import torch

    from opdkit.registry import models

    root = Path(path)
    recipe = read_run_recipe(root)
    info = final_info(root)
    model = models.build(recipe.model.type, recipe.model.builder_params())
    if device is not None:
        model.to(device=device)
    if info["kind"] == "lora":
        name = str(info.get("adapter", "default"))
        model.load_lora(final_lora_path(root), name=name)
        if merge:
            model.merge_lora(name)
        return model
    from safetensors.torch import load_file

    file = root / FINAL / "transformer.safetensors"
    if not file.is_file():
        raise OpdkitError(f"{root}: {FINAL}/transformer.safetensors is missing")
    saved = load_file(str(file))
    params = dict(model.transformer.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise OpdkitError(f"{file}: {len(unknown)} tensors do not fit the base transformer (first: {unknown[0]})")
    with torch.no_grad():
        for key, value in saved.items():
            params[key].copy_(value)
    return model
