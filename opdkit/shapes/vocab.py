"""The vocabulary of the shapes world: shapes, palette, background, OCR alphabet, sizes.

Every constant another module or developer may want to read lives here, so the renderer, the
detector, the glyph reader, the quality measure and the model's tokenizer agree by construction.

Choices (measured on the clean/noisy sweeps documented in ``docs/results/shapes.md``):

- Shapes: circle, square, triangle (apex up), cross, diamond, hourglass, arch and arrow (apex
  up). Eight classes, as GenEval has one single-object prompt per class: with four, the
  compositions of a tag were too few for a train split that teaches anything transferable.
  Their outlines differ enough that template matching separates them on blurry, speckled
  32x32 blobs (``tests/shapes/test_detect.py`` checks every pair on clean and noisy renders);
  the closest pairs are circle/square and arch/square (IoU ~0.75-0.8 at our sizes), so the
  smallest object is 8 px across: below that a rasterised circle is nearly a square.
- Palette: six corners of the RGB cube, named with GenEval's colour names. Any two palette
  colours, and any palette colour and the background, are at least 255 apart (Euclidean, 0-255
  units): the largest possible separation for 7 colours, so nearest-colour classification
  survives heavy pixel noise. The magenta corner is called "purple" (the GenEval name nearest
  to it); cyan is left out because GenEval has no name for it.
- Background: black, the seventh cube corner. It is also "no ink": in the model's [-1, 1]
  pixel space the empty image is a constant, which makes a clean background easy to learn
  and easy to measure.
- OCR alphabet: 12 glyphs of a 3x5 pixel font (drawn at scale 2: 6x10 px per glyph, pitch
  8 px, so 4 glyphs span 30 px). The set was chosen by search among 27 designed glyphs so
  that every pair differs in at least 4 font pixels (16 image pixels), while keeping "K" and
  "7" (the issue's example ``"K7"``).
"""

from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "hourglass", "arch", "arrow")
"""Object class names, used verbatim as GenEval ``class`` values and in prompts."""

PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
                           "diamond": "diamonds", "hourglass": "hourglasses", "arch": "arches", "arrow": "arrows"}
"""Plural forms for counting prompts ("a photo of three crosses")."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (255, 0, 255),
    "white": (255, 255, 255),
}
"""Palette: GenEval colour name -> RGB (0-255). Insertion order is the palette index order."""

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
"""Palette colour names in palette index order (index 0 here is label 1 in label maps)."""

BACKGROUND: tuple[int, int, int] = (0, 0, 0)
"""Background RGB: black (see module docstring)."""

OCR_TEXT_COLOR: str = "white"
"""Palette colour of rendered sign text. Fixed, because the prompt names no colour and a tiny
model learns glyph shapes faster without a random colour on top; the reader ignores colour."""

ALPHABET: str = "157AFJKLSTVY"
"""OCR glyphs, digits first. Every pair differs in >= 4 of the 15 font pixels."""

MAX_TEXT_LEN: int = 4
"""Longest sign text in prompts: 4 glyphs fill a 32 px row at scale 2."""

NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
"""Counting prompts use GenEval's counts 2-4 (its exclude clause names count + 1)."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""GenEval relation strings, verbatim."""

DEFAULT_SIZE: int = 32
"""Default image side in pixels."""

OBJECT_SIDES: tuple[int, int] = (8, 16)
"""Small and large object side, pixels at 32 px (scaled linearly for other sizes). Lower bound 8:
a rasterised circle smaller than that is too close to a square (see above)."""

SIDE_MODES: tuple[str, ...] = ("random", "by_count")
"""How the renderer picks object sides (both on :data:`OBJECT_SIDES`):

- ``random`` (the default): each object is small or large at random, with at most one large
  object per image (two 16 px objects leave no room for a clear gap at 32 px); all ``n + 1``
  assignments of ``n`` objects are equally likely.
- ``by_count``: one side per object count, large alone and small in twos and more. The
  committed ``shapes-base`` was pretrained on this narrower data (``docs/results/shapes.md``)."""

# Clearances (pixels at 32 px). Objects keep >= 3 px between boxes so a 3x3 majority filter
# never bridges two objects. They may touch the image border: with objects on the 8 px grid a
# 1 px border would leave two objects no room side by side.
OBJECT_GAP: int = 3
BORDER: int = 0

PLACEMENT_GRID: int = 8
"""Object sides and object origins are multiples of this many pixels (at 32 px; scaled with the
image) wherever the border allows: two of the shapes model's 4 px patches. With free 1 px
placement, 45 minutes of pretraining left the base drawing ragged blobs the detector could not
name (GenEval 0.04); on a 4 px grid it drew objects as unions of patch blocks (GenEval 0.243); on
this grid the same recipe reaches GenEval ~0.5 (``docs/results/shapes.md``). Positions stay random: a
16 px object has 3 x 3 origins, an 8 px one 4 x 4."""

SIGN_GRID: int = 4
"""Sign-text origins are multiples of this many pixels (at 32 px). Signs stay on the finer grid:
on the 8 px one the base read its signs too well (OCR 0.945, above the 0.2-0.7 band of a base
that should be imperfect the way SD3.5-M is)."""


LABEL_NAMES: tuple[str, ...] = ("background", *COLOR_NAMES)
"""Name of each pixel label: 0 is the background, ``k >= 1`` is ``COLOR_NAMES[k - 1]``."""

PALETTE_RGB: np.ndarray = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
"""``(7, 3)`` float32: row ``k`` is the RGB (0-255) of label ``k`` (0 = background)."""
PALETTE_RGB.setflags(write=False)


def palette_sq_distances(image: np.ndarray) -> np.ndarray:
    """Squared RGB distance of every pixel to every label colour.

    Args:
        image: ``(..., 3)`` uint8 (or float in 0-255 units).

    Returns:
        ``(..., 7)`` float32, 0-255 units squared; channel ``k`` is the distance to label ``k``.
    """
    pixels = np.asarray(image, dtype=np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2: one small matmul instead of a (..., 7, 3) temporary.
    sq = (pixels * pixels).sum(-1, keepdims=True) - 2.0 * pixels @ PALETTE_RGB.T + (PALETTE_RGB**2).sum(-1)
    return np.maximum(sq, 0.0)


__all__ = [
    "ALPHABET",
    "BACKGROUND",
    "BORDER",
    "COLORS",
    "COLOR_NAMES",
    "DEFAULT_SIZE",
    "LABEL_NAMES",
    "MAX_TEXT_LEN",
    "NUMBER_WORDS",
    "OBJECT_GAP",
    "OBJECT_SIDES",
    "OCR_TEXT_COLOR",
    "PALETTE_RGB",
    "PLACEMENT_GRID",
    "PLURALS",
    "RELATIONS",
    "SHAPES",
    "SIDE_MODES",
    "SIGN_GRID",
    "palette_sq_distances",
]
