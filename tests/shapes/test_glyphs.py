"""Glyph font and template-matching OCR reader of the shapes world."""

from __future__ import annotations

import itertools

import numpy as np

from opdkit.scoring.ocr import ocr_reward
from opdkit.shapes import prompts as P
from opdkit.shapes.glyphs import FONT, glyph_bitmap, read_text, read_text_scored, text_origin_range
from opdkit.shapes.quality import blur, gaussian_noise, speckle
from opdkit.shapes.render import paint, render_batch
from opdkit.shapes.vocab import ALPHABET, MAX_TEXT_LEN


def test_font_covers_alphabet_and_glyphs_are_far_apart() -> None:
    assert set(FONT) == set(ALPHABET) and len(set(ALPHABET)) == len(ALPHABET)
    for a, b in itertools.combinations(ALPHABET, 2):
        assert (glyph_bitmap(a) != glyph_bitmap(b)).sum() >= 4, (a, b)
    for c in ALPHABET:  # every glyph touches all sides of its cell: no ambiguous alignment
        g = glyph_bitmap(c)
        assert g.shape == (5, 3) and g.any(0).all() and g.any(1).all()


def test_four_glyphs_fit_32px() -> None:
    (x_lo, x_hi), (y_lo, y_hi) = text_origin_range(MAX_TEXT_LEN, 32)
    assert x_lo <= x_hi and y_lo <= y_hi


def test_reads_every_clean_render_exactly() -> None:
    records = P.generate_prompts(300, seed=5, tags=["ocr"], unique=False)
    records += [P.ocr(c) for c in ALPHABET] + [P.ocr(c * 4) for c in ALPHABET]
    images = render_batch(records, seed=6)
    misread = [(r["text"], read_text(im)) for r, im in zip(records, images, strict=True) if read_text(im) != r["text"]]
    assert not misread, misread[:5]


def test_reads_at_every_position() -> None:
    (x_lo, x_hi), (y_lo, y_hi) = text_origin_range(2, 32)
    for x in range(x_lo, x_hi + 1):
        for y in range(y_lo, y_hi + 1):
            assert read_text(paint([], text="K7", text_origin=(x, y))) == "K7"


def test_robust_to_noise() -> None:
    records = P.generate_prompts(60, seed=7, tags=["ocr"], unique=False)
    images = render_batch(records, seed=8)
    rng = np.random.default_rng(0)
    for noisy in (gaussian_noise(images, 0.2, rng), speckle(images, 0.1, rng), gaussian_noise(blur(images), 0.1, rng)):
        rewards = [ocr_reward(read_text(im), r["text"]) for im, r in zip(noisy, records, strict=True)]
        assert np.mean(rewards) >= 0.98


def test_no_text_reads_empty() -> None:
    rng = np.random.default_rng(0)
    assert read_text_scored(np.zeros((32, 32, 3), np.uint8)) == ("", 0.0)
    for image in rng.integers(0, 256, (10, 32, 32, 3)).astype(np.uint8):  # uniform noise is not text
        assert read_text(image) == ""
    for image in gaussian_noise(np.zeros((10, 32, 32, 3), np.uint8), 0.3, rng):
        assert read_text(image) == ""
