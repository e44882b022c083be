"""Fully sharded data parallelism (``train.fsdp``): parameters, gradients and AdamW state split
over the processes, for full fine-tuning of a transformer whose training state does not fit one
device.

Without it the loop replicates the model on every process and averages the gradients itself
(:func:`~opdkit.training.loop.average_gradients`). With it, and more than one process, the loop
calls torch's FSDP2 ``fully_shard`` on the process group accelerate created (gloo on CPUs, NCCL on
GPUs): each transformer block, then the whole trained module, and the frozen modules the method
names (the reference copy of GRPO's KL). Every parameter becomes a ``DTensor`` holding 1/N of its
rows; a forward all-gathers one block at a time and the backward reduce-scatters (averages) the
gradients, so the loop does not average them again. accelerate's own FSDP plug-in is not used:
it acts only on GPU launches and would wrap the model, while the loop keeps it unwrapped, and one
code path means the two-process CPU test covers what runs on GPUs.

Checkpoints stay in the one format of :mod:`opdkit.checkpoint`: every process takes part in
gathering the full (unsharded) weights and optimizer state, rank 0 writes them, and a resumed
run, with any number of processes, loads the full state and shards it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from opdkit.training.loop import Setup


def wanted(train: Any, world: int) -> bool:
    """Whether the run shards: ``train.fsdp`` set (GRPO and OPD have the key) and more than one
    process (one process has nothing to share the state with; it trains unsharded)."""
    return bool(getattr(train, "fsdp", False)) and world > 1


def shard(setup: Setup, device: torch.device) -> None:
    """``fully_shard`` the trained modules of ``setup`` and its frozen ones over every process.

    Each module's blocks (the items of the ``ModuleList`` children, e.g. diffusers'
    ``transformer_blocks``) are sharded units of their own, so a forward holds one whole block at
    a time; the rest of the module is the last unit. FSDP2 replaces the parameters with sharded
    ones under the same names: ``setup.params`` is refilled in place (a method's own copy of the
    list, such as :class:`~opdkit.training.trainable.Trainable`'s, sees the new ones).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    slot = {
        id(p): (key, name) for key, module in setup.modules.items() for name, p in module.named_parameters()
    }
    missing = [n for n, p in zip(setup.names, setup.params, strict=True) if id(p) not in slot]
    if missing:  # a method bug: FSDP can only shard what its modules own
        raise ValueError(f"train.fsdp: trained parameter {missing[0]} is not in the checkpointed modules")
    where = [slot[id(p)] for p in setup.params]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in [*setup.modules.values(), *setup.frozen]:
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
    named = {key: dict(module.named_parameters()) for key, module in setup.modules.items()}
    setup.params[:] = [named[key][name] for key, name in where]


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")  # a DTensor; duck-typed so plain runs never import it


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; a plain tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors (on the CPU where sharded); every process must call it for the same keys,
    in the same order (each sharded value is one all-gather). Plain values pass through."""
    return {k: v.full_tensor().cpu() if is_sharded(v) else v for k, v in tensors.items()}  # type: ignore[attr-defined]


def placed_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full ``value`` (the same on every process) laid out as ``like``: sharded the same way,
    or copied onto its device."""
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)  # type: ignore[attr-defined]
    return value.to(like.device, copy=True)


def largest_abs(params: Iterable[torch.Tensor], device: torch.device) -> float:
    """max |w| over every process's shards (non-finite as inf, so that one bad shard stops every
    process alike); one all-reduce."""
    import torch.distributed as dist

    maxima = [local(p).detach().abs().max().float() for p in params if local(p).numel()]
    largest = torch.stack(maxima).max() if maxima else torch.zeros((), device=device)
    largest = torch.where(torch.isfinite(largest), largest, torch.full_like(largest, float("inf")))
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global norm of the sharded gradients (every shard of every process), clipped to
    ``max_norm`` (None: measured only). Returns the norm before clipping, shape ()."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return norm.full_tensor() if is_sharded(norm) else norm  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# full state for checkpoints


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload: the gathered state lands on rank 0's CPU only, the others get empty dicts
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(holder: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (in ``holder``) of the optimizer's parameters, in the order its state indexes them."""
    name_of = {id(p): name for name, p in holder.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_training_state(
    modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Gather the trained parameters of ``modules`` (``{module: {name: tensor}}``) and the
    optimizer's ``state_dict()`` (by parameter index, as an unsharded optimizer writes it).
    Every process calls it; rank 0 gets the tensors on its CPU, the others empty dicts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    holder = torch.nn.ModuleDict(modules)
    flat: dict[str, Any] = get_model_state_dict(holder, options=_options())
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, module in modules.items():
        trained = [name for name, p in module.named_parameters() if p.requires_grad]
        weights[key] = {name: flat[f"{key}.{name}"] for name in trained if f"{key}.{name}" in flat}
    by_name: dict[str, Any] = get_optimizer_state_dict(holder, optimizer, options=_options())
    if not by_name:
        return weights, {}
    index = {name: i for i, name in enumerate(_param_names(holder, optimizer))}
    state = {index[name]: values for name, values in by_name["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def load_full_training_state(
    modules: dict[str, torch.nn.Module], weights: dict[str, dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
    optimizer_state: dict[str, Any] | None,
) -> None:  # fmt: skip
    """Shard full ``weights`` (``{module: {name: tensor}}``, the trained parameters) and a full
    optimizer ``state_dict()`` (by parameter index) into the sharded ``modules`` and ``optimizer``.
    Every process calls it with the same full state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    holder = torch.nn.ModuleDict(modules)
    options = StateDictOptions(full_state_dict=True, strict=False)  # only trained parameters are stored
    flat: dict[str, Any] = {
        f"{key}.{name}": v for key, tensors in weights.items() for name, v in tensors.items()
    }
    set_model_state_dict(holder, flat, options=options)
    if optimizer_state is None:
        return
    names = _param_names(holder, optimizer)
    by_name: dict[str, Any] = {
        "state": {names[int(i)]: values for i, values in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(holder, optimizer, by_name, options=options)
