"""Training checkpoints without pickle: module weights and optimizer state as safetensors, the rest JSON.

A checkpoint directory holds ``<module>.safetensors`` for every trained module (only the
parameters that require grad, so a LoRA run stores only its adapters), ``optimizer.safetensors``
(the optimizer's tensors, flattened as ``state.<param index>.<name>``) and ``trainer_state.json``
(step, optimizer hyper-parameters, anything JSON the trainer adds). All writes are atomic; the run
directory's ``latest.json`` is switched only after the whole directory is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError
from opdkit.rundir import atomic_write_json, save_safetensors_atomic

if TYPE_CHECKING:
    import torch


# Checkpoints committed to the repository and shipped in the wheel (shapes-base, shapes teachers).
COMMITTED_DIR = Path(__file__).resolve().parent / "checkpoints"


def resolve_weights_path(path: str | Path) -> Path:
    """A user path if it exists, else the committed checkpoint of that name (``shapes-teachers/ocr``)."""
    given = Path(path).expanduser()
    if given.exists():
        return given
    committed = COMMITTED_DIR / str(path)
    return committed if committed.exists() else given


def files_stamp(paths: list[Path]) -> str:
    """SHA-256 (16 hex) of what the file system says of ``paths`` and every file below them: path,
    size, inode, modification and change times.

    Equal stamps mean untouched files without reading them: writing a file, or replacing it (even
    with ``cp -p`` or ``rsync -t``, which set the modification time back), moves its change time,
    which no user can set. A missing path is stamped as missing.
    """
    import hashlib
    import time

    digest = hashlib.sha256()
    for root in paths:
        try:
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        except OSError:  # a folder that cannot be listed: never equal to a stamp taken when it could
            digest.update(f"{root}|unlisted|{time.time_ns()};".encode())
            continue
        for file in files:
            try:
                st = file.stat()
                digest.update(f"{file}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns};".encode())
            except OSError:
                digest.update(f"{file}|missing;".encode())
    return digest.hexdigest()[:16]


# path -> (files_stamp, tensors_sha256) of the files hashed by this process
_TENSOR_HASHES: dict[Path, tuple[str, str]] = {}


def tensors_sha256(path: str | Path) -> str:
    """SHA-256 (16 hex) of a safetensors file's tensors (names, dtypes, shapes and bytes), not of its
    metadata, whose key order varies between writes of the same weights.

    Remembered for this process while :func:`files_stamp` says the file is untouched: a study
    checks an OPD row's teachers several times per invocation, and a full SD3.5-M teacher is about
    5 GB to read (about 4 s at the 1.3 GB/s SHA-256 of this project's CPU).
    """
    file = Path(path).resolve()
    stamp = files_stamp([file])
    known = _TENSOR_HASHES.get(file)
    if known is not None and known[0] == stamp:
        return known[1]
    found = _hash_tensors(file)
    _TENSOR_HASHES[file] = (stamp, found)
    return found


def _hash_tensors(path: Path) -> str:
    import hashlib
    import struct

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            digest.update(json.dumps(header, sort_keys=True).encode())
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, struct.error, ValueError, AttributeError) as exc:  # AttributeError: a header not an object
        raise OpdkitError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    return digest.hexdigest()[:16]


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` that require grad (all of them for full fine-tuning)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def check_tensors_fit(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, Sequence[int]],
    source: str | Path,
    *,
    target: str,
    complete: bool = False,
) -> None:
    """Refuse tensors that would not fit where they are to be copied, in one line naming ``source``
    and the first offending tensor: a name ``expected`` (``target``'s shapes) lacks, a shape other
    than expected, or, with ``complete`` (a format that stores them all), an expected name missing.

    The shape check is what ``copy_`` does not do: it broadcasts, so a ``(1, n)`` tensor would
    overwrite every row of an ``(m, n)`` weight without a word.
    """
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise OpdkitError(f"{source}: {len(unknown)} tensors are not in {target} (first: {unknown[0]})")
    missing = sorted(set(expected) - set(tensors)) if complete else []
    if missing:
        raise OpdkitError(f"{source}: lacks {len(missing)} of the {len(expected)} tensors of {target} (first: {missing[0]})")
    for key in sorted(tensors):
        shape, wanted = tuple(tensors[key].shape), tuple(expected[key])
        if shape != wanted:
            raise OpdkitError(f"{source}: {key} has shape {shape}, {target} expects {wanted}")


def load_module_state(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path, *, complete: bool = False
) -> None:
    """Copy ``{parameter name: tensor}`` into ``module``'s parameters; unknown names, other shapes
    and, with ``complete``, missing parameters are refused first, in one line naming ``source``
    (:func:`check_tensors_fit`)."""
    import torch

    params = dict(module.named_parameters())
    check_tensors_fit(tensors, {k: p.shape for k, p in params.items()}, source, target="the model", complete=complete)
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def save_training_state(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write a complete checkpoint into ``directory`` (created)."""
    weights = {name: trainable_state_dict(module) for name, module in modules.items()}
    write_training_state(directory, weights, optimizer.state_dict() if optimizer is not None else None, state, extra_tensors)


def write_training_state(
    directory: str | Path,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict[str, Any] | None,
    state: dict[str, Any],
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write a checkpoint of tensors already at hand: ``weights`` (``{module: {parameter name:
    tensor}}``, full, unsharded) and an optimizer ``state_dict()`` (state by parameter index).
    A sharded run gathers both first (:func:`opdkit.training.fsdp.full_training_state`), so the
    files are the same whatever the number of processes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in weights.items():
        save_safetensors_atomic(tensors, directory / f"{name}.safetensors")
    for name, tensors in (extra_tensors or {}).items():
        save_safetensors_atomic(tensors, directory / f"{name}.safetensors")
    payload = dict(state)
    if optimizer_state is not None:
        tensors, groups = _flatten_optimizer(optimizer_state)
        save_safetensors_atomic(tensors, directory / "optimizer.safetensors")
        payload["optimizer_param_groups"] = groups
    atomic_write_json(directory / "trainer_state.json", payload)


def load_training_state(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, Any]:
    """Restore modules (strictly: every saved key must exist) and optimizer; return the JSON state."""
    weights, optimizer_state, state = read_training_state(directory, modules, with_optimizer=optimizer is not None)
    for name, module in modules.items():
        load_module_state(module, weights[name], Path(directory) / f"{name}.safetensors")
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return state


def read_training_state(
    directory: str | Path, modules: dict[str, torch.nn.Module], *, with_optimizer: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any] | None, dict[str, Any]]:
    """Read a checkpoint: ``({module: {parameter name: tensor}}, optimizer state_dict or None,
    JSON state)``, every saved parameter name checked against ``modules``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state_path = directory / "trainer_state.json"
    if not state_path.is_file():
        raise OpdkitError(f"{directory}: incomplete checkpoint (no trainer_state.json)")
    state = json.loads(state_path.read_text())
    weights = {}
    for name, module in modules.items():
        path = directory / f"{name}.safetensors"
        if not path.is_file():
            raise OpdkitError(f"{directory}: checkpoint lacks {path.name}")
        weights[name] = load_file(str(path))
        unknown = sorted(set(weights[name]) - {n for n, _ in module.named_parameters()})
        if unknown:
            raise OpdkitError(f"{path}: keys not in the model: {', '.join(unknown[:5])}")
    groups = state.pop("optimizer_param_groups", None)
    if not with_optimizer:
        return weights, None, state
    if groups is None:
        raise OpdkitError(f"{state_path}: no optimizer state")
    tensors = load_file(str(directory / "optimizer.safetensors"))
    return weights, _unflatten_optimizer(tensors, groups), state


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            import torch

            tensors[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    fixed = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": fixed}
