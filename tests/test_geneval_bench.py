"""The ``geneval`` benchmark and reward: official verdicts through the benchmark path, prompt set, plug-ins, end to end.

Hand-made detections go through the same code the runner uses (benchmark ``score`` ->
``summarize``) with a stub detector and a stub colour classifier swapped in; every expected value
is worked out in a comment. The real plug-ins (transformers Mask2Former and CLIP) are exercised
with tiny random models built offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opdkit import registry
from opdkit.data import cache, sources
from opdkit.errors import OpdkitError
from opdkit.registry import benchmarks, rewards
from opdkit.scoring import colors, detectors
from opdkit.scoring.geneval import GENEVAL_COLORS, GENEVAL_TAGS, Detection
from opdkit.scoring.geneval_scorer import GenEvalScorer
from tests.fixtures.geneval_models import save_tiny_clip, save_tiny_mask2former
from tests.fixtures.plugins import register_for_test

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"


def shared_dir() -> Path:
    """``$OPDKIT_SHARED`` (default ``../shared`` relative to the repository root)."""
    raw = Path(os.environ.get("OPDKIT_SHARED", "../shared"))
    return raw if raw.is_absolute() else (REPO_ROOT / raw).resolve()


def official_metadata() -> Path:
    path = shared_dir() / "data" / "geneval" / "evaluation_metadata.jsonl"
    if not path.is_file():
        pytest.skip(f"official GenEval metadata not found at {path} (set OPDKIT_SHARED to the shared folder)")
    return path


# ------------------------------------------------------------------------------------------
# Hand-made detections -> official verdict -> summary, through the benchmark
# ------------------------------------------------------------------------------------------

R_SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
R_TWO = {
    "tag": "two_object",
    "include": [{"class": "toilet", "count": 1}, {"class": "bicycle", "count": 1}],
    "prompt": "a photo of a toilet and a bicycle",
}
R_COUNT = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
    "prompt": "a photo of two clocks",
}
R_COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
R_POS = {
    "tag": "position",
    "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    "prompt": "a photo of a dog right of a teddy bear",
}
R_ATTR = {
    "tag": "color_attr",
    "include": [{"class": "wine glass", "count": 1, "color": "purple"}, {"class": "apple", "count": 1, "color": "black"}],
    "prompt": "a photo of a purple wine glass and a black apple",
}


def box(cx: float, cy: float, size: float = 100.0) -> tuple[float, float, float, float]:
    h = size / 2
    return (cx - h, cy - h, cx + h, cy + h)


def d(score: float, cx: float = 256, cy: float = 256) -> Detection:
    return Detection(box=box(cx, cy), score=score)


# Colours the stub classifier answers, by (class, box centre); objects carry no colour themselves,
# so the colour path of the rules (classifier calls) is what is tested.
COLOURS = {
    ("car", (100.0, 100.0)): "blue",
    ("car", (400.0, 400.0)): "red",
    ("wine glass", (100.0, 256.0)): "purple",
    ("apple", (400.0, 256.0)): "black",
    ("wine glass", (120.0, 256.0)): "black",
    ("apple", (420.0, 256.0)): "purple",
}

# (record, detections, official correct, strict, partial credit): one image each.
CASES: list[tuple[dict[str, Any], dict[str, list[Detection]], float, float, float]] = [
    # 0: one bench above 0.3 -> everything satisfied
    (R_SINGLE, {"bench": [d(0.31)]}, 1, 1, 1.0),
    # 1: score 0.30 is not > 0.3 -> nothing kept; partial count term 1 - |1 - 0| / 1 = 0
    (R_SINGLE, {"bench": [d(0.30)]}, 0, 0, 0.0),
    # 2: three benches: official needs >= 1 (ok); strict needs exactly 1; partial 1 - |1 - 3| = -1
    (R_SINGLE, {"bench": [d(0.9), d(0.8, 50, 50), d(0.5, 400, 400)]}, 1, 0, -1.0),
    # 3: both objects
    (R_TWO, {"toilet": [d(0.9)], "bicycle": [d(0.6, 400)]}, 1, 1, 1.0),
    # 4: bicycle below threshold: terms [1, 0] -> 0.5
    (R_TWO, {"toilet": [d(0.9)], "bicycle": [d(0.25, 400)]}, 0, 0, 0.5),
    # 5: two clocks above the counting threshold 0.9
    (R_COUNT, {"clock": [d(0.95), d(0.93, 400)]}, 1, 1, 1.0),
    # 6: three clocks: exclude (count 3) fires; partial 1 - |2 - 3| / 2 = 0.5
    (R_COUNT, {"clock": [d(0.95), d(0.93, 400), d(0.91, 100, 400)]}, 0, 0, 0.5),
    # 7: third clock at 0.85 is dropped by the counting threshold -> exactly two
    (R_COUNT, {"clock": [d(0.95), d(0.93, 400), d(0.85, 100, 400)]}, 1, 1, 1.0),
    # 8: second clock at 0.89 is dropped -> one clock; partial 1 - 1 / 2 = 0.5
    (R_COUNT, {"clock": [d(0.95), d(0.89, 400)]}, 0, 0, 0.5),
    # 9: the one car is red: count term 1 + colour term 1
    (R_COLOR, {"car": [d(0.9, 400, 400)]}, 1, 1, 1.0),
    # 10: top car blue, a red one ranked second: official classifies only the top one -> wrong;
    #     strict: two cars != 1; partial: count term 1 - |1 - 2| = 0 plus colour term 0 -> 0
    (R_COLOR, {"car": [d(0.9, 100, 100), d(0.8, 400, 400)]}, 0, 0, 0.0),
    # 11: dog centre (400, 256), teddy (100, 256), both 100 wide: offset (300, 0) minus
    #     0.1 * (100 + 100) = (280, 0) / 300 -> dx 0.93 > 0.5: right of. Terms [1, 1, 1]
    (R_POS, {"teddy bear": [d(0.9, 100)], "dog": [d(0.9, 400)]}, 1, 1, 1.0),
    # 12: dog 10 px right of the teddy: |10| - 20 < 0 -> revised (0, 0): no relation.
    #     Partial: [1 teddy, 1 dog count, 0 violated, 1 appended anyway] -> 0.75 (upstream quirk)
    (R_POS, {"teddy bear": [d(0.9, 100)], "dog": [d(0.9, 110)]}, 0, 0, 0.75),
    # 13: diagonal: offset (300, 300) -> revised (280, 280) / 424.3 = (0.66, 0.66): right of AND below
    (R_POS, {"teddy bear": [d(0.9, 100, 100)], "dog": [d(0.9, 400, 400)]}, 1, 1, 1.0),
    # 14: no teddy: clause 0 fails, so clause 1 has no target. Partial [0, 1, 0] -> 1/3
    (R_POS, {"dog": [d(0.9, 400)]}, 0, 0, 1 / 3),
    # 15: purple wine glass and black apple: terms [1, 1, 1, 1]
    (R_ATTR, {"wine glass": [d(0.9, 100)], "apple": [d(0.9, 400)]}, 1, 1, 1.0),
    # 16: colours swapped: terms [1, 0, 1, 0] -> 0.5
    (R_ATTR, {"wine glass": [d(0.9, 120)], "apple": [d(0.9, 420)]}, 0, 0, 0.5),
]

# Per tag, official correctness by hand: single [1, 0, 1] = 2/3; two [1, 0]; counting [1, 0, 1, 0];
# colors [1, 0]; position [1, 0, 1, 0]; color_attr [1, 0]  ->  overall = (2/3 + 5 * 0.5) / 6.
EXPECTED_SUMMARY = {
    "single_object": 2 / 3,
    "two_object": 0.5,
    "counting": 0.5,
    "colors": 0.5,
    "position": 0.5,
    "color_attr": 0.5,
    "overall": (2 / 3 + 5 * 0.5) / 6,
}


def case_images(indices: Sequence[int]) -> Any:
    """(B, 3, 8, 8) images whose every pixel is the case index / 255: the stub detector reads it back."""
    import torch

    return torch.stack([torch.full((3, 8, 8), i / 255.0) for i in indices])


@pytest.fixture
def stub_plugins(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[float, ...]]]:
    """Register a stub detector (detections by case index) and colour classifier; returns its call log."""
    calls: list[tuple[str, tuple[float, ...]]] = []

    def stub_detector() -> Callable[[Sequence[np.ndarray]], list[dict[str, list[Detection]]]]:
        return lambda images: [CASES[int(im[0, 0, 0])][1] for im in images]

    def stub_colour() -> Callable[[np.ndarray, Detection, str], str]:
        def classify(image: np.ndarray, det: Detection, name: str) -> str:
            calls.append((name, det.box))
            centre = ((det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2)
            return COLOURS[(name, centre)]

        return classify

    register_for_test(monkeypatch, registry.detectors, "stub", stub_detector)
    register_for_test(monkeypatch, registry.color_classifiers, "stub", stub_colour)
    return calls


def write_metadata(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hand_made_detections_give_official_verdicts_and_summary(
    tmp_path: Path, stub_plugins: list[tuple[str, tuple[float, ...]]]
) -> None:
    meta = write_metadata(tmp_path / "cases.jsonl", [c[0] for c in CASES])
    bench = benchmarks.build("geneval", {"metadata": str(meta), "detector": "stub", "color": "stub"})
    assert bench.world == "sd3" and bench.family == "GenEval" and bench.samples_per_prompt == 4
    # not the official file: the protocol says so, with the prompt file's digest
    assert bench.protocol.startswith("geneval-official/1+prompts-sha256:")
    indices = list(range(len(CASES)))
    scores = bench.score(case_images(indices), [r["prompt"] for r in bench.prompts], bench.prompts)
    for i, (_, _, correct, strict, partial) in enumerate(CASES):
        assert float(scores["score"][i]) == correct, f"case {i}: official"
        assert float(scores["strict"][i]) == strict, f"case {i}: strict"
        assert float(scores["partial"][i]) == pytest.approx(partial), f"case {i}: partial"
    # rows as the runner writes them -> the benchmark's summary
    rows = [{**rec, **{k: float(v[i]) for k, v in scores.items()}} for i, rec in enumerate(bench.prompts)]
    summary = bench.summarize(rows)
    assert list(summary) == [*GENEVAL_TAGS, "overall"]
    assert summary == pytest.approx(EXPECTED_SUMMARY)


def test_colour_asked_once_per_object_and_only_for_top_ranked(
    tmp_path: Path, stub_plugins: list[tuple[str, tuple[float, ...]]]
) -> None:
    meta = write_metadata(tmp_path / "cases.jsonl", [c[0] for c in CASES])
    bench = benchmarks.build("geneval", {"metadata": str(meta), "detector": "stub", "color": "stub"})
    bench.score(case_images([10]), [bench.prompts[10]["prompt"]], [bench.prompts[10]])
    # official, strict and partial all ask about the blue top car; one classifier call serves
    # them all, and the red runner-up is never looked at
    assert stub_plugins == [("car", box(100, 100))]


def test_reward_gives_partial_credit_and_logs_verdicts(stub_plugins: list[tuple[str, tuple[float, ...]]]) -> None:
    reward = rewards.build("geneval", {"detector": "stub", "color": "stub"})
    picks = [0, 2, 6, 12, 14]
    metadata = [CASES[i][0] for i in picks]
    out = reward(case_images(picks), [m["prompt"] for m in metadata], metadata)
    assert out["score"].tolist() == pytest.approx([CASES[i][4] for i in picks])
    assert out["correct"].tolist() == [CASES[i][2] for i in picks]
    assert out["strict"].tolist() == [CASES[i][3] for i in picks]
    strict = rewards.build("geneval", {"detector": "stub", "color": "stub", "strict": True})
    assert strict(case_images(picks), [m["prompt"] for m in metadata], metadata)["score"].tolist() == [CASES[i][3] for i in picks]
    clamped = rewards.build("geneval", {"detector": "stub", "color": "stub", "clamp": True})
    assert float(clamped(case_images([2]), ["x"], [CASES[2][0]])["score"][0]) == 0.0  # -1 clamped


# ------------------------------------------------------------------------------------------
# The official prompt set: from a path, byte for byte; pinned download; clear errors
# ------------------------------------------------------------------------------------------


def test_official_prompt_set_is_the_file_byte_for_byte() -> None:
    path = official_metadata()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == OFFICIAL_SHA256
    records, located = sources.load_geneval_metadata(path)
    assert located.official and located.sha256 == OFFICIAL_SHA256
    assert records == [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    # serialising the loaded records back reproduces the file exactly: nothing was altered
    # (upstream typos such as "a photo of four benchs" included)
    assert "".join(json.dumps(r) + "\n" for r in records).encode() == data
    assert len(records) == 553
    assert sum("benchs" in r["prompt"] for r in records) >= 1  # upstream typos kept verbatim


def test_official_prompt_set_through_the_benchmark(stub_plugins: list[tuple[str, tuple[float, ...]]]) -> None:
    path = official_metadata()
    bench = benchmarks.build("geneval", {"metadata": str(path), "detector": "stub", "color": "stub"})
    assert bench.protocol == "geneval-official/1"
    assert len(bench.prompts) == 553 and bench.samples_per_prompt == 4
    assert bench.sampler == {"steps": 40, "cfg": 4.5, "resolution": 512, "shift": None}
    assert {r["tag"] for r in bench.prompts} == set(GENEVAL_TAGS)
    classes = {clause["class"] for r in bench.prompts for clause in r["include"]}
    assert classes <= set(detectors.COCO_CLASSES)


def test_coco_class_list_matches_official_object_names() -> None:
    path = shared_dir() / "data" / "geneval" / "object_names.txt"
    if not path.is_file():
        pytest.skip(f"official object_names.txt not found at {path}")
    assert tuple(path.read_text().split("\n")[:80]) == detectors.COCO_CLASSES


def test_download_is_pinned_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))
    good = b'{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}\n'
    spec = cache.DatasetFile(
        name="test metadata",
        cache_name="geneval/test.jsonl",
        urls=((tmp_path / "missing.jsonl").as_uri(), (tmp_path / "bad.jsonl").as_uri(), (tmp_path / "good.jsonl").as_uri()),
        sha256=hashlib.sha256(good).hexdigest(),
        param="metadata",
        source="a test file",
    )
    (tmp_path / "bad.jsonl").write_bytes(good + b"tampered\n")
    (tmp_path / "good.jsonl").write_bytes(good)
    with pytest.raises(OpdkitError, match=r"--param metadata=PATH .* --param download=true"):
        cache.resolve_dataset_file(spec)
    # file:// URLs are fetched for real: the missing one and the tampered one are skipped
    located = cache.resolve_dataset_file(spec, download=True)
    assert located.official and located.path == tmp_path / "cache" / "geneval" / "test.jsonl"
    assert located.path.read_bytes() == good
    # later reads come from the cache without download=true; a corrupted cache is refused
    (tmp_path / "good.jsonl").unlink()
    assert cache.resolve_dataset_file(spec).path == located.path
    located.path.write_bytes(b"changed")
    with pytest.raises(OpdkitError, match="fails its sha256 check"):
        cache.resolve_dataset_file(spec)


def test_download_of_wrong_bytes_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_fetch", lambda url, timeout=60.0: b"not the official file\n")
    with pytest.raises(OpdkitError) as info:
        sources.load_geneval_metadata(download=True)
    message = str(info.value)
    assert "\n" not in message and "sha256" in message and "--param metadata=PATH" in message
    assert not (tmp_path / "cache" / "geneval" / "evaluation_metadata.jsonl").exists()


def test_official_download_path_with_monkeypatched_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = official_metadata().read_bytes()
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))
    fetched: list[str] = []

    def fetch(url: str, timeout: float = 60.0) -> bytes:
        fetched.append(url)
        return data

    monkeypatch.setattr(cache, "_fetch", fetch)
    records, located = sources.load_geneval_metadata(download=True)
    assert len(records) == 553 and located.official
    assert fetched == [sources.GENEVAL_METADATA.urls[0]]  # pinned commit first
    assert located.path.read_bytes() == data


def test_missing_metadata_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OpdkitError) as info:
        benchmarks.build("geneval", {})
    message = str(info.value)
    assert "\n" not in message
    assert "--param metadata=PATH" in message and "download=true" in message and "djghosh13/geneval" in message
    with pytest.raises(OpdkitError, match="no such file"):
        benchmarks.build("geneval", {"metadata": str(tmp_path / "nope.jsonl")})


# ------------------------------------------------------------------------------------------
# Real plug-ins with tiny random weights
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-geneval")
    return {
        "mask2former": save_tiny_mask2former(root / "mask2former", favour="bench"),
        "clip": save_tiny_clip(root / "clip"),
    }


def test_mask_to_box_is_tight_with_exclusive_edges() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert detectors.mask_to_box(mask) == (3.0, 2.0, 9.0, 5.0)
    assert detectors.mask_to_box(np.zeros((4, 4), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)


def test_object_crop_paints_background_grey_and_crops_to_box() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[:, :] = (200, 10, 10)
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    det = Detection(box=(4.4, 4.6, 12.0, 10.0), score=0.9, mask=mask)
    crop = np.asarray(colors.object_crop(image, det))
    # box rounded to (4, 5, 12, 10): 8 wide, 5 high
    assert crop.shape == (5, 8, 3)
    assert (crop[:, 1:6] == (200, 10, 10)).all()  # columns 5..9 are the object
    assert (crop[:, 0] == (0x99, 0x99, 0x99)).all() and (crop[:, 6:] == (0x99, 0x99, 0x99)).all()
    # without a mask the whole box is the object; a degenerate box still gives one pixel
    assert (np.asarray(colors.object_crop(image, Detection(box=(4, 5, 12, 10), score=1))) == (200, 10, 10)).all()
    assert np.asarray(colors.object_crop(image, Detection(box=(3, 3, 3, 3), score=1))).shape == (1, 1, 3)


def test_mask2former_detector_postprocessing(tiny_models: dict[str, Path]) -> None:
    detect = detectors.build_mask2former_detector(model=str(tiny_models["mask2former"]), device="cpu", short_side=128, long_side=213)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)]
    found = detect(images)
    assert len(found) == 2
    for image, per_class in zip(images, found, strict=True):
        dets = [det for items in per_class.values() for det in items]
        assert len(dets) == 100  # top 100 (query, class) pairs of 10 queries x 80 classes
        assert set(per_class) <= set(detectors.COCO_CLASSES)
        for det in dets:
            assert det.mask is not None and det.mask.shape == image.shape[:2] and det.mask.dtype == bool
            assert det.box == detectors.mask_to_box(det.mask)
            assert 0.0 <= det.score <= 1.0
        # every query predicts the favoured class with probability ~1: its scores are the mask scores
        assert sum(det.score > 0.3 for det in per_class["bench"]) >= 1
        assert all(det.score < 0.01 for name, items in per_class.items() if name != "bench" for det in items)


def test_clip_colour_classifier_with_tiny_model(tiny_models: dict[str, Path]) -> None:
    classify = colors.build_clip_color_classifier(model=str(tiny_models["clip"]), device="cpu")
    image = np.full((64, 64, 3), 180, dtype=np.uint8)
    image[16:48, 16:48] = (220, 30, 30)
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    det = Detection(box=(16, 16, 48, 48), score=0.9, mask=mask)
    first = classify(image, det, "car")
    assert first in GENEVAL_COLORS
    assert classify(image, det, "car") == first  # deterministic (eval mode, cached text weights)


def test_scorer_with_real_plugins_classifies_colours_of_masked_crops(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # every query of this tiny detector says "car": colour and position clauses reach CLIP with
    # real masks and boxes
    car_model = save_tiny_mask2former(tmp_path / "car-detector", favour="car")
    scorer = GenEvalScorer(
        detector_params={"model": str(car_model), "device": "cpu", "short_side": 128, "long_side": 213},
        color_params={"model": str(tiny_models["clip"]), "device": "cpu"},
    )
    assert scorer.engine == "mask2former (car-detector) + clip (clip)"
    asked: list[str] = []
    classify = scorer._classifier()
    scorer._classify = lambda image, det, name: asked.append(name) or classify(image, det, name)
    records = [
        R_COLOR,
        {"tag": "counting", "include": [{"class": "car", "count": 2}], "exclude": [{"class": "car", "count": 3}], "prompt": "a photo of two cars"},
    ]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    results = scorer.judge_batch(images, records)
    assert [set(r) for r in results] == [{"correct", "strict", "partial", "reason"}] * 2
    assert all(r["correct"] in (0.0, 1.0) and r["partial"] <= 1.0 for r in results)
    assert asked and set(asked) == {"car"}  # the colour of the top car was asked for
    assert results[1]["correct"] == 0.0  # ~0.5 scores never pass the 0.9 counting threshold


def test_missing_weights_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache: nothing to find
    meta = write_metadata(tmp_path / "m.jsonl", [R_SINGLE])
    with pytest.raises(OpdkitError) as info:
        benchmarks.build("geneval", {"metadata": str(meta), "detector_model": "someone/not-cached-mask2former"})
    message = str(info.value)
    assert "\n" not in message
    assert "hf download someone/not-cached-mask2former" in message and "--param detector_model=DIR" in message
    with pytest.raises(OpdkitError, match=r"clip_model=.*no config.json"):
        benchmarks.build("geneval", {"metadata": str(meta), "detector": "stub-missing:x", "clip_model": str(tmp_path)})


def test_mmdet_detector_is_optional() -> None:
    try:
        import mmdet  # noqa: F401
    except ImportError:
        with pytest.raises(OpdkitError, match=r"docs/geneval.md"):
            detectors.build_mmdet_detector(checkpoint="x.pth")
        return
    with pytest.raises(OpdkitError, match="mmdet_checkpoint"):
        detectors.build_mmdet_detector(checkpoint=None)


def test_mmdet_official_detector_runs() -> None:
    pytest.importorskip("mmdet", reason="mmdet not installed (optional extra; mmcv 2.1.0 must be built from source)")
    checkpoint = os.environ.get("OPDKIT_MMDET_CHECKPOINT")
    if not checkpoint:
        pytest.skip("set OPDKIT_MMDET_CHECKPOINT to the official GenEval Mask2Former .pth to run the mmdet detector")
    detect = detectors.build_mmdet_detector(checkpoint=checkpoint, device="cpu")
    found = detect([np.full((128, 128, 3), 127, dtype=np.uint8)])
    assert len(found) == 1
    for items in found[0].values():
        assert all(0.0 <= det.score <= 1.0 for det in items)


# ------------------------------------------------------------------------------------------
# The world check and `opdkit eval --bench geneval` end to end
# ------------------------------------------------------------------------------------------


def geneval_params(tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    """Official metadata when available, else a hand-written file in the same schema."""
    path = shared_dir() / "data" / "geneval" / "evaluation_metadata.jsonl"
    if not path.is_file():
        path = write_metadata(tmp_path / "fallback.jsonl", [c[0] for c in CASES[:: max(1, len(CASES) // 8)]][:8])
    return {
        "metadata": str(path),
        "detector_model": str(tiny_models["mask2former"]),
        "clip_model": str(tiny_models["clip"]),
        "device": "cpu",
    }


def test_geneval_refuses_shapes_models(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from opdkit.eval.runner import check_world, run_eval
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary

    bench = benchmarks.build("geneval", geneval_params(tiny_models, tmp_path))
    with pytest.raises(OpdkitError, match=r"shapes-base.*shapes-world model; use --bench shapes-geneval"):
        check_world(bench, "shapes", "shapes-base")
    # and through the runner, with a shapes pipeline directory named like the base model
    config = ShapesModelConfig(patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16)
    model_dir = build_shapes_pipeline(tmp_path / "shapes-base", shapes_vocabulary(), config)
    with pytest.raises(OpdkitError) as info:
        run_eval("geneval", str(model_dir), out_dir=tmp_path / "results", limit=1, bench_params=geneval_params(tiny_models, tmp_path))
    assert "use --bench shapes-geneval" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "results" / "shapes-base" / "geneval.jsonl").exists()


def test_opdkit_eval_geneval_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opdkit.cli import app
    from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

    model = build_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    params = geneval_params(tiny_models, tmp_path)
    args = ["eval", "--bench", "geneval", "--model", str(model), "--limit", "8", "--steps", "2", "--out", str(tmp_path / "results")]
    for key, value in {**params, "resolution": 32}.items():
        args += ["--param", f"{key}={value}"]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    root = tmp_path / "results" / "tiny-sd3"
    summary = json.loads((root / "geneval.json").read_text())
    assert summary["bench"] == "geneval" and summary["family"] == "GenEval" and summary["world"] == "sd3"
    # the official metadata has 553 prompts; the fallback file 8, all of which --limit 8 keeps (no subset)
    whole_set = sum(1 for line in Path(params["metadata"]).read_text().splitlines() if line.strip()) <= 8
    assert summary["n_prompts"] == 8 and summary["n_images"] == 32 and summary["limit"] == (None if whole_set else 8)
    assert summary["engine"] == "mask2former (mask2former) + clip (clip)"
    assert summary["sampler"] == {"steps": 2, "cfg": 4.5, "resolution": 32, "shift": None}
    assert 0.0 <= summary["metrics"]["overall"] <= 1.0
    rows = [json.loads(line) for line in (root / "geneval.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    for row in rows:
        assert {"prompt", "tag", "include", "seed", "score", "strict", "partial"} <= set(row)
        assert row["score"] in (0.0, 1.0) and row["strict"] in (0.0, 1.0) and row["partial"] <= 1.0
    if params["metadata"].endswith("evaluation_metadata.jsonl"):
        assert summary["protocol"] == "geneval-official/1"
        # the tiny detector sees benches everywhere: "a photo of a bench" (prompt 0) is satisfied
        assert all(r["score"] == 1.0 for r in rows if r["prompt_index"] == 0)
    assert (root / "geneval.grid.png").stat().st_size > 0
    print(f"opdkit eval --bench geneval --limit 8 (32 images): {seconds:.1f} s")
