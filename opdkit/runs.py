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


# What pretraining writes beside its pipeline (``<run>/model/``) when it ends: the step it reached.
PRETRAINED = "model"
PRETRAINED_STEP = "opdkit_run.json"


def finished_step(path: str | Path) -> int | None:
    """The step a run's final weights are of, or None while it has none: ``final/final.json``
    (GRPO/OPD) or, for pretraining, ``model/opdkit_run.json`` written with its pipeline."""
    root = Path(path)
    if is_run_dir(root):
        return int(final_info(root).get("step", 0))
    record = root / PRETRAINED / PRETRAINED_STEP
    if (root / "recipe.yaml").is_file() and (root / PRETRAINED / "model_index.json").is_file() and record.is_file():
        try:
            return int(json.loads(record.read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable record: not known to be finished, so the run is resumed
    return None


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


def checkpoint_steps(path: str | Path) -> list[int]:
    """Steps of the complete checkpoints a run directory keeps (``checkpoints/step_<N>/``), sorted."""
    from opdkit.rundir import RunDir

    steps = []
    for directory in RunDir(path).checkpoints.glob("step_*"):
        number = directory.name.removeprefix("step_")
        if number.isdigit() and (directory / "trainer_state.json").is_file():
            steps.append(int(number))
    return sorted(steps)


def load_run_checkpoint(path: str | Path, step: int, *, merge: bool = True, device: str | None = None) -> FlowModel:
    """The model of a run's checkpoint at ``step`` (to pick a step among those a run kept): its
    base (from ``recipe.yaml``) plus the trained weights of that checkpoint, the EMA weights when
    the run kept an EMA (as ``final/`` holds them), else the raw ones. A LoRA checkpoint is refused
    on a base other than the one the run trained on (:func:`recorded_base`), as :func:`load_run_model`
    refuses its final adapter.

    Args:
        path: the run directory.
        step: a step with a checkpoint (``train.checkpoint_every``; ``train.keep_checkpoints``
            of them are kept).
        merge: fold the LoRA adapter into the base weights.
        device: move the model there (default: where the model builder put it).
    """
    from safetensors.torch import load_file

    from opdkit.checkpoint import load_module_state
    from opdkit.registry import models
    from opdkit.rundir import RunDir
    from opdkit.training.trainable import ADAPTER, setup_trainable

    root = Path(path)
    recipe = read_run_recipe(root)
    kept = checkpoint_steps(root)
    if step not in kept:
        raise OpdkitError(f"{root}: no checkpoint at step {step} (kept: {', '.join(map(str, kept)) or 'none'})")
    directory = RunDir(root).checkpoint_dir(step)
    # the weights file is named after the trained module (opdkit.checkpoint); the EMA file holds
    # the same parameter names
    file = directory / "ema.safetensors"
    if not file.is_file():
        file = directory / "transformer.safetensors"
    if not file.is_file():
        raise OpdkitError(f"{directory}: neither ema.safetensors nor transformer.safetensors")
    model = models.build(recipe.model.type, recipe.model.builder_params())
    if device is not None:
        model.to(device=device)
    _add_sources(model, root / "recipe.yaml", file)
    lora = getattr(recipe.train, "lora", None)
    if lora is not None:  # a LoRA delta only means something on its base, as load_run_model's load_lora checks
        model.check_base(recorded_base(root), f"checkpoint {str(file)!r}")
    # LoRA: the adapter the trainer added, under the same parameter names; full fine-tuning
    # trained every parameter (no frozen reference copy needed here)
    names = setup_trainable(model, lora).names if lora is not None else [n for n, _ in model.transformer.named_parameters()]
    saved = load_file(str(file))
    if set(saved) != set(names):
        odd = sorted(set(saved) ^ set(names))
        raise OpdkitError(
            f"{file}: its {len(saved)} tensors do not match the run's {len(names)} trained parameters (first: {odd[0]})"
        )
    load_module_state(model.transformer, saved, file)
    model.transformer.requires_grad_(False)
    if lora is not None and merge:
        model.merge_lora(ADAPTER)
    return model


def recorded_base(path: str | Path) -> str | None:
    """The :meth:`~opdkit.models.adapters.LoraAdapters.base_fingerprint` of the base a run trained
    on: ``run.json``'s ``base_weights`` (taken at its start; ``--resume`` refuses another base), else
    its final adapter's; None when neither records one (a model without fingerprints)."""
    from opdkit.models.lora import read_metadata
    from opdkit.rundir import RunDir

    base = (RunDir(path).read_info() or {}).get("base_weights")
    if isinstance(base, str) and base != "unknown":
        return base
    adapter = Path(path) / FINAL / "lora.safetensors"
    return read_metadata(adapter).get("base_fingerprint") if adapter.is_file() else None


def _add_sources(model: FlowModel, *files: Path) -> None:
    """Add what a run puts on its base to the files the model came from (``FlowModel.sources``);
    a base of unknown origin (a custom model plug-in) leaves the whole unknown."""
    base = getattr(model, "sources", None)
    model.sources = [*base, *(f.resolve() for f in files)] if base else None


def load_run_model(path: str | Path, *, merge: bool = True, device: str | None = None) -> FlowModel:
    """The model a run trained: its base (from ``recipe.yaml``) plus its final weights.

    Args:
        path: the run directory.
        merge: fold a LoRA adapter into the base weights (else it stays attached as the active
            adapter named as in ``final.json``).
        device: move the model there (default: where the model builder put it).
    """
    from opdkit.checkpoint import load_module_state
    from opdkit.registry import models

    root = Path(path)
    recipe = read_run_recipe(root)
    info = final_info(root)
    model = models.build(recipe.model.type, recipe.model.builder_params())
    if device is not None:
        model.to(device=device)
    _add_sources(model, root / "recipe.yaml", root / FINAL)
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
    # full fine-tuning trains (and final/ stores) every parameter: one left out would silently
    # stay the base's
    load_module_state(model.transformer, load_file(str(file)), file, complete=True)
    return model
