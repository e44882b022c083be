"""Ground-truth renderer of the shapes world: records -> exact uint8 RGB images.

Every object is a palette-coloured shape stamped on a black background, axis-aligned, in a
square box whose side and position are multiples of :data:`PLACEMENT_GRID` pixels (two of the
model's 4 px patches) where the border allows; boxes keep a clear gap, so objects never touch.
Sign text sits on the finer :data:`SIGN_GRID`. Rasterisation samples pixel centres, and the same function
(:func:`shape_mask`) gives the detector its templates, so a clean render matches its template
exactly (IoU 1). Placement, sides (:data:`OBJECT_SIDES`, by a :data:`SIDE_MODES` mode) and colours
are random but seeded by the caller's generator.

Coordinates: ``(x, y)`` pixels, x to the right, y down; a box ``(x1, y1, x2, y2)`` covers
columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1`` (end-exclusive, so ``x2 - x1`` is the width).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from opdkit.shapes.glyphs import draw_text, text_origin_range
from opdkit.shapes.vocab import (
    BACKGROUND,
    BORDER,
    COLOR_NAMES,
    COLORS,
    DEFAULT_SIZE,
    OBJECT_GAP,
    OBJECT_SIDES,
    OCR_TEXT_COLOR,
    PLACEMENT_GRID,
    SHAPES,
    SIDE_MODES,
    SIGN_GRID,
)

# A position prompt's relation must hold with this much room under GenEval's rule: the
# normalised revised offset on the named axis beyond 0.75 (GenEval needs 0.5), the other axis
# below 0.25 (so the pair never also reads as diagonal).
_RELATION_MAIN = 0.75
_RELATION_CROSS = 0.25
_MAX_TRIES = 200


@dataclass(frozen=True)
class PlacedObject:
    """One object of a render: shape class, palette colour name and its box (pixels, end-exclusive)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive).

    ``Generator.integers`` costs ~3 us per scalar call (~14 us with ``size=``) on numpy 2.4,
    which dominated render time; ``floor(random() * n)`` costs ~1 us and its bias (< n / 2^53)
    is nil for n of a few thousand at most.
    """
    return low + int(rng.random() * (high - low + 1))


# Pixel-centre tests compare exact binary fractions; a hair of slack keeps boundary pixels
# (e.g. the triangle's apex row) deterministic across platforms.
_EPS = 1e-9


@cache
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Rasterised ``shape`` filling a ``width`` x ``height`` box: ``(height, width)`` bool, read-only.

    Pixel ``(r, c)`` is inside when its centre ``(u, v) = ((c + .5) / width, (r + .5) / height)``
    (box-normalised) is inside the shape:

    - square: everywhere;
    - circle: ``(u - .5)^2 + (v - .5)^2 <= 1/4`` (an ellipse for non-square boxes);
    - triangle (apex up): ``|u - .5| <= (r + 1) / (2 * height)``; the top row is never empty
      and the bottom row is full, so the mask's bounding box is the whole box;
    - cross: ``|u - .5| <= 1/6`` or ``|v - .5| <= 1/6`` (arms a third of the side thick),
      widened to at least one pixel;
    - diamond: ``|u - .5| + |v - .5| <= 1/2 + 1/(2 width)`` (the centre columns reach the
      top and bottom rows);
    - hourglass: ``|u - .5| <= |v - .5| + 1/(2 width)`` (two triangles apex to apex, a waist at
      least the centre columns wide);
    - arch: the square less a notch ``|u - .5| < 1/4`` and ``v > 7/16`` (two legs and a lintel);
    - arrow (apex up): a triangle head over the top half, ``|u - .5| <= (r + 1) / height``
      for rows ``r < height / 2``, and a shaft ``|u - .5| <= 1/6`` below it.

    Every shape touches all four sides of its box, so a clean object's bounding box is exactly
    the box it was drawn in: the detector's templates line up pixel for pixel.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    if width < 1 or height < 1:
        raise ValueError(f"shape box must be at least 1x1, got {width}x{height}")
    eps = _EPS
    u = (np.arange(width) + 0.5) / width
    v = (np.arange(height) + 0.5) / height
    du = np.abs(u - 0.5)[None, :]
    dv = np.abs(v - 0.5)[:, None]
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = du**2 + dv**2 <= 0.25 + eps
    elif shape == "triangle":
        rows = np.arange(height)[:, None]
        mask = du <= (rows + 1) / (2.0 * height) + eps
    elif shape == "cross":
        arm_u = max(1.0 / 6.0, 0.5 / width)  # at least the centre column
        arm_v = max(1.0 / 6.0, 0.5 / height)
        mask = (du <= arm_u + eps) | (dv <= arm_v + eps)
    elif shape == "diamond":
        mask = du + dv <= 0.5 + 0.5 / width + eps
    elif shape == "hourglass":
        mask = du <= dv + 0.5 / width + eps
    elif shape == "arch":
        mask = ~((du < 0.25 - eps) & (v[:, None] > 7.0 / 16.0 + eps))
    else:  # arrow
        rows = np.arange(height)[:, None]
        head = (rows < height / 2.0) & (du <= (rows + 1) / float(height) + eps)
        shaft = (rows >= height / 2.0) & (du <= max(1.0 / 6.0, 0.5 / width) + eps)
        mask = head | shaft
    mask = np.ascontiguousarray(mask)
    mask.setflags(write=False)
    return mask


def _px(value: int, size: int) -> int:
    """A 32 px clearance scaled to ``size`` (at least 1 px)."""
    return max(1, round(value * size / DEFAULT_SIZE))


def _on_grid(low: int, high: int, size: int, grid_px: int = PLACEMENT_GRID) -> np.ndarray:
    """The multiples of a ``grid_px`` grid (pixels at 32 px, scaled to ``size``) in ``[low, high]``;
    ``[low]`` when there is none.

    Returns:
        ``(n,)`` int64, ascending. The fallback keeps layouts possible where the border leaves
        no aligned slot (a 4-glyph sign is 30 px wide: its only origin is x = 1 at 32 px).
    """
    grid = _px(grid_px, size)
    values = np.arange(-(-low // grid) * grid, high + 1, grid, dtype=np.int64)
    return values if values.size else np.array([low], dtype=np.int64)


def _origins(side: int, size: int) -> np.ndarray:
    """Allowed top-left coordinates (either axis) of a ``side`` box: on the grid, inside the border."""
    border = round(BORDER * size / DEFAULT_SIZE)
    return _on_grid(border, size - border - side, size)


def _sides(n: int, size: int, rng: np.random.Generator, mode: str = "random") -> list[int]:
    """Sides (pixels) for ``n`` objects under a :data:`SIDE_MODES` mode, on :data:`OBJECT_SIDES`
    scaled to ``size``."""
    small, large = (_px(side, size) for side in OBJECT_SIDES)
    if mode == "by_count":
        # One draw per object, as the renderer that made shapes-base drew a side from a one-element
        # range per object: the same generator stream, so its recipe still reproduces the base.
        for _ in range(n):
            rng.random()
        return [large] if n == 1 else [small] * n
    if mode != "random":
        raise ValueError(f"unknown object side mode {mode!r}; expected one of {list(SIDE_MODES)}")
    sides = [small] * n
    which = _randint(rng, 0, n)  # n: none large
    if which < n:
        sides[which] = large
    return sides


def _free_origins(side: int, boxes: Sequence[tuple[int, int, int, int]], size: int) -> np.ndarray:
    """Which allowed top-left origins keep a ``side`` box clear of ``boxes``.

    Returns:
        ``(n, n)`` bool over origins ``(y, x) = (coords[i], coords[j])``, ``coords =
        _origins(side, size)``: True where the new box keeps >= ``OBJECT_GAP`` px (on some
        axis) from every existing box.
    """
    gap = _px(OBJECT_GAP, size)
    coords = _origins(side, size)
    if not boxes:
        return np.ones((len(coords), len(coords)), dtype=bool)
    b = np.asarray(boxes)[:, :, None]  # (k, 4, 1)
    # Too close on an axis: the new interval [c, c + side) comes within gap of [lo, hi).
    near_x = (coords + side + gap > b[:, 0]) & (coords < b[:, 2] + gap)  # (k, n)
    near_y = (coords + side + gap > b[:, 1]) & (coords < b[:, 3] + gap)
    return ~(near_y[:, :, None] & near_x[:, None, :]).any(0)


def _pick(free: np.ndarray, side: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """A uniformly random free origin as a box, or None when there is none."""
    flat = np.flatnonzero(free)
    if flat.size == 0:
        return None
    i, j = divmod(int(flat[_randint(rng, 0, flat.size - 1)]), free.shape[1])
    coords = _origins(side, size)
    x, y = int(coords[j]), int(coords[i])
    return (x, y, x + side, y + side)


def _apart(box: tuple[int, int, int, int], others: Sequence[tuple[int, int, int, int]], gap: int) -> bool:
    """True when ``box`` keeps at least ``gap`` px (on some axis) from every box in ``others``."""
    x1, y1, x2, y2 = box
    return all(x1 >= b[2] + gap or b[0] >= x2 + gap or y1 >= b[3] + gap or b[1] >= y2 + gap for b in others)


def _try_random_origin(side: int, boxes: Sequence[tuple[int, int, int, int]], size: int,
                       rng: np.random.Generator, batch: int = 48) -> tuple[int, int, int, int] | None:
    """Rejection sampling of a free box, ``batch`` candidates at once.

    The first free one of i.i.d. uniform candidates is uniform over the free origins (the same
    law as :func:`_pick`), and one vectorised batch is much cheaper than building the exact
    free-origin mask; returns None when the whole batch misses (crowded layouts then fall back
    to the mask).
    """
    gap = _px(OBJECT_GAP, size)
    coords = _origins(side, size)
    cand = coords[(rng.random((batch, 2)) * coords.size).astype(np.int64)]  # (batch, 2): x, y
    x, y = cand[:, :1], cand[:, 1:]
    b = np.asarray(boxes)
    apart = (x >= b[:, 2] + gap) | (b[:, 0] >= x + side + gap) | (y >= b[:, 3] + gap) | (b[:, 1] >= y + side + gap)
    ok = apart.all(1)
    if not ok.any():
        return None
    cx, cy = (int(v) for v in cand[int(ok.argmax())])
    return (cx, cy, cx + side, cy + side)


def _place(sides: Sequence[int], size: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Random non-overlapping boxes for objects of the given sides.

    Largest object first, anywhere; each next one uniform over the origins the earlier ones
    left free (batched rejection sampling, or the exact free-origin mask when crowded); a dead
    end restarts the layout.

    Raises:
        RuntimeError: the objects cannot be packed (only for sizes far outside the defaults).
    """
    # Largest first: a big object placed last is what usually finds no room.
    order = sorted(range(len(sides)), key=lambda i: -sides[i])
    for _ in range(_MAX_TRIES):
        boxes: list[tuple[int, int, int, int]] = []
        for i in order:
            if not boxes:  # the first object may go anywhere: skip the free-origin mask
                coords = _origins(sides[i], size)
                x = int(coords[_randint(rng, 0, coords.size - 1)])
                y = int(coords[_randint(rng, 0, coords.size - 1)])
                boxes.append((x, y, x + sides[i], y + sides[i]))
                continue
            box = _try_random_origin(sides[i], boxes, size, rng)
            if box is None:  # crowded: draw from the exact set of free origins instead
                box = _pick(_free_origins(sides[i], boxes, size), sides[i], size, rng)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) == len(sides):
            placed = [boxes[0]] * len(sides)
            for slot, i in enumerate(order):
                placed[i] = boxes[slot]
            return placed
    raise RuntimeError(f"cannot place {len(sides)} objects of sides {list(sides)} in a {size}px image")


def _relation_margins(ax1: np.ndarray, ay1: np.ndarray, side_a: float, box_b: Sequence[float],
                      relation: str, position_threshold: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """GenEval's normalised revised offset of square boxes A (at origins ``(ax1, ay1)``, side
    ``side_a``; arrays broadcast) to box B, along ``relation``'s axis and across it.

    ``main > 0.5`` means GenEval reads ``relation``; ``cross`` is the absolute component on the
    other axis. The rule is :func:`opdkit.scoring.geneval.relative_position`'s, re-derived
    vectorised so the renderer can score many candidate positions at once.
    """
    bx1, by1, bx2, by2 = (float(v) for v in box_b[:4])
    ox = ax1 + side_a / 2.0 - (bx1 + bx2) / 2.0
    oy = ay1 + side_a / 2.0 - (by1 + by2) / 2.0
    sx = position_threshold * (side_a + (bx2 - bx1))
    sy = position_threshold * (side_a + (by2 - by1))
    length = np.hypot(ox, oy)
    safe = np.where(length > 0, length, 1.0)
    rx = np.where(length > 0, np.sign(ox) * np.maximum(np.abs(ox) - sx, 0.0) / safe, 0.0)
    ry = np.where(length > 0, np.sign(oy) * np.maximum(np.abs(oy) - sy, 0.0) / safe, 0.0)
    main, cross = {"left of": (-rx, ry), "right of": (rx, ry), "above": (-ry, rx), "below": (ry, rx)}[relation]
    return main, np.abs(cross)


def _place_relation(side_a: int, side_b: int, relation: str, size: int,
                    rng: np.random.Generator) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Boxes for A and B with ``A relation B`` holding by a clear margin (see module constants).

    B is uniform over the origins that leave room for A on the named side; A is the first of a
    batch of uniform candidates that keeps the gap and satisfies the relation margin (so
    uniform over those origins); B is redrawn when the whole batch misses.
    """
    if relation not in ("left of", "right of", "above", "below"):
        raise ValueError(f"unknown relation {relation!r}")
    gap = _px(OBJECT_GAP, size)
    coords_b, coords_a = _origins(side_b, size), _origins(side_a, size)
    lo, hi = int(coords_b[0]), int(coords_b[-1])
    room = side_a + gap
    for _ in range(_MAX_TRIES):
        along_lo, along_hi = (lo + room, hi) if relation in ("left of", "above") else (lo, hi - room)
        along_choices = coords_b[(coords_b >= along_lo) & (coords_b <= along_hi)]
        if along_choices.size == 0:
            break
        along = int(along_choices[_randint(rng, 0, along_choices.size - 1)])
        across = int(coords_b[_randint(rng, 0, coords_b.size - 1)])
        bx, by = (along, across) if relation in ("left of", "right of") else (across, along)
        box_b = (bx, by, bx + side_b, by + side_b)
        cand = coords_a[(rng.random((64, 2)) * coords_a.size).astype(np.int64)]
        x, y = cand[:, 0], cand[:, 1]
        main, cross = _relation_margins(x.astype(float), y.astype(float), float(side_a), box_b, relation)
        apart = (x >= box_b[2] + gap) | (bx >= x + side_a + gap) | (y >= box_b[3] + gap) | (by >= y + side_a + gap)
        ok = apart & (main > _RELATION_MAIN) & (cross < _RELATION_CROSS)
        if ok.any():
            ax, ay = (int(v) for v in cand[int(ok.argmax())])
            return (ax, ay, ax + side_a, ay + side_a), box_b
    raise RuntimeError(f"cannot place objects of sides {side_a}, {side_b} with relation {relation!r} "
                       f"in a {size}px image")


def layout(record: Mapping[str, Any], rng: np.random.Generator, size: int = DEFAULT_SIZE,
           sides: str = "random") -> list[PlacedObject]:
    """The objects a GenEval-schema record asks for, with random colours, sides and boxes.

    ``sides`` is a :data:`SIDE_MODES` mode: how object sides are drawn.

    Counts are exact; an include clause without ``color`` gets a random palette colour per
    object; a ``position`` clause is placed relative to the first object of the clause it
    references. The ``ocr`` tag has no objects (an empty list).
    """
    if record.get("tag") == "ocr":
        return []
    include = list(record.get("include", []))
    if not include:
        raise ValueError(f"record has no 'include' objects to render: {dict(record)!r}")
    specs: list[tuple[str, str]] = []
    for clause in include:
        for _ in range(int(clause["count"])):
            color = clause.get("color") or COLOR_NAMES[_randint(rng, 0, len(COLOR_NAMES) - 1)]
            if color not in COLORS:
                raise ValueError(f"colour {color!r} is not in the shapes palette {list(COLORS)}")
            specs.append((str(clause["class"]), str(color)))
    n = len(specs)
    object_sides = _sides(n, size, rng, sides)
    relations = [(i, c["position"]) for i, c in enumerate(include) if c.get("position")]
    if relations:
        # Only GenEval's position shape: two single-object clauses, the second relative to the first.
        if n != 2 or len(include) != 2 or relations[0][0] != 1 or int(relations[0][1][1]) != 0:
            raise ValueError(f"position records must be [reference, object relative to include[0]]: {dict(record)!r}")
        relation = str(relations[0][1][0])
        obj_box, ref_box = _place_relation(object_sides[1], object_sides[0], relation, size, rng)
        boxes = [ref_box, obj_box]
    else:
        boxes = _place(object_sides, size, rng)
    return [PlacedObject(shape, color, box) for (shape, color), box in zip(specs, boxes, strict=True)]


def paint(objects: Sequence[PlacedObject], size: int = DEFAULT_SIZE, text: str | None = None,
          text_origin: tuple[int, int] | None = None) -> np.ndarray:
    """Stamp placed objects (and optional sign text) on a black ``(size, size, 3)`` uint8 canvas."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        image[y1:y2, x1:x2][shape_mask(obj.shape, x2 - x1, y2 - y1)] = COLORS[obj.color]
    if text:
        draw_text(image, text, text_origin if text_origin is not None else (0, 0), COLORS[OCR_TEXT_COLOR])
    return image


def render(record: Mapping[str, Any], rng: np.random.Generator, size: int = DEFAULT_SIZE,
           sides: str = "random") -> np.ndarray:
    """A random ground-truth image of ``record``: ``(size, size, 3)`` uint8 RGB.

    GenEval tags: the objects of :func:`layout` (``sides``: a :data:`SIDE_MODES` mode). ``ocr``:
    ``record["text"]`` in the glyph font (white, scale ``size // 16``) at a random
    :data:`SIGN_GRID` position with a 1 px margin.
    """
    if record.get("tag") == "ocr":
        text = str(record["text"])
        (x_lo, x_hi), (y_lo, y_hi) = text_origin_range(len(text), size)
        xs, ys = _on_grid(x_lo, x_hi, size, SIGN_GRID), _on_grid(y_lo, y_hi, size, SIGN_GRID)
        origin = (int(xs[_randint(rng, 0, xs.size - 1)]), int(ys[_randint(rng, 0, ys.size - 1)]))
        return paint([], size, text=text, text_origin=origin)
    return paint(layout(record, rng, size, sides), size)


def render_batch(records: Sequence[Mapping[str, Any]], seed: int | np.random.Generator,
                 size: int = DEFAULT_SIZE, sides: str = "random") -> np.ndarray:
    """Render every record: ``(B, size, size, 3)`` uint8; one generator seeded by ``seed`` drives all.
    ``sides``: a :data:`SIDE_MODES` mode."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for i, record in enumerate(records):
        out[i] = render(record, rng, size, sides)
    return out


__all__ = ["PlacedObject", "layout", "paint", "render", "render_batch", "shape_mask"]
