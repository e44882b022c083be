"""Model plug-ins of the shapes world: the committed pretrained base and fresh (untrained) models.

Both go through the same loader as SD3.5-M (:func:`opdkit.models.flow_model.load_flow_model`):
the shapes model is an ``SD3Transformer2DModel`` in pixel space with a tiny CLIP text encoder,
saved in the diffusers pipeline layout.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from opdkit.errors import OpdkitError
from opdkit.registry import models

if TYPE_CHECKING:
    from opdkit.models.flow_model import FlowModel

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHAPES_BASE = "shapes-base"


def shapes_vocabulary() -> list[str]:
    """Every word the shapes prompt generator can write outside quotes (sorted, lower-case)."""
    from opdkit.shapes.prompts import ALL_TAGS, enumerate_prompts

    words: set[str] = set()
    for tag in ALL_TAGS:
        for record in enumerate_prompts(tag):
            outside = re.sub(r'"[^"]*"', " ", record["prompt"])
            words.update(w.lower() for w in re.findall(r"\w+", outside))
    return sorted(words)


def checkpoint_path(name: str) -> Path:
    """Directory of a committed checkpoint (e.g. ``shapes-base``)."""
    return CHECKPOINTS_DIR / name


@models.register("shapes")
def shapes(path: str | None = None, dtype: str = "float32", device: str = "cpu") -> FlowModel:
    """The shapes-world model: the committed pretrained base, or a shapes pipeline at ``path``."""
    from opdkit.models.flow_model import load_flow_model, parse_dtype

    where = Path(path).expanduser() if path is not None else checkpoint_path(SHAPES_BASE)
    if not (where / "model_index.json").is_file():
        hint = " (run `opdkit train shapes/pretrain` to make it)" if path is None else ""
        raise OpdkitError(f"shapes model: no pipeline at {str(where)!r}{hint}")
    return load_flow_model(where, dtype=parse_dtype(dtype), device=device, world="shapes")


models.add(SHAPES_BASE, shapes)


@models.register("shapes_new")
def shapes_new(
    seed: int = 0,
    resolution: int = 32,
    patch_size: int = 2,
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int = 32,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_projection_dim: int = 64,
    max_prompt_tokens: int = 24,
    shift: float = 3.0,
) -> FlowModel:
    """A fresh, untrained shapes-world model (for ``method: pretrain``), built from its config."""
    from opdkit.models.flow_model import load_flow_model
    from opdkit.models.tiny import ShapesModelConfig, build_shapes_pipeline

    config = ShapesModelConfig(
        resolution=resolution,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        text_hidden_size=text_hidden_size,
        text_layers=text_layers,
        text_heads=text_heads,
        text_projection_dim=text_projection_dim,
        max_prompt_tokens=max_prompt_tokens,
        shift=shift,
    )
    # Build, save and load back through the one loader, so a fresh model and a committed one
    # are the same kind of object.
    with tempfile.TemporaryDirectory(prefix="opdkit-shapes-") as tmp:
        build_shapes_pipeline(tmp, shapes_vocabulary(), config, seed=seed)
        return load_flow_model(tmp, world="shapes")
