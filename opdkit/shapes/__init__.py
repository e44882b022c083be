"""The shapes world: a synthetic compositional text-to-image domain with exact scorers.

Coloured shapes, counts, relative positions and short sign texts on a 32x32 black canvas,
prompted with GenEval's six tags (plus ``ocr``) in GenEval's metadata schema, so the shared
GenEval scoring rules (:mod:`opdkit.scoring.geneval`) run unchanged with this world's exact
detector in place of Mask2Former and its palette classifier in place of CLIP.

Modules (numpy only at import; scipy.ndimage is imported when detecting; the names below
are re-exported lazily):

- :mod:`~opdkit.shapes.vocab`: shapes, palette, background, OCR alphabet, sizes.
- :mod:`~opdkit.shapes.prompts`: record builders, seeded generator, shipped train/test splits.
- :mod:`~opdkit.shapes.render`: ground-truth renderer.
- :mod:`~opdkit.shapes.detect`: detector, colour classifier, batch GenEval/OCR scorers.
- :mod:`~opdkit.shapes.glyphs`: glyph font and reader.
- :mod:`~opdkit.shapes.quality`: task-agnostic quality reward and degradations.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opdkit.shapes.detect import classify_color, score_geneval, score_ocr
    from opdkit.shapes.glyphs import read_text
    from opdkit.shapes.prompts import (
        ALL_TAGS,
        GENEVAL_TAGS,
        generate_prompts,
        load_split,
        make_splits,
        read_jsonl,
        sample_record,
        write_jsonl,
    )
    from opdkit.shapes.quality import quality_score, score_quality
    from opdkit.shapes.render import render_batch
    from opdkit.shapes.vocab import ALPHABET, BACKGROUND, COLOR_NAMES, COLORS, SHAPES

# Public name -> submodule. Resolved on first access (PEP 562), so importing one submodule
# (or running ``python -m opdkit.shapes.prompts``) does not import the others. The functions
# ``detect`` and ``render`` are NOT re-exported: their names are the submodules' names, and
# ``from opdkit.shapes import detect`` must keep giving the module.
_EXPORTS: dict[str, str] = {
    "classify_color": "detect", "score_geneval": "detect", "score_ocr": "detect",
    "read_text": "glyphs",
    "ALL_TAGS": "prompts", "GENEVAL_TAGS": "prompts", "generate_prompts": "prompts", "load_split": "prompts",
    "make_splits": "prompts", "read_jsonl": "prompts", "sample_record": "prompts", "write_jsonl": "prompts",
    "quality_score": "quality", "score_quality": "quality",
    "render_batch": "render",
    "ALPHABET": "vocab", "BACKGROUND": "vocab", "COLOR_NAMES": "vocab", "COLORS": "vocab", "SHAPES": "vocab",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"opdkit.shapes.{_EXPORTS[name]}"), name)
        globals()[name] = value  # cache: later lookups skip this function
        return value
    raise AttributeError(f"module 'opdkit.shapes' has no attribute {name!r}")


__all__ = [
    "ALL_TAGS",
    "ALPHABET",
    "BACKGROUND",
    "COLORS",
    "COLOR_NAMES",
    "GENEVAL_TAGS",
    "SHAPES",
    "classify_color",
    "generate_prompts",
    "load_split",
    "make_splits",
    "quality_score",
    "read_jsonl",
    "read_text",
    "render_batch",
    "sample_record",
    "score_geneval",
    "score_ocr",
    "score_quality",
    "write_jsonl",
]
