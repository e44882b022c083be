"""Teachers of on-policy distillation, on the student's one shared base.

LoRA teachers are named adapters on the base the student trains on (K teachers cost K
adapters, not K models), switched per sub-batch; ``full`` teachers are separate transformers run
on the student's prompt embeddings; ``base`` is the student's reference (adapters off, or the
frozen copy of a full fine-tune). :func:`acting_as` makes the model compute one of them;
:func:`routed_teacher_means` gives, for a micro-batch of stored states, each row's transition
mean under the teacher it was routed to.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opdkit.errors import OpdkitError, prefixed
from opdkit.registry import teachers
from opdkit.training.trainable import ADAPTER, Trainable

if TYPE_CHECKING:
    from opdkit.recipe import TeacherSpec
    from opdkit.training.rollout import Rollout

# The name a regularizer uses for the base model as its anchor.
BASE = "base"


@dataclass
class Teacher:
    """A loaded teacher. ``adapter``: its LoRA adapter name on the shared base (kind ``lora``);
    ``transformer``: a separate transformer (kind ``full``); neither: the base (kind ``base``)."""

    name: str
    kind: str
    adapter: str | None = None
    transformer: Any = None
    lora_path: Path | None = None


def load_teachers(model: Any, specs: list[TeacherSpec], device: Any, where: Any = None) -> dict[str, Teacher]:
    """Build every teacher plug-in and load its weights beside the student on the shared base.

    ``where(section, index)`` (a LoadedRecipe's) names the recipe line of a teacher that fails.
    """
    loaded: dict[str, Teacher] = {}
    for i, spec in enumerate(specs):
        with prefixed(where("teachers", i) if where is not None else f"teachers.{i}"):
            loaded[spec.name] = _load_teacher(model, spec, device)
    return loaded


def _load_teacher(model: Any, spec: TeacherSpec, device: Any) -> Teacher:
    source = teachers.build(spec.type, spec.builder_params())
    kind = getattr(source, "kind", None)
    if kind == "lora":
        path = adapter_file(source.path)
        adapter = f"teacher_{spec.name}"
        model.load_lora(path, adapter)
        return Teacher(spec.name, "lora", adapter=adapter, lora_path=path)
    if kind == "full":
        from opdkit.models.loading import load_transformer

        # the teacher's transformer runs on the student's prompt embeddings: its text
        # encoders and VAE are never used, so they are not loaded
        transformer = load_transformer(source.path, dtype=model.dtype, device=device)
        transformer.eval().requires_grad_(False)
        return Teacher(spec.name, "full", transformer=transformer)
    if kind == "base":
        return Teacher(spec.name, "base")
    raise OpdkitError(f"teacher {spec.name!r}: plug-in {spec.type!r} returned {source!r}, not a TeacherSource")


def teacher_weights(specs: list[TeacherSpec]) -> dict[str, str]:
    """``name -> sha256`` (16 hex) of the tensors of each teacher loaded from a local path.

    A run records them at its start, so that resuming may find a teacher at another path (a study
    folder moved, or ``--out`` spelled another way) and still know it for the same weights. A
    teacher whose weights cannot be found here is left out: loading it reports why.
    """
    from opdkit.checkpoint import tensors_sha256

    found: dict[str, str] = {}
    for spec in specs:
        try:
            source = teachers.build(spec.type, spec.builder_params())
            kind, path = getattr(source, "kind", None), getattr(source, "path", None)
            if kind == "lora":
                files = [adapter_file(path)]
            elif kind == "full" and path is not None and Path(path).is_dir():
                # the transformer alone: a full teacher never runs its text encoders or VAE
                root = Path(path) / "transformer" if (Path(path) / "transformer").is_dir() else Path(path)
                files = sorted(root.rglob("*.safetensors"))
            else:
                continue
        except OpdkitError:
            continue
        if files:
            digest = hashlib.sha256()
            for file in files:
                digest.update(f"{file.name}:{tensors_sha256(file)};".encode())
            found[spec.name] = digest.hexdigest()[:16]
    return found


def adapter_file(path: Path | None) -> Path:
    """A GRPO run directory (its final adapter) or an adapter file."""
    if path is None:
        raise OpdkitError("a lora teacher needs a path (run directory or adapter file)")
    from opdkit.models.lora import find_adapter
    from opdkit.rundir import refuse_a_run_in_training
    from opdkit.runs import final_lora_path, is_run_dir

    if not is_run_dir(path):
        return find_adapter(path)
    refuse_a_run_in_training(Path(path), str(path), "use it when that training ends")
    return final_lora_path(path)


@contextlib.contextmanager
def acting_as(model: Any, teacher: Teacher | None, trainable: Trainable) -> Iterator[None]:
    """Inside the block the model computes ``teacher`` (None or ``base``: the base model).

    The base is ``trainable``'s reference policy, as GRPO's KL sees it: adapters off for a LoRA
    student, the frozen copy for a full fine-tune (whose live transformer is the student).
    """
    if teacher is None or teacher.kind == "base":
        with trainable.reference(model):
            yield
    elif teacher.kind == "lora":
        model.set_adapter(teacher.adapter)
        try:
            yield
        finally:
            model.set_adapter(ADAPTER)  # peft makes the active adapter the trainable one
    else:
        student = model.transformer
        model.transformer = teacher.transformer
        try:
            yield
        finally:
            model.transformer = student


def teacher_samples(
    model: Any, trainable: Trainable, loaded: dict[str, Teacher], routes: list[str], cond: Any, seeds: list[int],
    sampler: Any, *, micro_batch: int,
) -> torch.Tensor:
    """Image ``i`` drawn by teacher ``routes[i]`` from seed ``seeds[i]`` with the Euler sampler (the
    recipe's steps, CFG, shift and resolution), batched per teacher, no grad. (N, C, h, w) float32."""
    from opdkit.sampling import sample_ode

    x0: torch.Tensor | None = None
    for name, teacher in loaded.items():
        index = torch.tensor([i for i, r in enumerate(routes) if r == name], dtype=torch.long)
        for chunk in index.split(micro_batch) if len(index) else ():
            with torch.no_grad(), acting_as(model, teacher, trainable):
                images = sample_ode(
                    model, steps=sampler.steps, cfg=sampler.cfg, shift=sampler.shift, resolution=sampler.resolution,
                    seed=[seeds[int(i)] for i in chunk], cond=cond[chunk],
                    uncond=model.uncond(len(chunk)) if sampler.cfg != 1.0 else None,
                )  # fmt: skip
            if x0 is None:
                x0 = torch.empty((len(routes), *images.shape[1:]), dtype=images.dtype, device=images.device)
            x0[chunk] = images
    if x0 is None:
        raise OpdkitError("init.sft: no prompt was routed to a teacher")
    return x0


def frozen_means(
    model: Any, trainable: Trainable, batch: Rollout, teacher: Teacher | None, t: int, index: torch.Tensor
) -> torch.Tensor:
    """Transition means of ``teacher`` (None: the base) at stored states ``batch.states[t, index]``.

    One CFG-batched forward, no grad. Returns (len(index), C, h, w) float32.
    """
    from opdkit.sampling import guided_velocity, sde_step_with_logprob

    with torch.no_grad():
        x = batch.states[t, index]
        uncond = model.uncond(len(index)) if batch.cfg != 1.0 else None
        with acting_as(model, teacher, trainable):
            v = guided_velocity(model, x, batch.sigmas[t], batch.cond[index], uncond, batch.cfg)
        step = sde_step_with_logprob(
            x, v, batch.sigmas[t], batch.sigmas[t + 1], batch.noise_level, prev_sample=batch.states[t + 1, index]
        )
    return step.mean.float()


def routed_teacher_means(
    model: Any, trainable: Trainable, batch: Rollout, t: int, rows: slice, routes: list[str],
    loaded_teachers: dict[str, Teacher],
) -> torch.Tensor:
    """mu_teacher(x_t) for rows ``rows``, each row from its routed teacher: one batched forward per
    teacher over the rows routed to it (adapters switched per sub-batch). (n, C, h, w) float32."""
    out = torch.empty(batch.states[t, rows].shape, dtype=torch.float32, device=batch.states.device)
    for name, teacher in loaded_teachers.items():
        index = torch.tensor([i for i in range(rows.start, rows.stop) if routes[i] == name], dtype=torch.long)
        if len(index):
            out[index - rows.start] = frozen_means(model, trainable, batch, teacher, t, index)
    return out

