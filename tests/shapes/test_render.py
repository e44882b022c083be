"""Ground-truth renderer of the shapes world."""

from __future__ import annotations

import numpy as np
import pytest

from opdkit.scoring.geneval import relative_position
from opdkit.shapes import prompts as P
from opdkit.shapes.render import layout, paint, render, render_batch, shape_mask
from opdkit.shapes.vocab import (
    BACKGROUND,
    COLORS,
    OBJECT_GAP,
    OBJECT_SIDES,
    PLACEMENT_GRID,
    SHAPES,
    SIDE_MODES,
    palette_sq_distances,
)


def test_render_is_deterministic_under_seed() -> None:
    records = P.generate_prompts(5, seed=0, unique=False)
    a = render_batch(records, seed=1)
    assert a.shape == (len(records), 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_batch(records, seed=1))
    assert not np.array_equal(a, render_batch(records, seed=2))
    single = render(records[0], np.random.default_rng(7))
    assert np.array_equal(single, render(records[0], np.random.default_rng(7)))


def test_renders_use_only_palette_colours() -> None:
    images = render_batch(P.generate_prompts(10, seed=0, unique=False), seed=0)
    assert (palette_sq_distances(images).min(-1) == 0).all()
    assert (images[:, :2] == BACKGROUND).all(-1).mean() > 0.5  # mostly background, objects may touch the border


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_fill_their_box(shape: str) -> None:
    for side in range(4, 17):
        m = shape_mask(shape, side, side)
        assert m.shape == (side, side) and m.any(0).all() and m.any(1).all()
        assert np.array_equal(m, m[:, ::-1])  # left-right symmetric


@pytest.mark.parametrize("sides", SIDE_MODES)
def test_layout_counts_colours_gaps_and_relations(sides: str) -> None:
    rng = np.random.default_rng(0)
    for tag in P.GENEVAL_TAGS:
        for record in P.generate_prompts(40, seed=1, tags=[tag], unique=False):
            objects = layout(record, rng, sides=sides)
            assert len(objects) == sum(c["count"] for c in record["include"])
            expected = [(c["class"], c.get("color")) for c in record["include"] for _ in range(c["count"])]
            for obj, (shape, colour) in zip(objects, expected, strict=True):
                assert obj.shape == shape and obj.color in COLORS and (colour is None or obj.color == colour)
                x1, y1, x2, y2 = obj.box
                assert x2 - x1 == y2 - y1 >= 8 and 0 <= x1 and x2 <= 32 and 0 <= y1 and y2 <= 32
                assert x1 % PLACEMENT_GRID == y1 % PLACEMENT_GRID == (x2 - x1) % PLACEMENT_GRID == 0
            for i, a in enumerate(objects):
                for b in objects[i + 1 :]:
                    gap = max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
                    assert gap >= OBJECT_GAP
            if tag == "position":
                relation = record["include"][1]["position"][0]
                reference, obj = objects
                # The relation holds, alone, even with twice GenEval's position threshold.
                assert relative_position(obj.box, reference.box, 0.2) == {relation}


def test_object_sides_by_mode() -> None:
    """random: every object small or large, at most one large, each assignment about equally
    often; by_count: large alone, small otherwise."""
    small, large = OBJECT_SIDES
    rng = np.random.default_rng(0)
    for n, record in [(1, P.single_object("circle")), (2, P.two_object("circle", "square")),
                      (4, P.counting("cross", 4)), (2, P.position("circle", "left of", "square"))]:
        seen: dict[tuple[int, ...], int] = {}
        for _ in range(600):
            key = tuple(o.box[2] - o.box[0] for o in layout(record, rng, sides="random"))
            seen[key] = seen.get(key, 0) + 1
        assert all(set(k) <= {small, large} and k.count(large) <= 1 for k in seen)
        assert len(seen) == n + 1  # none large, or object i large, for each i
        assert min(seen.values()) > 600 / (n + 1) * 0.7
        by_count = {tuple(o.box[2] - o.box[0] for o in layout(record, rng, sides="by_count")) for _ in range(50)}
        assert by_count == {(large,) if n == 1 else (small,) * n}
    with pytest.raises(ValueError, match="side mode"):
        layout(P.single_object("circle"), rng, sides="tiny")


def test_ocr_render_and_empty_layout() -> None:
    rng = np.random.default_rng(0)
    assert layout(P.ocr("K7"), rng) == []
    image = render(P.ocr("7777"), rng)
    ink = (image != 0).any(-1)
    assert ink.any(0).sum() == 4 * 6 and ink.any(1).sum() == 10  # four 6x10 glyphs in one row


def test_bad_records_are_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="palette"):
        layout({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "brown"}]}, rng)
    with pytest.raises(ValueError, match="shape"):
        paint(layout({"tag": "single_object", "include": [{"class": "hexagon", "count": 1}]}, rng))


def test_other_sizes_scale() -> None:
    image = render(P.counting("cross", 4), np.random.default_rng(0), size=64)
    assert image.shape == (64, 64, 3)
