"""opdkit's LoRA file format: the one definition of what an adapter file holds and how it is read.

An adapter file is a safetensors file with, for every adapted linear layer ``<module>`` of the
transformer (a dotted path such as ``transformer_blocks.0.attn.to_q``):

* ``<module>.lora_A.weight``: A, ``(r, in)`` float32;
* ``<module>.lora_B.weight``: B, ``(out, r)`` float32;

so the layer's weight changes by ``delta = (alpha / r) * B @ A``, ``(out, in)``. These are the
key names of peft's ``get_peft_model_state_dict`` for a LoRA adapter (the adapter's name
stripped), so the model adapter hands them to peft unchanged. The safetensors metadata (all
strings) holds:

* ``format``: ``"opdkit-lora/1"`` (files without it are refused);
* ``base_fingerprint``: the base transformer the adapter was trained on (written by the model
  adapter, kept by a merge of adapters of that base; see ``FlowModel.base_fingerprint``);
* ``rank``, ``alpha``, ``dropout``: the LoRA config, written with ``str()`` of the value given;
* ``target_modules``: the JSON list (sorted) of the module-name suffixes peft adapted.

Used by :class:`~opdkit.models.flow_model.FlowModel` (``save_lora`` / ``load_lora``) and by
:mod:`opdkit.models.merge` (cold-start merging of teachers); OPD reads teacher adapters here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    import torch

LORA_FORMAT = "opdkit-lora/1"
# tensor names of a module's factors in a file: MODULE + A_SUFFIX, MODULE + B_SUFFIX
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


@dataclass
class LoraFile:
    """A LoRA adapter in memory: A/B factors per adapted module, scale ``alpha / rank``.

    Attributes:
        factors: module path -> (A ``(r, in)``, B ``(out, r)``), any float dtype (written as
            float32).
        rank: r. An int, written as ``str(rank)``.
        alpha: LoRA alpha, written as ``str(alpha)`` (the model adapter writes peft's value, an
            int unless it loaded a fractional one; a merge writes a float; read back as float).
        target_modules: the module-name suffixes adapted (peft's ``target_modules``).
        dropout: LoRA dropout the adapter was trained with.
        base_fingerprint: the base transformer it was trained on (a merge keeps its inputs'), or None.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float
    target_modules: list[str]
    dropout: float = 0.0
    base_fingerprint: str | None = None

    @property
    def scale(self) -> float:
        """``alpha / rank``: what ``B @ A`` is multiplied by."""
        return self.alpha / self.rank

    def delta(self, module: str) -> torch.Tensor:
        """``(out, in)`` weight change of one module, float64."""
        a, b = self.factors[module]
        return self.scale * (b.double() @ a.double())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors ``{<module>.lora_A.weight: A, <module>.lora_B.weight: B}``, float32.

        This is also the state dict peft's ``set_peft_model_state_dict`` takes for one adapter.
        """
        out: dict[str, torch.Tensor] = {}
        for module, (a, b) in self.factors.items():
            out[module + A_SUFFIX] = a.float()
            out[module + B_SUFFIX] = b.float()
        return out

    def metadata(self) -> dict[str, str]:
        """The file's safetensors metadata (see the module docstring)."""
        meta = {"format": LORA_FORMAT}
        if self.base_fingerprint is not None:
            meta["base_fingerprint"] = self.base_fingerprint
        meta.update(
            rank=str(self.rank),
            alpha=str(self.alpha),
            dropout=str(self.dropout),
            target_modules=json.dumps(sorted(self.target_modules)),
        )
        return meta


def split_factors(
    tensors: dict[str, torch.Tensor], source: str | Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{<module>.lora_A.weight, <module>.lora_B.weight}`` -> ``{module: (A, B)}``.

    ``source`` names the file (or state dict) in errors. Every tensor must be one factor of a
    complete pair.
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(A_SUFFIX):
            module = key[: -len(A_SUFFIX)]
            b_key = module + B_SUFFIX
            if b_key not in tensors:
                raise OpdkitError(f"{source}: {key} has no matching {b_key}")
            factors[module] = (tensors[key], tensors[b_key])
        elif not key.endswith(B_SUFFIX):
            raise OpdkitError(f"{source}: {key} is not a LoRA factor (<module>.lora_A/lora_B.weight)")
        elif key[: -len(B_SUFFIX)] + A_SUFFIX not in tensors:
            raise OpdkitError(f"{source}: {key} has no matching {key[: -len(B_SUFFIX)] + A_SUFFIX}")
    if not factors:
        raise OpdkitError(f"{source}: holds no lora_A/lora_B weights")
    return factors


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``path`` (empty when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise OpdkitError(f"{path}: not a readable safetensors file: {type(exc).__name__}") from None


def is_lora_file(path: str | Path) -> bool:
    """True for a readable safetensors file whose metadata says it is in this format."""
    return read_metadata(path).get("format") == LORA_FORMAT


def find_adapter(path: str | Path) -> Path:
    """An adapter file as given, or the adapter of a training run directory.

    In a directory, the first file in this format among ``final/*.safetensors`` then
    ``*.safetensors`` (each in name order).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = sorted(path.glob("final/*.safetensors")) + sorted(path.glob("*.safetensors"))
        for candidate in candidates:
            if is_lora_file(candidate):
                return candidate
        raise OpdkitError(f"{path}: no opdkit LoRA adapter (final/*.safetensors) in this directory")
    raise OpdkitError(f"{path}: no such adapter file or run directory")


def read_lora(path: str | Path, *, device: str | torch.device = "cpu") -> LoraFile:
    """Read an adapter file (or a run directory's adapter, see :func:`find_adapter`).

    Tensors are loaded onto ``device`` in their stored dtype.
    """
    from safetensors.torch import load_file

    path = find_adapter(path)
    meta = read_metadata(path)
    if meta.get("format") != LORA_FORMAT:
        raise OpdkitError(f"{path}: not an opdkit LoRA file (metadata format {meta.get('format')!r})")
    missing = [key for key in ("rank", "alpha", "target_modules") if key not in meta]
    if missing:
        raise OpdkitError(f"{path}: LoRA metadata lacks {', '.join(missing)}")
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:
        raise OpdkitError(f"{path}: cannot read its tensors: {type(exc).__name__}") from None
    return LoraFile(
        split_factors(tensors, path),
        int(meta["rank"]),
        float(meta["alpha"]),
        json.loads(meta["target_modules"]),
        float(meta.get("dropout", 0.0)),
        meta.get("base_fingerprint"),
    )


def write_lora(lora: LoraFile, path: str | Path) -> Path:
    """Write ``lora`` in this format, atomically (the parent directory is created)."""
    from opdkit.rundir import save_safetensors_atomic

    save_safetensors_atomic(lora.tensors(), path, metadata=lora.metadata())
    return Path(path)
