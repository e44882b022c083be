"""Exact detector + shared GenEval rules on shapes-world images."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from opdkit.scoring.geneval import judge
from opdkit.shapes import prompts as P
from opdkit.shapes.detect import classify_color, detect, label_pixels, score_geneval, score_ocr
from opdkit.shapes.quality import blur, gaussian_noise, speckle
from opdkit.shapes.render import layout, paint, render_batch
from opdkit.shapes.vocab import COLOR_NAMES, COLORS, SHAPES


@pytest.fixture(scope="module")
def clean_batch() -> tuple[list[dict], np.ndarray]:
    """200 random records per tag (7 tags) and their clean renders."""
    records = P.generate_prompts(200, seed=11, unique=False)
    return records, render_batch(records, seed=12)


def _accuracy(results: list[dict], records: list[dict]) -> dict[str, float]:
    per_tag: dict[str, list[float]] = defaultdict(list)
    for result, record in zip(results, records, strict=True):
        per_tag[record["tag"]].append(result["correct"])
    return {tag: float(np.mean(v)) for tag, v in per_tag.items()}


def test_clean_renders_score_one_on_every_tag(clean_batch: tuple[list[dict], np.ndarray]) -> None:
    records, images = clean_batch
    results = score_geneval(images, records)
    failures = [(r["prompt"], s["reason"]) for r, s in zip(records, results, strict=True) if s["correct"] != 1.0]
    assert not failures, failures[:5]
    assert all(s["strict"] == 1.0 and s["partial"] == 1.0 for s in results)
    assert set(_accuracy(results, records)) == set(P.ALL_TAGS)


def test_clean_detections_are_exact() -> None:
    rng = np.random.default_rng(0)
    for record in P.generate_prompts(40, seed=2, tags=P.GENEVAL_TAGS, unique=False):
        objects = layout(record, rng)
        dets = detect(paint(objects))
        assert set(dets) == set(SHAPES)
        found = sorted((name, d.box, d.color) for name, ds in dets.items() for d in ds)
        assert found == sorted((o.shape, tuple(float(v) for v in o.box), o.color) for o in objects)
        for ds in dets.values():
            for d in ds:
                assert 0.95 < d.score <= 1.0  # above GenEval's counting threshold 0.9
                assert d.mask is not None and d.mask.shape == (32, 32)


@pytest.mark.parametrize("side", [8, 16])
def test_every_shape_is_told_from_every_other(side: int) -> None:
    """Each shape alone, at both object sides, clean and noisy: named as itself, never as a rival."""
    from opdkit.shapes.render import PlacedObject

    rng = np.random.default_rng(side)
    for shape in SHAPES:
        image = paint([PlacedObject(shape, "green", (8, 8, 8 + side, 8 + side))])
        dets = detect(image)
        assert [d.box for d in dets[shape]] == [(8.0, 8.0, 8.0 + side, 8.0 + side)] and dets[shape][0].score > 0.95
        assert not any(dets[other] for other in SHAPES if other != shape), (shape, dets)
        hits = 0
        for _ in range(20):
            noisy = gaussian_noise(image[None], 0.1, rng)[0]
            named = {name for name, ds in detect(noisy).items() for d in ds if d.score > 0.9}
            hits += named == {shape}
        assert hits >= 19, (shape, side, hits)


def test_wrong_prompts_are_rejected() -> None:
    def accuracy(true: dict, asked: dict) -> float:
        images = render_batch([true] * 20, seed=3)
        return float(np.mean([judge(asked, detect(im), im, classify_color).correct for im in images]))

    assert accuracy(P.single_object("circle"), P.single_object("square")) == 0.0
    assert accuracy(P.single_object("triangle"), P.single_object("cross")) == 0.0
    assert accuracy(P.single_object("arch"), P.single_object("square")) == 0.0
    assert accuracy(P.single_object("diamond"), P.single_object("cross")) == 0.0
    assert accuracy(P.single_object("hourglass"), P.single_object("triangle")) == 0.0
    assert accuracy(P.single_object("arrow"), P.single_object("diamond")) == 0.0
    assert accuracy(P.counting("circle", 3), P.counting("circle", 2)) == 0.0  # exclude: 3 >= 3
    assert accuracy(P.counting("circle", 3), P.counting("circle", 4)) == 0.0
    assert accuracy(P.colors("red", "circle"), P.colors("purple", "circle")) == 0.0
    assert accuracy(P.position("circle", "left of", "square"), P.position("circle", "right of", "square")) == 0.0
    assert accuracy(P.position("circle", "above", "square"), P.position("circle", "left of", "square")) == 0.0
    swapped = P.color_attr("blue", "circle", "red", "square")
    assert accuracy(P.color_attr("red", "circle", "blue", "square"), swapped) == 0.0


def test_graceful_under_noise(clean_batch: tuple[list[dict], np.ndarray]) -> None:
    records, images = clean_batch
    keep = np.arange(0, len(records), 2)  # 100 per tag keeps this test quick
    records = [records[i] for i in keep]
    images = images[keep]
    rng = np.random.default_rng(0)
    for noisy, floor in [(gaussian_noise(images, 0.1, rng), 0.98), (speckle(images, 0.05, rng), 0.95),
                         (gaussian_noise(blur(images), 0.1, rng), 0.9)]:
        accuracy = _accuracy(score_geneval(noisy, records), records)
        assert min(accuracy.values()) >= floor, accuracy


def test_pure_noise_has_no_confident_detections() -> None:
    rng = np.random.default_rng(0)
    blank = np.zeros((10, 32, 32, 3), np.uint8)
    for images in (gaussian_noise(blank, 0.3, rng), speckle(blank, 0.2, rng),
                   rng.integers(0, 256, (10, 32, 32, 3)).astype(np.uint8)):
        for image in images:
            assert all(d.score <= 0.3 for ds in detect(image).values() for d in ds)


def test_pixel_labels_and_colour_classifier() -> None:
    swatch = np.array([[(0, 0, 0), *COLORS.values(), (0, 255, 255), (143, 143, 143), (60, 0, 0)]], np.uint8)
    # black, 6 palette colours, cyan (off palette), a half-covered white edge, dim red noise
    assert label_pixels(swatch).tolist() == [[0, 1, 2, 3, 4, 5, 6, -1, 6, 0]]
    rng = np.random.default_rng(0)
    for colour in COLOR_NAMES:
        image = paint(layout(P.colors(colour, "circle"), rng))
        (det,) = detect(image)["circle"]
        assert det.color == colour == classify_color(image, det)
        assert classify_color(image, type(det)(box=det.box, score=det.score)) == colour  # box only


def test_batch_scorers_validate_and_read_ocr() -> None:
    records = [P.ocr("K7"), P.ocr("TV1")]
    images = render_batch(records, seed=0)
    assert score_ocr(images, records) == [1.0, 1.0]
    assert score_ocr(images[::-1], records) == [0.0, 0.0]
    assert score_ocr(images, [{"prompt": r["prompt"]} for r in records]) == [1.0, 1.0]
    results = score_geneval(images, records)
    assert [r["correct"] for r in results] == [1.0, 1.0]
    with pytest.raises(ValueError, match="images"):
        score_geneval(images[:1], records)
