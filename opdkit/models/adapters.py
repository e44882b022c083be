"""LoRA adapters on a flow model's transformer (peft): add, switch, disable, save, load, merge.

:class:`LoraAdapters` is the part of :class:`~opdkit.models.flow_model.FlowModel` that manages
named peft adapters on ``self.transformer``; adapter files are read and written in the one
format of :mod:`opdkit.models.lora`. A file records the fingerprint of the base it was trained
on (:meth:`LoraAdapters.base_fingerprint`) and is refused on another base.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opdkit.errors import OpdkitError
from opdkit.models.lora import A_SUFFIX, B_SUFFIX, LoraFile, read_lora, split_factors, write_lora

# The attention projections flow_grpo adapts on SD3 (joint attention: image and text streams).
SD3_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# The attention projections of the image stream only: the shapes-world model's default (what its
# shipped recipes and committed teachers were trained with).
ATTENTION_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class LoraAdapters:
    """Named LoRA adapters on ``self.transformer`` (a diffusers model with peft support).

    Attributes:
        transformer: the adapted model, set by the class this is mixed into.
    """

    transformer: Any
    lora_targets: tuple[str, ...] = SD3_LORA_TARGETS  # what add_lora adapts by default
    _base_fingerprint: str | None = None  # cache of base_fingerprint(); None after a merge

    def add_lora(
        self,
        name: str = "default",
        *,
        rank: int = 32,
        alpha: float = 64,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        init_lora_weights: Any = "gaussian",
    ) -> None:
        """Add a LoRA adapter ``name`` to the transformer and make it the active one.

        ``init_lora_weights="gaussian"`` (flow_grpo's choice) starts B at zero, so a fresh
        adapter leaves the model unchanged. peft marks only adapter weights trainable.
        ``target_modules`` defaults to the family's :attr:`lora_targets`.

        The adapter weights are float32 whatever the base dtype: on a bf16/fp16 base, peft would
        create them in the base's dtype, where AdamW's small updates round away (bf16 keeps 8
        mantissa bits: an update below 1/256 of a weight is lost). peft's LoRA layers cast their
        input to the adapter's dtype and the result back, so a bf16 base with fp32 adapters is
        the usual memory-saving setup, not a mixed-dtype error.
        """
        from peft import LoraConfig

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(self.lora_targets if target_modules is None else target_modules),
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
        )
        with warnings.catch_warnings():
            # peft warns on every second adapter; several named adapters are intended here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.transformer.add_adapter(config, adapter_name=name)
        for param in self.lora_parameters(name):
            if param.dtype != torch.float32:
                param.data = param.data.float()

    def lora_names(self) -> list[str]:
        """Names of the adapters attached to the transformer."""
        return list(getattr(self.transformer, "peft_config", {}) or {})

    def set_adapter(self, name: str | list[str]) -> None:
        """Activate adapter(s) ``name``; peft makes the active ones trainable, the others frozen."""
        self.transformer.set_adapter(name)

    def active_adapters(self) -> list[str]:
        active = self.transformer.active_adapters() if self.lora_names() else []
        return [active] if isinstance(active, str) else list(active or [])

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model (e.g. the GRPO reference policy) inside the block.

        On exit the previously active adapters are enabled again (and made trainable again).
        Without adapters this is a no-op.
        """
        if not self.lora_names():
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def lora_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of adapter ``name`` (all adapters when None), in module order."""
        wanted = f".{name}." if name is not None else None
        return [
            p
            for n, p in self.transformer.named_parameters()
            if "lora_" in n and (wanted is None or wanted in n + ".")
        ]

    def base_fingerprint(self) -> str:
        """Short SHA-256 of the base transformer weights (adapters excluded), cached.

        Saved in every LoRA file and checked when one is loaded: a LoRA delta only means something
        on the base it was trained on. Hashes each tensor's name, shape and up to 4,096 of its
        first and last values rounded to bf16, so it costs milliseconds even for SD3.5-M and
        agrees between an fp32 and a bf16 copy of the same weights. A study remembers it in
        ``OUT/model_facts.json``: bump ``opdkit.study._FACTS_FORMAT`` when what it hashes changes.
        """
        if self._base_fingerprint is not None:
            return self._base_fingerprint
        self._base_fingerprint = _sampled_digest(self.transformer, exact=False)
        return self._base_fingerprint

    def check_base(self, fingerprint: str | None, source: str) -> None:
        """Refuse weights trained on another base, in one line naming ``source``.

        ``fingerprint`` is the :meth:`base_fingerprint` the weights recorded (None: not recorded, as
        in a merged adapter, and accepted). Every way trained weights reach this base goes through
        here (:meth:`load_lora`, OPD's cold start, a run's checkpoint), so they refuse alike.
        """
        if fingerprint is not None and fingerprint != self.base_fingerprint():
            raise OpdkitError(
                f"{source} was trained on another base model (base fingerprint {fingerprint}, "
                f"this base {self.base_fingerprint()}); retrain it on this base"
            )

    def check_lora_fits(self, lora: LoraFile, source: str, name: str | None = None) -> None:
        """Refuse, in one line naming ``source``, an adapter that cannot go onto this transformer:
        one trained on another base (:meth:`check_base`), or a factor of another shape than the
        layer it adapts takes (peft would raise a many-line RuntimeError halfway through the load).

        A factor must be A ``(r, in)`` and B ``(out, r)`` for its layer's ``in``/``out`` and the
        file's rank ``r``; into an existing adapter ``name``, exactly that adapter's factors, on the
        layers it adapts.
        """
        from opdkit.checkpoint import check_tensors_fit

        self.check_base(lora.base_fingerprint, source)
        expected: dict[str, tuple[int, ...]] = {}
        if name is not None and name in self.lora_names():
            target = f"adapter {name!r}"
            for path, layer in self.transformer.named_modules():
                if name in getattr(layer, "lora_A", {}):
                    expected[path + A_SUFFIX] = tuple(layer.lora_A[name].weight.shape)
                    expected[path + B_SUFFIX] = tuple(layer.lora_B[name].weight.shape)
        else:
            target = "this transformer"
            for path in lora.factors:
                try:
                    layer = self.transformer.get_submodule(path)
                except AttributeError:  # not a layer of this transformer: refused as unknown below
                    continue
                base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                weight = getattr(base, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.ndim == 2:  # a linear layer: (out, in)
                    expected[path + A_SUFFIX] = (lora.rank, weight.shape[1])
                    expected[path + B_SUFFIX] = (weight.shape[0], lora.rank)
        check_tensors_fit(lora.tensors(), expected, source, target=target)

    def weights_fingerprint(self) -> str:
        """Short SHA-256 of the weights as they generate now: every tensor (adapters included), the
        same sample as :meth:`base_fingerprint` but in the tensor's own dtype, not rounded.

        What an eval's results record (``weights_exact`` in ``BENCH.settings.json``): a short LoRA
        run can move no sampled weight by a bf16 step, so the rounded fingerprint calls it its
        base, yet it draws other images. Not cached: it costs milliseconds and the weights change
        while a model trains.
        """
        return _sampled_digest(self.transformer, exact=True)

    def save_lora(self, name: str, path: str | Path) -> Path:
        """Save adapter ``name`` in opdkit's LoRA format, atomically; returns the path.

        The file's metadata records the adapter's peft config and :meth:`base_fingerprint`.
        """
        from peft.utils import get_peft_model_state_dict

        if name not in self.lora_names():
            raise OpdkitError(
                f"no LoRA adapter named {name!r} (have: {', '.join(self.lora_names()) or 'none'})"
            )
        config = self.transformer.peft_config[name]
        state = get_peft_model_state_dict(self.transformer, adapter_name=name)
        lora = LoraFile(
            split_factors({k: v.detach() for k, v in state.items()}, f"adapter {name!r}"),
            rank=config.r,
            alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            dropout=config.lora_dropout,
            base_fingerprint=self.base_fingerprint(),
        )
        return write_lora(lora, path)

    def load_lora(self, path: str | Path, name: str = "default") -> str:
        """Load a LoRA file (see :meth:`save_lora`) as adapter ``name`` (created if absent).

        Returns the adapter name. The adapter becomes the active one. An adapter this creates has no
        dropout, whatever the file's training used: a loaded adapter is consulted (a teacher, an
        evaluated run), and OPD computes its teachers inside the student's training-mode forwards.
        """
        from peft.utils import set_peft_model_state_dict

        file = Path(path)
        if not file.is_file():
            raise OpdkitError(f"LoRA file {str(file)!r} does not exist")
        lora = read_lora(file, device=next(self.transformer.parameters()).device)
        self.check_lora_fits(lora, f"LoRA file {str(file)!r}", name)
        have = self.transformer.peft_config[name].lora_alpha if name in self.lora_names() else lora.alpha
        if have != lora.alpha:  # an existing adapter keeps its own scale alpha / r: another delta
            raise OpdkitError(
                f"LoRA file {str(file)!r} has alpha {lora.alpha:g}, but adapter {name!r} has alpha {have:g}; "
                "load it under a new name"
            )
        if name not in self.lora_names():
            self.add_lora(
                name,
                rank=lora.rank,
                # exact: peft scales by lora_alpha / r with any number, and int() would turn a
                # foreign file's alpha 6.5 into 6 (another delta); a whole one stays an int, so a
                # re-saved file's metadata reads "16", as before
                alpha=int(lora.alpha) if lora.alpha.is_integer() else lora.alpha,
                dropout=0.0,
                target_modules=lora.target_modules,
            )
        result = set_peft_model_state_dict(self.transformer, lora.tensors(), adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise OpdkitError(
                f"LoRA file {str(file)!r} does not fit this transformer: {len(unexpected)} unexpected keys "
                f"(first: {unexpected[0]})"
            )
        self.set_adapter(name)
        return name

    def merge_lora(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights and remove it (e.g. to export a model)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name not in self.lora_names():
            raise OpdkitError(
                f"no LoRA adapter named {name!r} (have: {', '.join(self.lora_names()) or 'none'})"
            )
        for module in self.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[name])
        active = self.active_adapters()
        remaining = [n for n in self.lora_names() if n != name]
        if remaining and name in active:
            # peft would switch to another adapter itself, with a warning; say which one here
            self.set_adapter([n for n in active if n != name] or remaining[0])
        self.transformer.delete_adapters(name)
        if not self.lora_names():
            self._unwrap_lora_layers()
        self._base_fingerprint = None  # the base weights changed

    def _unwrap_lora_layers(self) -> None:
        """Put each peft wrapper's base layer back in its place once no adapter is left.

        peft keeps the empty wrappers after the last adapter is deleted; their weights would be
        saved as ``<module>.base_layer.weight``, which a plain transformer does not load.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.transformer.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.transformer.get_submodule(parent_name) if parent_name else self.transformer
                setattr(parent, child, module.get_base_layer())


def _sampled_digest(transformer: nn.Module, *, exact: bool) -> str:
    """16 hex digits of SHA-256 over each parameter's name, shape and up to 4,096 of its first and
    last values: the base weights rounded to bf16 (``exact=False``: adapters skipped, peft's
    ``base_layer.`` dropped from names, so a bare and an adapted model agree), or every parameter
    in its own dtype (``exact=True``)."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in transformer.named_parameters():
        if not exact and "lora_" in name:
            continue
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:2048], flat[-2048:]]) if flat.numel() > 4096 else flat
        digest.update((name if exact else name.replace("base_layer.", "")).encode())
        digest.update(str(tuple(p.shape)).encode())
        if exact:
            digest.update(str(p.dtype).encode())
            # bf16 has no numpy dtype: hash the bytes through a same-width integer view
            digest.update(sample.cpu().contiguous().view(_SAME_WIDTH_INT[sample.element_size()]).numpy().tobytes())
        else:
            digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
