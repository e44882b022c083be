"""Task-agnostic quality reward of the shapes world."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from opdkit.shapes import prompts as P
from opdkit.shapes.quality import blur, gaussian_noise, quality_score, score_quality, speckle
from opdkit.shapes.render import render_batch


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return render_batch(P.generate_prompts(6, seed=0, unique=False), seed=0)


def test_clean_renders_score_high(clean: np.ndarray) -> None:
    scores = score_quality(clean)
    assert len(scores) == len(clean) and min(scores) >= 0.9


def test_monotone_in_gaussian_noise(clean: np.ndarray) -> None:
    means = []
    for sigma in (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
        # The same noise pattern scaled up, so per-image scores are comparable across sigmas.
        noise = np.random.default_rng(1).normal(size=clean.shape).astype(np.float32)
        noisy = np.clip(clean + sigma * 255.0 * noise, 0, 255).round().astype(np.uint8)
        means.append(np.mean(score_quality(noisy)))
    assert all(a > b for a, b in itertools.pairwise(means)), means
    assert means[-1] < 0.1


def test_monotone_in_speckle(clean: np.ndarray) -> None:
    means = [np.mean(score_quality(speckle(clean, p, np.random.default_rng(2)))) for p in (0.0, 0.01, 0.03, 0.1)]
    assert all(a > b for a, b in itertools.pairwise(means)), means


def test_blur_and_emptiness_cost_quality(clean: np.ndarray) -> None:
    assert np.mean(score_quality(blur(clean))) < 0.95
    assert quality_score(np.zeros((32, 32, 3), np.uint8)) < 0.8
    rng = np.random.default_rng(0)
    for image in gaussian_noise(clean, 0.4, rng):
        assert 0.0 <= quality_score(image) < 0.05
