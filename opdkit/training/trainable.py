"""What is trained and against what: LoRA or full fine-tuning, the reference policy, the EMA.

:func:`setup_trainable` makes the policy trainable (a peft LoRA adapter named :data:`ADAPTER`, or
the whole transformer); :class:`Trainable` knows its parameters and how to run the reference
(adapters off, or a frozen copy); :class:`EMA` keeps the averaged weights that get evaluated.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    from opdkit.recipe import LoraSpec

# Name of the trained LoRA adapter on the policy's transformer.
ADAPTER = "default"


@dataclass
class Trainable:
    """What is trained and how to run the reference policy.

    Attributes:
        names: parameter names (in ``model.transformer.named_parameters()``), aligned with
            ``params``.
        params: the trained parameters (LoRA adapter weights, or the whole transformer).
        lora: True for a LoRA run (adapter :data:`ADAPTER`), False for full fine-tuning.
        frozen: full fine-tuning only: a frozen copy of the initial transformer (the reference).
    """

    names: list[str]
    params: list[torch.nn.Parameter]
    lora: bool
    frozen: Any | None = None

    @contextlib.contextmanager
    def reference(self, model: Any) -> Iterator[None]:
        """Inside the block the model computes the reference policy (the base model).

        LoRA: adapters disabled. Full fine-tuning: the frozen copy is swapped in.
        """
        if self.lora:
            with model.adapters_disabled():
                yield
            return
        trained = model.transformer
        model.transformer = self.frozen
        try:
            yield
        finally:
            model.transformer = trained

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``name -> tensor`` (detached views) of the trained parameters."""
        return {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}


def setup_trainable(model: Any, lora: LoraSpec | None, gradient_checkpointing: bool = False) -> Trainable:
    """Make the policy trainable: add a LoRA adapter (peft) or unfreeze the whole transformer.

    Text encoders and VAE stay frozen. LoRA's ``A`` is drawn from the global torch RNG (seed it
    first); ``B`` starts at zero, so the policy starts equal to the reference.
    ``gradient_checkpointing`` switches on diffusers' per-block activation recomputation (it
    acts only in forwards that record a graph; no-grad rollouts are unchanged).
    """
    transformer = model.transformer
    transformer.requires_grad_(False)
    if gradient_checkpointing:
        if not hasattr(transformer, "enable_gradient_checkpointing"):
            raise OpdkitError(f"train.gradient_checkpointing: {type(transformer).__name__} does not support it")
        transformer.enable_gradient_checkpointing()
    if lora is not None:
        if not float(lora.alpha).is_integer():
            raise OpdkitError(f"train.lora.alpha must be a whole number (adapter files store it so), got {lora.alpha}")
        # no targets in the recipe: the model family's own (its adapter's lora_targets)
        targets = list(lora.targets) if lora.targets is not None else list(model.lora_targets)
        try:
            model.add_lora(ADAPTER, rank=lora.rank, alpha=int(lora.alpha), target_modules=targets, dropout=lora.dropout)
        except ValueError as exc:  # peft: no module matched the targets
            first = str(exc).strip().splitlines()[0]
            raise OpdkitError(f"train.lora.targets {targets} matched no module of the transformer ({first})") from None
        model.set_adapter(ADAPTER)
        named = [(n, p) for n, p in transformer.named_parameters() if "lora_" in n and f".{ADAPTER}." in n + "."]
        if not named:
            raise OpdkitError(f"train.lora.targets {targets} matched no module of the transformer")
        for _, p in named:
            p.requires_grad_(True)
        return Trainable([n for n, _ in named], [p for _, p in named], lora=True)
    dtype = next(transformer.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):
        warnings.warn(
            f"full fine-tuning of a {str(dtype).removeprefix('torch.')} transformer: AdamW steps below 1/256 "
            "of a weight round away; load the model in float32 and set train.precision instead",
            stacklevel=2,
        )
    frozen = copy.deepcopy(transformer).eval().requires_grad_(False)
    transformer.requires_grad_(True)
    named = list(transformer.named_parameters())
    return Trainable([n for n, _ in named], [p for _, p in named], lora=False, frozen=frozen)


class EMA:
    """Exponential moving average of parameters, updated every ``every`` optimizer steps.

    ``shadow <- decay * shadow + (1 - decay) * param`` on optimizer steps that are multiples of
    ``every`` (Flow-OPD: decay 0.9 every 8 steps). The shadow is what gets evaluated.
    ``warmup`` lowers the decay over the first steps (:meth:`decay_at`).
    """

    def __init__(
        self, names: Sequence[str], params: Sequence[torch.nn.Parameter], decay: float, every: int, warmup: bool = False
    ) -> None:
        self.names = list(names)
        self.decay = float(decay)
        self.every = int(every)
        self.warmup = warmup
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter], optimizer_step: int) -> bool:
        """Fold the parameters in if ``optimizer_step`` (1-based) is a multiple of ``every``."""
        if optimizer_step % self.every:
            return False
        decay = self.decay_at(optimizer_step)
        for shadow, p in zip(self.shadow, params, strict=True):
            shadow.lerp_(p.detach().float(), 1.0 - decay)
        return True

    def decay_at(self, optimizer_step: int) -> float:
        """The decay used at ``optimizer_step``: with ``warmup``, ``min(decay, (1 + n) / (10 + n))``
        (flow_grpo's and diffusers' warm-up), so the first averages do not keep a random init."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + optimizer_step) / (10.0 + optimizer_step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise OpdkitError(f"EMA state lacks {len(missing)} parameters (first: {missing[0]})")
        from opdkit.training.fsdp import placed_like

        # onto the device of the weights (a checkpoint loads on the CPU; training may run on a GPU),
        # sharded as they are under train.fsdp
        self.shadow = [placed_like(state[n].detach().float(), old) for n, old in zip(self.names, self.shadow, strict=True)]

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into ``params`` (restored on exit)."""
        saved = [p.detach().clone() for p in params]
        for p, shadow in zip(params, self.shadow, strict=True):
            p.copy_(shadow)
        try:
            yield
        finally:
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)




def parameters_sha256(params: Sequence[torch.Tensor]) -> str:
    """Hex SHA-256 of the parameters' bytes (to compare weights across ranks or runs)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


