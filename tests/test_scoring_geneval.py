"""GenEval scoring rules on hand-made detections; every expected value is worked out in a comment.

Geometry reminder: boxes are (x1, y1, x2, y2), y points down; relative_position shrinks each
centre-offset component by 0.1 * (size_A + size_B), then divides by the ORIGINAL offset length
and names a relation beyond +-0.5.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opdkit.scoring.geneval import (
    GENEVAL_TAGS,
    Detection,
    GenEvalConfig,
    filter_detections,
    judge,
    judge_exact,
    partial_credit,
    relative_position,
    summarize,
)


def box(cx: float, cy: float, size: float = 10.0) -> tuple[float, float, float, float]:
    """Square box of side ``size`` pixels centred at (cx, cy)."""
    h = size / 2
    return (cx - h, cy - h, cx + h, cy + h)


def det(cx: float, cy: float, score: float = 0.95, color: str | None = None, size: float = 10.0) -> Detection:
    return Detection(box=box(cx, cy, size), score=score, color=color)


def record(
    tag: str, include: Sequence[dict[str, Any]], exclude: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    meta: dict[str, Any] = {"tag": tag, "prompt": "test", "include": list(include)}
    if exclude:
        meta["exclude"] = list(exclude)
    return meta


SINGLE = record("single_object", [{"class": "circle", "count": 1}])
TWO = record("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
COUNT3 = record("counting", [{"class": "circle", "count": 3}], [{"class": "circle", "count": 4}])
RED_CIRCLE = record("colors", [{"class": "circle", "count": 1, "color": "red"}])
RED_CIRCLE_BLUE_SQUARE = record(
    "color_attr",
    [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
)


def position(relation: str) -> dict[str, Any]:
    """'a photo of a circle <relation> a square', in GenEval's layout (target clause first)."""
    return record(
        "position",
        [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": [relation, 0]}],
    )


# ------------------------------------------------------------------------------------------
# relative_position
# ------------------------------------------------------------------------------------------


def test_relative_position_four_axis_relations() -> None:
    # A centred (5,5), B centred (55,5), both 10 wide: offset (-50, 0), slack 0.1*(10+10)=2,
    # revised (-48, 0), / |offset| 50 -> dx = -0.96 -> left of; swapping A/B flips the sign.
    a, b = box(5, 5), box(55, 5)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    # Same along y (y points down): A above B; B below A.
    a, c = box(5, 5), box(5, 55)
    assert relative_position(a, c) == {"above"}
    assert relative_position(c, a) == {"below"}


def test_relative_position_dead_zone_same_centre() -> None:
    # Centres coincide: offset (0, 0) -> revised (0, 0), below 1e-3 -> no relation (no 0/0).
    assert relative_position((0, 0, 10, 10), (2, 2, 8, 8)) == set()
    # Offset (-1, 0) is inside the slack 0.1*(10+10)=2 -> revised (0, 0) -> no relation.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_relative_position_diagonal_gives_two_relations() -> None:
    # Offset (-100, -100): revised (-98, -98) / 141.42 -> (-0.693, -0.693): both beyond 0.5.
    assert relative_position(box(5, 5), box(105, 105)) == {"left of", "above"}
    # Offset (-100, -40) (about 22 degrees): revised (-98, -38) / 107.70 -> (-0.910, -0.353):
    # only the x component passes the 0.5 cut.
    assert relative_position(box(5, 5), box(105, 45)) == {"left of"}


def test_relative_position_size_revision_removes_close_pair() -> None:
    # 100-px boxes whose centres are 30 px apart horizontally: offset (-30, 0). Raw direction
    # would be dx = -1 (left of), but slack 0.1*(100+100)=20 leaves revised -10 -> dx = -1/3.
    a, b = (0, 0, 100, 100), (30, 0, 130, 100)
    assert relative_position(a, b) == set()
    # Without the revision the same pair IS left of.
    assert relative_position(a, b, position_threshold=0.0) == {"left of"}


def test_relative_position_half_is_not_enough() -> None:
    # Offset -40, slack 20 -> revised -20 / 40 = -0.5 exactly; the cut is strict (< -0.5).
    assert relative_position((0, 0, 100, 100), (40, 0, 140, 100)) == set()
    # One more pixel: revised -21 / 41 = -0.512 -> left of.
    assert relative_position((0, 0, 100, 100), (41, 0, 141, 100)) == {"left of"}


# ------------------------------------------------------------------------------------------
# filter_detections
# ------------------------------------------------------------------------------------------


def test_filter_threshold_is_strict_and_sorts() -> None:
    dets = {"circle": [det(0, 0, 0.3), det(10, 0, 0.31), det(20, 0, 0.8)], "square": [det(0, 0, 0.2)]}
    kept = filter_detections(dets, "single_object")
    # 0.3 is not > 0.3: dropped; the rest sorted 0.8, 0.31; square has nothing left -> no key.
    assert [d.score for d in kept["circle"]] == [0.8, 0.31]
    assert "square" not in kept


def test_filter_counting_threshold() -> None:
    dets = {"circle": [det(0, 0, 0.9), det(10, 0, 0.91), det(20, 0, 0.5)]}
    # counting: only > 0.9 survives (0.9 itself excluded); any other tag: > 0.3.
    assert [d.score for d in filter_detections(dets, "counting")["circle"]] == [0.91]
    assert len(filter_detections(dets, "colors")["circle"]) == 3


def test_filter_caps_at_max_objects_highest_first() -> None:
    dets = {"circle": [det(10 * i, 0, 0.40 + 0.01 * i) for i in range(20)]}  # scores 0.40..0.59
    kept = filter_detections(dets, "single_object")["circle"]
    assert len(kept) == 16
    # The 16 best are 0.59 down to 0.44; 0.40..0.43 are cut.
    assert kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)


def test_filter_nms_only_when_enabled() -> None:
    # Two nearly identical boxes (IoU ~0.8) and one far away.
    dets = {
        "circle": [
            Detection((0, 0, 10, 10), 0.9),
            Detection((1, 0, 11, 10), 0.8),
            Detection((50, 0, 60, 10), 0.7),
        ]
    }
    assert len(filter_detections(dets, "single_object")["circle"]) == 3  # default 1.0 = disabled
    kept = filter_detections(dets, "single_object", GenEvalConfig(nms_threshold=0.5))["circle"]
    assert [d.score for d in kept] == [0.9, 0.7]


def test_filter_is_idempotent() -> None:
    dets = {"circle": [det(10 * i, 0, 0.3 + 0.03 * i) for i in range(20)]}
    once = filter_detections(dets, "counting")
    assert filter_detections(once, "counting") == once


# ------------------------------------------------------------------------------------------
# judge: single_object / two_object
# ------------------------------------------------------------------------------------------


def test_single_object_threshold_boundary() -> None:
    # Score exactly 0.3 is filtered out -> found 0 < 1 -> incorrect.
    v = judge(SINGLE, {"circle": [det(5, 5, 0.3)]})
    assert not v.correct and "expected 1 circle, found 0" in v.reason
    # 0.31 passes -> correct.
    assert judge(SINGLE, {"circle": [det(5, 5, 0.31)]}).correct


def test_missing_class_and_two_object() -> None:
    assert not judge(SINGLE, {}).correct
    assert not judge(SINGLE, {"square": [det(5, 5)]}).correct  # wrong class only
    assert judge(TWO, {"circle": [det(5, 5)], "square": [det(50, 5)]}).correct
    v = judge(TWO, {"circle": [det(5, 5)]})
    assert not v.correct and "square" in v.reason and "circle" not in v.reason


def test_extra_objects_pass_official_but_not_exact() -> None:
    # 3 circles for "a circle": official needs >= 1 (no exclude clause) -> correct.
    dets = {"circle": [det(5, 5), det(50, 5), det(95, 5)]}
    assert judge(SINGLE, dets).correct
    # Flow-GRPO's exact verdict needs exactly 1 -> incorrect.
    assert not judge_exact(SINGLE, dets).correct


# ------------------------------------------------------------------------------------------
# judge: counting
# ------------------------------------------------------------------------------------------


def test_counting_exact_met() -> None:
    # 3 circles at 0.95 > 0.9: include (>= 3) holds; exclude needs >= 4 to fail -> correct.
    dets = {"circle": [det(5, 5), det(50, 5), det(95, 5)]}
    assert judge(COUNT3, dets).correct
    assert judge_exact(COUNT3, dets).correct


def test_counting_short_because_of_counting_threshold() -> None:
    # Third circle scores exactly 0.9: not > 0.9 on a counting prompt -> found 2 < 3.
    dets = {"circle": [det(5, 5), det(50, 5), det(95, 5, 0.9)]}
    v = judge(COUNT3, dets)
    assert not v.correct and "expected 3 circle, found 2" in v.reason
    # The same detections on a non-counting prompt asking for 3 circles (cut 0.3) pass.
    assert judge(record("two_object", [{"class": "circle", "count": 3}]), dets).correct


def test_counting_one_too_many_fails_through_exclude() -> None:
    # 4 circles: include (>= 3) holds, exclude {circle, 4} sees 4 >= 4 -> incorrect.
    dets = {"circle": [det(5, 5), det(50, 5), det(95, 5), det(140, 5)]}
    v = judge(COUNT3, dets)
    assert not v.correct and "fewer than 4 circle, found 4" in v.reason


def test_exclude_counts_only_the_capped_detections() -> None:
    # 20 confident circles, but only the top 16 survive filtering: exclude {circle, 17} sees 16.
    meta = record("counting", [{"class": "circle", "count": 16}], [{"class": "circle", "count": 17}])
    dets = {"circle": [det(20 * i, 5) for i in range(20)]}
    assert judge(meta, dets).correct


# ------------------------------------------------------------------------------------------
# judge: colours
# ------------------------------------------------------------------------------------------


def test_colour_match_and_mismatch() -> None:
    assert judge(RED_CIRCLE, {"circle": [det(5, 5, color="red")]}).correct
    v = judge(RED_CIRCLE, {"circle": [det(5, 5, color="blue")]})
    assert not v.correct and "found 0 red" in v.reason and "1 blue" in v.reason


def test_colour_counted_among_found_only() -> None:
    # Top circle (0.9) is blue, a red one ranks second (0.8). found = top-1 = [blue] -> 0 red
    # -> incorrect, although a red circle exists.
    dets = {"circle": [det(50, 5, 0.8, "red"), det(5, 5, 0.9, "blue")]}
    assert not judge(RED_CIRCLE, dets).correct
    # Count 2: top-2 are [red 0.9, blue 0.8] -> 1 red < 2 -> incorrect, even with a third red.
    two_red = record("colors", [{"class": "circle", "count": 2, "color": "red"}])
    assert not judge(
        two_red, {"circle": [det(5, 5, 0.9, "red"), det(50, 5, 0.8, "blue"), det(95, 5, 0.7, "red")]}
    ).correct
    # Top-2 both red (blue third) -> correct.
    assert judge(
        two_red, {"circle": [det(5, 5, 0.9, "red"), det(50, 5, 0.8, "red"), det(95, 5, 0.7, "blue")]}
    ).correct


def test_color_attr_both_clauses() -> None:
    good = {"circle": [det(5, 5, color="red")], "square": [det(50, 5, color="blue")]}
    assert judge(RED_CIRCLE_BLUE_SQUARE, good).correct
    swapped = {"circle": [det(5, 5, color="blue")], "square": [det(50, 5, color="red")]}
    v = judge(RED_CIRCLE_BLUE_SQUARE, swapped)
    assert not v.correct and "red circle" in v.reason and "blue square" in v.reason


def test_colour_classifier_used_when_detection_has_no_colour() -> None:
    # Image: left half red, right half blue; the classifier reads the pixel at the box centre.
    image = np.zeros((20, 100, 3), np.uint8)
    image[:, :50] = (255, 0, 0)
    image[:, 50:] = (0, 0, 255)
    calls: list[Detection] = []

    def classify(img: np.ndarray, d: Detection, class_name: str) -> str:
        assert class_name == "circle"
        calls.append(d)
        x, y = int((d.box[0] + d.box[2]) / 2), int((d.box[1] + d.box[3]) / 2)
        return "red" if img[y, x, 0] > 128 else "blue"

    assert judge(RED_CIRCLE, {"circle": [det(20, 10)]}, image, classify).correct
    assert not judge(RED_CIRCLE, {"circle": [det(80, 10)]}, image, classify).correct
    # A colour the detector already knows wins; the classifier is not asked.
    calls.clear()
    assert judge(RED_CIRCLE, {"circle": [det(80, 10, color="red")]}, image, classify).correct
    assert calls == []


def test_colour_needed_but_unavailable_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no classify_color"):
        judge(RED_CIRCLE, {"circle": [det(5, 5)]})
    with pytest.raises(ValueError, match="image is None"):
        judge(RED_CIRCLE, {"circle": [det(5, 5)]}, None, lambda img, d, name: "red")
    # No colour needed when the count already fails: no error, just incorrect.
    assert not judge(RED_CIRCLE, {}).correct


# ------------------------------------------------------------------------------------------
# judge: position
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relation", "circle_at"),
    [("left of", (5, 55)), ("right of", (105, 55)), ("above", (55, 5)), ("below", (55, 105))],
)
def test_position_each_relation(relation: str, circle_at: tuple[float, float]) -> None:
    # Square at (55, 55); the circle sits 50 px away along one axis: |revised| 48 / 50 = 0.96.
    dets = {"square": [det(55, 55)], "circle": [det(*circle_at)]}
    assert judge(position(relation), dets).correct
    # The opposite placement (mirror through the square) fails.
    mirrored = {"square": [det(55, 55)], "circle": [det(110 - circle_at[0], 110 - circle_at[1])]}
    assert not judge(position(relation), mirrored).correct


def test_position_diagonal_satisfies_both_axes() -> None:
    # Circle up-left of the square at 45 degrees: dx = dy = -0.693 -> "left of" and "above".
    dets = {"square": [det(105, 105)], "circle": [det(5, 5)]}
    assert judge(position("left of"), dets).correct
    assert judge(position("above"), dets).correct
    assert not judge(position("below"), dets).correct


def test_position_dead_zone_fails() -> None:
    # Same centre: no relation at all -> "left of" fails and the reason says so.
    v = judge(position("left of"), {"square": [det(55, 55, size=30)], "circle": [det(55, 55)]})
    assert not v.correct and "no relation" in v.reason


def test_position_compares_only_top_target() -> None:
    # Two squares for a count-1 clause: only the top-scored one (at x=55) is the target. The
    # circle at x=5 is left of it, though right of the second square (x=-45).
    dets = {"square": [det(-45, 5, 0.5), det(55, 5, 0.9)], "circle": [det(5, 5)]}
    assert judge(position("left of"), dets).correct
    # Swap the scores: the target is now the square at x=-45 -> the circle is right of it.
    dets = {"square": [det(-45, 5, 0.9), det(55, 5, 0.5)], "circle": [det(5, 5)]}
    assert not judge(position("left of"), dets).correct


def test_position_every_found_object_against_every_target() -> None:
    # Two circles must both be left of the square; one is right of it -> incorrect.
    meta = record(
        "position",
        [{"class": "square", "count": 1}, {"class": "circle", "count": 2, "position": ["left of", 0]}],
    )
    assert judge(meta, {"square": [det(105, 5)], "circle": [det(5, 5), det(55, 5)]}).correct
    assert not judge(meta, {"square": [det(105, 5)], "circle": [det(5, 5), det(155, 5)]}).correct


def test_position_without_target() -> None:
    # No square: clause 0 fails; clause 1 then has no target -> two reasons.
    v = judge(position("left of"), {"circle": [det(5, 5)]})
    assert not v.correct
    assert "expected 1 square, found 0" in v.reason and "no square matched" in v.reason


def test_malformed_metadata_is_rejected() -> None:
    with pytest.raises(ValueError, match="relation"):
        judge(
            record(
                "position", [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]
            ),
            {},
        )
    with pytest.raises(ValueError, match="earlier include clause"):
        judge(record("position", [{"class": "b", "count": 1, "position": ["above", 0]}]), {})
    with pytest.raises(ValueError, match="count"):
        judge(record("single_object", [{"class": "a", "count": 0}]), {})
    with pytest.raises(ValueError, match="tag"):
        judge({"include": []}, {})


def test_real_metadata_parses() -> None:
    # Every upstream record (shipped next to the repo) is accepted; skipped when absent.
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"
    if not path.exists():
        pytest.skip("GenEval metadata not available")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == 553
    assert {r["tag"] for r in records} == set(GENEVAL_TAGS)
    for r in records:
        assert not judge(r, {}).correct  # nothing detected -> never correct, never an error


# ------------------------------------------------------------------------------------------
# partial_credit (Flow-GRPO training reward) and judge_exact
# ------------------------------------------------------------------------------------------


def test_partial_counting() -> None:
    # count 3: found 3 -> 1.0; found 2 -> 1 - 1/3; found 4 -> 1 - 1/3 (exclude not consulted).
    assert partial_credit(COUNT3, {"circle": [det(5, 5), det(50, 5), det(95, 5)]}) == pytest.approx(1.0)
    assert partial_credit(COUNT3, {"circle": [det(5, 5), det(50, 5)]}) == pytest.approx(2 / 3)
    four = {"circle": [det(5, 5), det(50, 5), det(95, 5), det(140, 5)]}
    assert partial_credit(COUNT3, four) == pytest.approx(2 / 3)
    assert not judge_exact(COUNT3, four).correct


def test_partial_too_many_goes_negative() -> None:
    # "a circle" with 3 circles: count term 1 - |1 - 3| / 1 = -1 (upstream does not clamp).
    assert partial_credit(SINGLE, {"circle": [det(5, 5), det(50, 5), det(95, 5)]}) == pytest.approx(-1.0)


def test_partial_colour() -> None:
    # Right colour: terms [1 (count), 1 (colour)] -> 1.0.
    assert partial_credit(RED_CIRCLE, {"circle": [det(5, 5, color="red")]}) == pytest.approx(1.0)
    # Wrong colour: [1, 1 - 1/1 = 0] -> 0.5.
    assert partial_credit(RED_CIRCLE, {"circle": [det(5, 5, color="blue")]}) == pytest.approx(0.5)
    # Missing: [1 - 1/1 = 0, 0 (colour skipped)] -> 0.0.
    assert partial_credit(RED_CIRCLE, {}) == pytest.approx(0.0)
    # Two circles (red + blue) for one: count term 1 - 1/1 = 0, plus 0 for the skipped colour.
    assert partial_credit(
        RED_CIRCLE, {"circle": [det(5, 5, 0.9, "red"), det(50, 5, 0.8, "blue")]}
    ) == pytest.approx(0.0)
    # color_attr with the square wrong: [1, 1] + [1, 0] -> 3/4.
    dets = {"circle": [det(5, 5, color="red")], "square": [det(50, 5, color="red")]}
    assert partial_credit(RED_CIRCLE_BLUE_SQUARE, dets) == pytest.approx(0.75)
    assert not judge_exact(RED_CIRCLE_BLUE_SQUARE, dets).correct


def test_partial_position_including_upstream_quirk() -> None:
    good = {"square": [det(55, 5)], "circle": [det(5, 5)]}
    # Satisfied: [1] + [1 (count), 1 (position)] -> 1.0.
    assert partial_credit(position("left of"), good) == pytest.approx(1.0)
    assert judge_exact(position("left of"), good).correct
    # Violated: upstream appends 0.0 then still 1.0 -> [1] + [1, 0, 1] -> 3/4.
    bad = {"square": [det(5, 5)], "circle": [det(55, 5)]}
    assert partial_credit(position("left of"), bad) == pytest.approx(0.75)
    assert not judge_exact(position("left of"), bad).correct
    # Two squares for count 1: clause 0 term 1 - 1/1 = 0 and it fails; clause 1 count term 1,
    # no target -> 0.0: [0] + [1, 0] -> 1/3 (the official judge passes: top square is the target).
    two_squares = {"square": [det(55, 5, 0.9), det(-45, 5, 0.5)], "circle": [det(5, 5)]}
    assert partial_credit(position("left of"), two_squares) == pytest.approx(1 / 3)
    assert judge(position("left of"), two_squares).correct


def test_partial_empty_include_is_zero() -> None:
    assert partial_credit(record("single_object", []), {"circle": [det(5, 5)]}) == 0.0


# ------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------


def test_summarize_per_tag_and_unweighted_overall() -> None:
    records = [{"tag": "counting", "correct": True}, {"tag": "counting", "correct": False}]
    records += [{"tag": "single_object", "correct": c} for c in (1, 1, 1, 0)]
    scores = summarize(records)
    # counting 1/2, single_object 3/4; overall = (0.5 + 0.75) / 2 = 0.625 (image-weighted would
    # be 4/6). GenEval's tag order, then "overall".
    assert scores == pytest.approx({"single_object": 0.75, "counting": 0.5, "overall": 0.625})
    assert list(scores) == ["single_object", "counting", "overall"]


def test_summarize_rejects_empty_and_incomplete() -> None:
    with pytest.raises(ValueError, match="no GenEval records"):
        summarize([])
    with pytest.raises(ValueError, match="'tag' and 'correct'"):
        summarize([{"tag": "colors"}])
