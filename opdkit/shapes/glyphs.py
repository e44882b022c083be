"""The glyph font of the shapes world's signs, and the template-matching reader.

Glyphs are 3x5 font pixels drawn at ``scale = image_width // 16`` (2 at 32 px), so a glyph
covers ``3s x 5s`` image pixels and glyphs sit ``4s`` apart (one font pixel of spacing): four
glyphs span ``15s`` = 30 px at 32 px. Text is one row at an integer position.

The reader (:func:`read_text`) decodes the whole image at once: for every candidate text
length ``n`` (0-4) and origin it picks the best glyph per cell and keeps the hypothesis whose
rendering disagrees least with the image's ink map. Mismatch is summed over soft ink values,
so it is the maximum-likelihood reading under symmetric pixel noise: stray speckle far from
the text costs every hypothesis the same, and a noisy glyph still matches its own template
better than any other (every pair of glyphs differs in >= 4 font pixels = 16 image pixels).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from opdkit.shapes.vocab import ALPHABET, MAX_TEXT_LEN, palette_sq_distances

# 3x5 glyphs ('#' = ink), rows top to bottom. Every glyph touches all four sides of its cell,
# so a text's ink box is exactly its cell row and a reading cannot slide by a font pixel.
FONT: dict[str, str] = {
    "1": ".#. ##. .#. .#. ###",
    "5": "### #.. ### ..# ###",
    "7": "### ..# ..# .#. .#.",
    "A": ".#. #.# ### #.# #.#",
    "F": "### #.. ##. #.. #..",
    "J": "..# ..# ..# #.# ###",
    "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###",
    "S": ".## #.. .#. ..# ##.",
    "T": "### .#. .#. .#. .#.",
    "V": "#.# #.# #.# #.# .#.",
    "Y": "#.# #.# .#. .#. .#.",
}
"""Glyph bitmaps of :data:`opdkit.shapes.vocab.ALPHABET` (3 columns x 5 rows)."""

MAX_CELL_MISMATCH: float = 0.35
"""Largest mean ``|ink - template|`` over a glyph cell for the cell to read as that glyph.
Measured worst true cells: 0.19 (Gaussian sigma 0.3), 0.23 (20 % speckle), 0.26 (blur +
Gaussian 0.1); uniform random RGB noise gives ~0.5."""

MAX_IMAGE_MISMATCH: float = 0.4
"""Largest mean ``|ink - rendering|`` over the whole image for a reading to count. Measured:
0 clean, <= 0.22 under Gaussian sigma 0.3 or 20 % speckle, ~0.7 for uniform RGB noise."""

GLYPH_W, GLYPH_H = 3, 5
"""Font cell in font pixels; one font pixel of spacing follows each glyph."""


def glyph_scale(size: int) -> int:
    """Image pixels per font pixel for an image ``size`` pixels wide (2 at 32 px)."""
    return max(1, size // 16)


@cache
def glyph_bitmap(char: str, scale: int = 1) -> np.ndarray:
    """``(5 * scale, 3 * scale)`` bool bitmap of ``char`` (read-only)."""
    if char not in FONT:
        raise ValueError(f"glyph {char!r} is not in the shapes alphabet {ALPHABET!r}")
    rows = [[c == "#" for c in row] for row in FONT[char].split()]
    bitmap = np.kron(np.array(rows, dtype=np.uint8), np.ones((scale, scale), dtype=np.uint8)).astype(bool)
    bitmap.setflags(write=False)
    return bitmap


def text_extent(n_chars: int, scale: int) -> tuple[int, int]:
    """``(width, height)`` in image pixels of ``n_chars`` glyphs at ``scale``."""
    return (4 * n_chars - 1) * scale if n_chars else 0, GLYPH_H * scale


def text_origin_range(n_chars: int, size: int, margin: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive ``((x_lo, x_hi), (y_lo, y_hi))`` of top-left origins keeping ``margin`` px clear.

    Raises:
        ValueError: the text does not fit (more than 4 glyphs at 32 px).
    """
    width, height = text_extent(n_chars, glyph_scale(size))
    x_hi, y_hi = size - margin - width, size - margin - height
    if x_hi < margin or y_hi < margin:
        raise ValueError(f"{n_chars} glyphs ({width}x{height} px) do not fit a {size}px image")
    return (margin, x_hi), (margin, y_hi)


def draw_text(image: np.ndarray, text: str, origin: tuple[int, int], rgb: tuple[int, int, int]) -> None:
    """Draw ``text`` in place on ``image`` ((H, W, 3) uint8) with its top-left corner at ``origin`` (x, y)."""
    scale = glyph_scale(image.shape[1])
    x, y = origin
    for i, char in enumerate(text):
        bitmap = glyph_bitmap(char, scale)
        x0 = x + 4 * scale * i
        image[y : y + bitmap.shape[0], x0 : x0 + bitmap.shape[1]][bitmap] = rgb


def ink_map(image: np.ndarray) -> np.ndarray:
    """Soft ink probability per pixel: ``(H, W)`` float32 in [0, 1], colour-agnostic.

    ``d_bg^2 / (d_bg^2 + d_ink^2)`` with ``d_bg`` the RGB distance to the background and
    ``d_ink`` to the nearest palette colour: 0 on clean background, 1 on any clean palette
    colour, ~0.5 on pixels halfway (blurred edges, grey noise).
    """
    sq = palette_sq_distances(image)
    bg, ink = sq[..., 0], sq[..., 1:].min(-1)
    return (bg / np.maximum(bg + ink, 1e-6)).astype(np.float32)


@cache
def _templates(scale: int) -> np.ndarray:
    """``(G, 5s, 3s)`` float32 stack of the alphabet's bitmaps."""
    return np.stack([glyph_bitmap(c, scale) for c in ALPHABET]).astype(np.float32)


def read_text_scored(image: np.ndarray, max_chars: int = MAX_TEXT_LEN) -> tuple[str, float]:
    """Best reading of ``image`` and its mismatch relative to an empty image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        max_chars: longest text considered.

    Returns:
        ``(text, gain)``: ``gain`` is how many (soft) pixels better the reading explains the
        image than "no text" (0.0 for an empty reading); a clean glyph gains its ink count.
    """
    ink = ink_map(image)
    scale = glyph_scale(image.shape[1])
    templates = _templates(scale)
    gh, gw = templates.shape[1:]
    h, w = ink.shape
    if h < gh or w < gw:
        return "", 0.0
    windows = np.lib.stride_tricks.sliding_window_view(ink, (gh, gw))  # (H-gh+1, W-gw+1, gh, gw)
    overlap = np.einsum("yxij,gij->gyx", windows, templates, optimize=True)
    # Mismatch of a cell against glyph g is sum|ink - T_g| = sum(ink) + |T_g| - 2 <ink, T_g>
    # (T is binary); relative to leaving the cell empty (mismatch sum(ink)) it is the gain below.
    cost = templates.sum((1, 2))[:, None, None] - 2.0 * overlap  # (G, Y, X): < 0 when the glyph fits
    best_glyph = cost.argmin(0)
    best_cost = cost.min(0)
    # A cell may only hold a glyph that explains it: mean |ink - template| over the cell at
    # most MAX_CELL_MISMATCH. Without this, pure noise (ink ~0.5 everywhere) reads as text.
    mismatch = (windows.sum((2, 3)) + best_cost) / (gh * gw)
    best_cost = np.where(mismatch <= MAX_CELL_MISMATCH, best_cost, np.inf)
    pitch = 4 * scale
    best_text, best_total = "", 0.0
    for n in range(1, max_chars + 1):
        span = (n - 1) * pitch
        if span >= best_cost.shape[1]:
            break
        # total[y, x] = sum of the n cells starting at x, x + pitch, ...
        total = sum(best_cost[:, k * pitch : best_cost.shape[1] - span + k * pitch] for k in range(n))
        y, x = np.unravel_index(int(np.argmin(total)), total.shape)
        if np.isfinite(total[y, x]) and total[y, x] < best_total - 1e-6:
            best_total = float(total[y, x])
            best_text = "".join(ALPHABET[int(best_glyph[y, x + k * pitch])] for k in range(n))
    # The reading must explain the whole image too: uniform RGB noise is ~70 % "ink" and
    # would otherwise read as a row of the densest glyph.
    if best_text and (float(ink.sum()) + best_total) / ink.size > MAX_IMAGE_MISMATCH:
        return "", 0.0
    return best_text, -best_total


def read_text(image: np.ndarray) -> str:
    """Text of a shapes-world sign (uppercase glyphs of :data:`ALPHABET`; ``""`` if none).

    Args:
        image: ``(H, W, 3)`` uint8 RGB, any palette colour on the black background.
    """
    return read_text_scored(image)[0]


__all__ = [
    "FONT",
    "GLYPH_H",
    "GLYPH_W",
    "MAX_CELL_MISMATCH",
    "MAX_IMAGE_MISMATCH",
    "draw_text",
    "glyph_bitmap",
    "glyph_scale",
    "ink_map",
    "read_text",
    "read_text_scored",
    "text_extent",
    "text_origin_range",
]
