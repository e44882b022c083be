"""GenEval scoring rules, the official verdict and Flow-GRPO's partial credit (over 500 lines: one parser, two graders).

The two graders walk the same parsed record and filtered detections clause by clause and differ in
small, upstream-mandated ways (see :func:`_flow_grpo_grade`), so they stay side by side in one module.

Pure Python/numpy: no detector, no CLIP, no torch. A detector plug-in turns an image into
:data:`Detections` (class name -> boxes with scores); this module decides whether the image
satisfies a GenEval metadata record. The same rules serve the GenEval benchmark (official
verdict, :func:`judge`), the GenEval training reward (:func:`partial_credit`) and the shapes
world, which swaps in its own detector and colour classifier.

Upstream references (facts re-implemented, not copied):

- ``djghosh13/geneval`` ``evaluation/evaluate_images.py``: detection filtering,
  ``relative_position`` and ``evaluate`` (the official verdict);
  ``evaluation/summary_scores.py``: per-tag means and the unweighted overall mean.
- ``yifan123/reward-server`` ``reward_server/gen_eval.py`` (the GenEval server that
  ``flow_grpo/rewards.py::geneval_score`` calls): ``evaluate_reward``, the partial-credit score
  and the exact-count ("strict") verdict used as Flow-GRPO's training signal.

Conventions: boxes are ``(x1, y1, x2, y2)`` in pixels with the image y axis pointing down, so
"above" means a smaller y. Relation strings are upstream's verbatim: ``"left of"``,
``"right of"``, ``"above"``, ``"below"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "GENEVAL_COLORS",
    "GENEVAL_TAGS",
    "RELATIONS",
    "ColorClassifier",
    "Detection",
    "Detections",
    "GenEvalConfig",
    "Verdict",
    "filter_detections",
    "judge",
    "judge_exact",
    "partial_credit",
    "relative_position",
    "summarize",
]

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""The six GenEval task tags, in the order upstream's metadata file and papers list them."""

RELATIONS = ("left of", "right of", "above", "below")
"""Relation strings exactly as they appear in GenEval metadata ``position`` entries."""

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""The ten colour names upstream's CLIP zero-shot classifier chooses among."""

# Below this magnitude (pixels) a revised centre offset counts as "no separation at all".
_DEAD_ZONE = 1e-3
# A normalised revised offset component must exceed this to name a relation (|cos| > 0.5,
# i.e. within 60 degrees of the axis).
_DIRECTION_CUTOFF = 0.5


@dataclass(frozen=True)
class Detection:
    """One detected object instance.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels; image y points down. Any length-4 sequence (a numpy
            row included) is accepted and stored as a tuple of Python floats.
        score: detector confidence in ``[0, 1]``.
        mask: optional ``(H, W)`` bool instance mask of the whole image (used by colour
            classifiers that paint the object onto a grey background). Excluded from equality
            and hashing, because numpy arrays have no single truth value.
        color: colour name when the detector already knows it (the shapes world's exact detector
            does); otherwise a :data:`ColorClassifier` is asked.
    """

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    color: str | None = None

    def __post_init__(self) -> None:
        box = tuple(float(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"Detection.box must be (x1, y1, x2, y2), got {len(box)} values: {self.box!r}")
        # frozen dataclass: normalise through object.__setattr__ (the documented idiom).
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "score", float(self.score))


Detections = dict[str, list[Detection]]
"""Class name -> detections of that class, in any order (filtering sorts them)."""

ColorClassifier = Callable[[np.ndarray, Detection, str], str]
"""``(image (H, W, 3) uint8, detection, class name) -> colour name`` for detections without
``color``; the class name is there because GenEval's CLIP prompts name the object
("a photo of a red dog")."""


@dataclass(frozen=True)
class GenEvalConfig:
    """Detection-filtering and geometry constants; the defaults are upstream's.

    Attributes:
        threshold: keep detections with score strictly greater than this (all tags but counting).
        counting_threshold: the same cut for ``tag == "counting"`` prompts.
        max_objects: keep at most this many detections per class (highest scores first).
        nms_threshold: per-class greedy NMS IoU cut; ``1.0`` (upstream default) disables NMS.
        position_threshold: fraction of the summed box sizes subtracted from centre offsets
            before deciding relative position.
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    nms_threshold: float = 1.0
    position_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GenEvalConfig.{name} must lie in [0, 1], got {value}")
        if self.max_objects < 1:
            raise ValueError(f"GenEvalConfig.max_objects must be >= 1, got {self.max_objects}")
        if self.position_threshold < 0:
            raise ValueError(f"GenEvalConfig.position_threshold must be >= 0, got {self.position_threshold}")


@dataclass(frozen=True)
class Verdict:
    """Whether one image satisfies its prompt, and a human-readable why.

    ``reason`` joins every failed check with ``"; "`` (upstream joins with newlines); it reads
    ``"ok"`` when the image is correct.
    """

    correct: bool
    reason: str


# --------------------------------------------------------------------------------------------
# Detection filtering and geometry
# --------------------------------------------------------------------------------------------


def _iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with upstream's inclusive-pixel convention (a box spans ``x2 - x1 + 1`` pixels)."""

    def area(x1: float, y1: float, x2: float, y2: float) -> float:
        return max(x2 - x1 + 1.0, 0.0) * max(y2 - y1 + 1.0, 0.0)

    inter = area(
        max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    )
    union = area(*box_a) + area(*box_b) - inter
    return inter / union if union else 0.0


def filter_detections(
    detections: Mapping[str, Sequence[Detection]], tag: str, config: GenEvalConfig = GenEvalConfig()
) -> Detections:
    """Apply GenEval's per-class detection filter.

    Per class: keep detections whose score is strictly greater than ``config.threshold``
    (``config.counting_threshold`` when ``tag == "counting"``), sort by score, highest first,
    keep the top ``config.max_objects``, then (only when ``nms_threshold < 1``) run greedy NMS.
    Classes left with nothing are dropped from the result, as upstream does.

    The filter is idempotent, so :func:`judge` and :func:`partial_credit` apply it themselves
    and callers may pass raw or already-filtered detections alike.

    Args:
        detections: class name -> detections in any order.
        tag: the GenEval tag of the prompt (selects the confidence threshold).
        config: thresholds.

    Returns:
        A new dict: class name -> non-empty list of detections sorted by descending score.
    """
    cut = config.counting_threshold if tag == "counting" else config.threshold
    result: Detections = {}
    for name, candidates in detections.items():
        # Python's sort is stable, so equal scores keep the detector's order.
        ranked = sorted((d for d in candidates if d.score > cut), key=lambda d: d.score, reverse=True)
        # Upstream truncates BEFORE NMS; keep that order so enabling NMS matches it too.
        ranked = ranked[: config.max_objects]
        if config.nms_threshold < 1.0:
            kept: list[Detection] = []
            for det in ranked:
                if all(_iou(det.box, k.box) < config.nms_threshold for k in kept):
                    kept.append(det)
            ranked = kept
        if ranked:
            result[name] = ranked
    return result


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = 0.1
) -> set[str]:
    """Relations of box A to box B, as GenEval decides them.

    With centres ``c`` and sizes ``dim = (w, h)`` (pixels), ``offset = c_A - c_B``; each
    component is shrunk towards zero by ``position_threshold * (dim_A + dim_B)`` (clamped at 0,
    sign kept), so boxes must be clearly apart, relative to their size, to be related. If both
    revised components are below 1e-3 there is no relation. Otherwise the revised offset is
    divided by the length of the ORIGINAL offset and a component beyond +-0.5 names a relation:
    ``dx < -0.5`` "left of", ``dx > 0.5`` "right of", ``dy < -0.5`` "above", ``dy > 0.5`` "below"
    (image y points down). A diagonal offset can therefore carry two relations (45 degrees gives
    about 0.707 on each axis), and a near-touching pair may carry none.

    Args:
        box_a, box_b: ``(x1, y1, x2, y2)`` in pixels.
        position_threshold: fraction of the summed sizes to subtract (upstream 0.1).

    Returns:
        A subset of :data:`RELATIONS`.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in box_b[:4])
    offset_x = (ax1 + ax2) / 2.0 - (bx1 + bx2) / 2.0
    offset_y = (ay1 + ay2) / 2.0 - (by1 + by2) / 2.0
    slack_x = position_threshold * (abs(ax2 - ax1) + abs(bx2 - bx1))
    slack_y = position_threshold * (abs(ay2 - ay1) + abs(by2 - by1))
    revised_x = math.copysign(max(abs(offset_x) - slack_x, 0.0), offset_x)
    revised_y = math.copysign(max(abs(offset_y) - slack_y, 0.0), offset_y)
    if abs(revised_x) < _DEAD_ZONE and abs(revised_y) < _DEAD_ZONE:
        return set()
    # A non-zero revised component implies a non-zero original offset, so this cannot be 0.
    length = math.hypot(offset_x, offset_y)
    dx, dy = revised_x / length, revised_y / length
    relations: set[str] = set()
    if dx < -_DIRECTION_CUTOFF:
        relations.add("left of")
    if dx > _DIRECTION_CUTOFF:
        relations.add("right of")
    if dy < -_DIRECTION_CUTOFF:
        relations.add("above")
    if dy > _DIRECTION_CUTOFF:
        relations.add("below")
    return relations


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clause:
    """One validated ``include``/``exclude`` entry of a GenEval record."""

    name: str
    count: int
    color: str | None = None
    relation: str | None = None
    target: int | None = None  # index of the referenced include clause


def _parse_record(metadata: Mapping[str, Any]) -> tuple[str, list[_Clause], list[_Clause]]:
    """Validate a GenEval metadata record; returns ``(tag, include, exclude)``.

    Raises:
        ValueError: naming the offending key when the record does not follow GenEval's schema.
    """
    if "tag" not in metadata:
        raise ValueError(f"GenEval metadata lacks 'tag': {dict(metadata)!r}")
    tag = str(metadata["tag"])

    def clause(raw: Any, where: str) -> _Clause:
        if not isinstance(raw, Mapping) or "class" not in raw or "count" not in raw:
            raise ValueError(f"GenEval metadata {where} must have 'class' and 'count', got {raw!r}")
        count = raw["count"]
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"GenEval metadata {where} 'count' must be an integer >= 1, got {count!r}")
        return _Clause(
            name=str(raw["class"]),
            count=int(count),
            color=None if raw.get("color") is None else str(raw["color"]),
        )

    include: list[_Clause] = []
    for i, raw in enumerate(metadata.get("include", [])):
        where = f"include[{i}]"
        base = clause(raw, where)
        if raw.get("position") is not None:
            position = raw["position"]
            if not isinstance(position, Sequence) or isinstance(position, str) or len(position) != 2:
                raise ValueError(
                    f"GenEval metadata {where} 'position' must be [relation, clause_index], got {position!r}"
                )
            relation, target = position
            if relation not in RELATIONS:
                raise ValueError(
                    f"GenEval metadata {where} relation {relation!r} is not one of {list(RELATIONS)}"
                )
            # Upstream reads the referenced clause's result while scanning in order, so the
            # reference must point at an earlier clause.
            if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < i:
                raise ValueError(
                    f"GenEval metadata {where} position index must refer to an earlier include clause (0..{i - 1}), got {target!r}"
                )
            base = _Clause(base.name, base.count, base.color, str(relation), int(target))
        include.append(base)
    exclude = [clause(raw, f"exclude[{i}]") for i, raw in enumerate(metadata.get("exclude", []))]
    return tag, include, exclude


def _colours(
    found: Sequence[Detection],
    image: np.ndarray | None,
    classify_color: ColorClassifier | None,
    class_name: str,
) -> list[str]:
    """Colour name of each detection: its own ``color`` if set, else the classifier's answer."""
    names: list[str] = []
    for det in found:
        if det.color is not None:
            names.append(det.color)
        elif classify_color is None:
            raise ValueError(
                "GenEval colour check: a detection has no 'color' and no classify_color was given"
            )
        elif image is None:
            raise ValueError("GenEval colour check: classify_color needs the image, but image is None")
        else:
            names.append(classify_color(image, det, class_name))
    return names


def _tally(names: Sequence[str]) -> str:
    """``"2 red, 1 blue"``: colour counts in first-seen order, for failure reasons."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{c} {n}" for n, c in counts.items())


def _position_failure(
    clause: _Clause,
    found: Sequence[Detection],
    targets: Sequence[Detection],
    target_name: str,
    config: GenEvalConfig,
) -> str | None:
    """First (object, target) pair lacking the relation, as a reason; ``None`` when all hold."""
    for obj in found:
        for ref in targets:
            rels = relative_position(obj.box, ref.box, config.position_threshold)
            if clause.relation not in rels:
                seen = " and ".join(r for r in RELATIONS if r in rels) or "no relation"
                return f"expected {clause.name} {clause.relation} {target_name}, found {seen}"
    return None


# --------------------------------------------------------------------------------------------
# Verdicts and rewards
# --------------------------------------------------------------------------------------------


def judge(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    image: np.ndarray | None = None,
    classify_color: ColorClassifier | None = None,
    config: GenEvalConfig = GenEvalConfig(),
) -> Verdict:
    """The official GenEval verdict for one image (djghosh13/geneval ``evaluate``).

    ``detections`` is filtered first with :func:`filter_detections` (threshold chosen by the
    record's tag). Then every ``include`` clause must hold, in order:

    - found = the top-``count`` detections of the class; need ``len(found) >= count``
      (more detections than asked are fine here; counting prompts police that with
      ``exclude``).
    - colour: at least ``count`` of *found* have the colour. Only found (the most confident
      ``count``) are classified, so a red object ranked below them cannot rescue the clause.
    - position ``[relation, k]`` (checked only when the count and colour checks passed): every
      found object has ``relation`` to every object found by include clause ``k``; if clause
      ``k`` failed, this clause fails too ("no target").

    Any ``exclude`` clause fails the image when the class has ``>= count`` (filtered)
    detections. Colours come from ``Detection.color`` or, failing that,
    ``classify_color(image, detection, class_name)``.

    Args:
        metadata: one GenEval record, ``{"tag", "prompt", "include": [...], "exclude"?: [...]}``.
        detections: class name -> detections (raw or filtered).
        image: ``(H, W, 3)`` uint8, needed only when ``classify_color`` is used.
        classify_color: colour classifier for detections without a colour.
        config: thresholds.

    Returns:
        The verdict; ``reason`` lists every failed check.

    Raises:
        ValueError: malformed metadata, or a colour is needed and cannot be obtained.
    """
    tag, include, exclude = _parse_record(metadata)
    kept = filter_detections(detections, tag, config)
    problems: list[str] = []
    # For each include clause: the objects it matched, or None if it failed (position targets).
    groups: list[list[Detection] | None] = []
    for clause in include:
        found = kept.get(clause.name, [])[: clause.count]
        failure: str | None = None
        if len(found) < clause.count:
            failure = f"expected {clause.count} {clause.name}, found {len(found)}"
        if failure is None and clause.color is not None:
            names = _colours(found, image, classify_color, clause.name)
            hits = names.count(clause.color)
            if hits < clause.count:
                failure = (
                    f"expected {clause.count} {clause.color} {clause.name}, found {hits} "
                    f"{clause.color} among the top {clause.count} ({_tally(names)})"
                )
        if failure is None and clause.relation is not None:
            assert clause.target is not None  # set together with relation by _parse_record
            targets = groups[clause.target]
            target_name = include[clause.target].name
            if targets is None:
                failure = f"no {target_name} matched for {clause.name} to be {clause.relation}"
            else:
                failure = _position_failure(clause, found, targets, target_name, config)
        if failure is not None:
            problems.append(failure)
        groups.append(None if failure is not None else found)
    for clause in exclude:
        present = len(kept.get(clause.name, []))
        if present >= clause.count:
            problems.append(f"expected fewer than {clause.count} {clause.name}, found {present}")
    return Verdict(correct=not problems, reason="; ".join(problems) if problems else "ok")


def _flow_grpo_grade(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    image: np.ndarray | None,
    classify_color: ColorClassifier | None,
    config: GenEvalConfig,
) -> tuple[float, Verdict]:
    """Flow-GRPO's ``evaluate_reward``: (partial-credit score, exact-count verdict).

    Grading per include clause, all terms pooled into one list and averaged at the end:

    - found = ALL filtered detections of the class (not only the top ``count``); the count term
      is ``1 - |count - len(found)| / count``. It is NOT clamped: 3 dogs for "a dog" give -1.
    - If ``len(found) != count`` the clause fails and, when it has a colour or a position, one
      extra term 0.0 is added (no colour/position grading on a wrong count).
    - Otherwise, colour adds ``1 - (count - n_colour) / count`` (fails unless all match), and
      position (only if the colour check passed) adds 0.0 when the referenced clause failed;
      else it adds 0.0 on the first violated pair and then 1.0 UNCONDITIONALLY, so a violated
      relation contributes the two terms [0.0, 1.0] and a satisfied one the single term 1.0.
      This mirrors upstream's loop exactly (a quirk, kept so rewards match Flow-GRPO's).
    - ``exclude`` clauses are ignored (the exact-count rule already covers them).
    - No terms at all (no include clause) gives 0.0.
    """
    tag, include, _ = _parse_record(metadata)
    kept = filter_detections(detections, tag, config)
    terms: list[float] = []
    problems: list[str] = []
    groups: list[list[Detection] | None] = []
    for clause in include:
        found = kept.get(clause.name, [])
        terms.append(1.0 - abs(clause.count - len(found)) / clause.count)
        failure: str | None = None
        if len(found) != clause.count:
            failure = f"expected exactly {clause.count} {clause.name}, found {len(found)}"
            if clause.color is not None or clause.relation is not None:
                terms.append(0.0)
        else:
            if clause.color is not None:
                names = _colours(found, image, classify_color, clause.name)
                hits = names.count(clause.color)
                terms.append(1.0 - (clause.count - hits) / clause.count)
                if hits != clause.count:
                    failure = (
                        f"expected {clause.count} {clause.color} {clause.name}, found {hits} "
                        f"{clause.color} ({_tally(names)})"
                    )
            if failure is None and clause.relation is not None:
                assert clause.target is not None
                targets = groups[clause.target]
                target_name = include[clause.target].name
                if targets is None:
                    failure = f"no {target_name} matched for {clause.name} to be {clause.relation}"
                    terms.append(0.0)
                else:
                    failure = _position_failure(clause, found, targets, target_name, config)
                    if failure is not None:
                        terms.append(0.0)
                    terms.append(1.0)  # upstream appends this even after a violation (see above)
        if failure is not None:
            problems.append(failure)
        groups.append(None if failure is not None else found)
    score = sum(terms) / len(terms) if terms else 0.0
    return score, Verdict(correct=not problems, reason="; ".join(problems) if problems else "ok")


def partial_credit(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    image: np.ndarray | None = None,
    classify_color: ColorClassifier | None = None,
    config: GenEvalConfig = GenEvalConfig(),
) -> float:
    """Flow-GRPO's partial-credit GenEval training reward for one image.

    Same filtering and arguments as :func:`judge`. Each include clause contributes a count term
    ``1 - |count - n| / count`` with ``n`` ALL filtered detections of the class, plus colour and
    position terms graded only when the count is exact; the reward is the mean of all terms.
    See :func:`_flow_grpo_grade` for the term-by-term rules.

    Range: at most 1.0 (every clause exact). It is NOT bounded below by 0, as upstream: too
    many detections make the count term negative (3 dogs for "a photo of a dog": count term -1,
    reward -1.0; the floor is ``1 - (max_objects - 1)`` for a count-1 clause). Clamp in the
    reward plug-in if a [0, 1] signal is required.
    """
    score, _ = _flow_grpo_grade(metadata, detections, image, classify_color, config)
    return score


def judge_exact(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    image: np.ndarray | None = None,
    classify_color: ColorClassifier | None = None,
    config: GenEvalConfig = GenEvalConfig(),
) -> Verdict:
    """Flow-GRPO's "strict" verdict: like :func:`judge` but counts must match EXACTLY.

    Every include clause needs exactly ``count`` filtered detections of its class, all of the
    required colour, and the relation to every object of the referenced clause; ``exclude`` is
    not consulted (exactness subsumes it). Logged beside the official verdict during training.
    """
    _, verdict = _flow_grpo_grade(metadata, detections, image, classify_color, config)
    return verdict


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """GenEval scores: per-tag mean of ``correct`` and the unweighted mean over tags.

    Args:
        records: one per image, each with ``"tag"`` and ``"correct"`` (bool or a number in
            [0, 1]; a partial-credit value averages the same way).

    Returns:
        ``{tag: mean}`` for every tag present (GenEval's six first, in :data:`GENEVAL_TAGS`
        order, then any other tag in first-seen order) plus ``"overall"``, the plain mean of
        those tag means, so a tag with few images weighs as much as one with many (upstream's
        "avg. over tasks").

    Raises:
        ValueError: no records, or a record without ``tag``/``correct``.
    """
    if not records:
        raise ValueError("summarize: no GenEval records to summarize")
    per_tag: dict[str, list[float]] = {}
    for i, rec in enumerate(records):
        if "tag" not in rec or "correct" not in rec:
            raise ValueError(f"summarize: record {i} needs 'tag' and 'correct', got keys {sorted(rec)}")
        per_tag.setdefault(str(rec["tag"]), []).append(float(rec["correct"]))
    order = [t for t in GENEVAL_TAGS if t in per_tag] + [t for t in per_tag if t not in GENEVAL_TAGS]
    scores = {tag: sum(per_tag[tag]) / len(per_tag[tag]) for tag in order}
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores
