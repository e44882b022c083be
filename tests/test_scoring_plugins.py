"""Detectors, colour classifiers and OCR engines as plug-in kinds, and plug-ins that take a scorer's parameters."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from opdkit.cli import app
from opdkit.errors import PluginError
from opdkit.registry import (
    REGISTRIES,
    Registry,
    benchmarks,
    check_builder_params,
    color_classifiers,
    detectors,
    ocr_engines,
    rewards,
    with_params_of,
)

BENCH = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
RED_BENCH = {"tag": "colors", "include": [{"class": "bench", "count": 1, "color": "red"}], "prompt": "a photo of a red bench"}

# A detector that sees one bench per image and a colour classifier that calls everything red,
# written to a file the way a user would.
PLUGINS = '''
from opdkit.scoring.geneval import Detection


def one_bench(score: float = 0.9):
    return lambda images: [{"bench": [Detection(box=(1, 1, 5, 5), score=score)]} for _ in images]


def all_red():
    return lambda image, detection, class_name: "red"


def reads_hello():
    return lambda image: "Hello"
'''


def test_scoring_kinds_hold_their_builtins() -> None:
    assert {"detector", "color_classifier", "ocr_engine"} <= set(REGISTRIES)
    assert {"mask2former", "mmdet"} <= set(detectors.names())
    assert "clip" in color_classifiers.names()
    assert "rapidocr" in ocr_engines.names()
    for registry in (detectors, color_classifiers, ocr_engines):
        assert all(entry.doc for entry in registry.entries())  # `opdkit list` describes each


@pytest.mark.parametrize(("kind", "name"), [("detector", "mask2former"), ("color_classifier", "clip"), ("ocr_engine", "rapidocr")])
def test_opdkit_list_shows_the_scoring_kinds(kind: str, name: str) -> None:
    for asked in (kind, f"{kind}s"):
        result = CliRunner().invoke(app, ["list", asked], env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        assert any(line.startswith(f"│ {name} ") and f"│ {kind} " in line for line in result.stdout.splitlines())


@pytest.fixture
def plugin_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_modules: Callable[[str], None]) -> Path:
    """``tmp_path/scoring_plugins.py``, importable as a module too; the current directory is ``tmp_path``."""
    (tmp_path / "scoring_plugins.py").write_text(textwrap.dedent(PLUGINS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_modules("scoring_plugins")
    return tmp_path / "scoring_plugins.py"


def test_detector_and_colour_classifier_by_file_and_by_module(plugin_file: Path) -> None:
    images = torch.zeros(2, 3, 8, 8)
    records = [BENCH, RED_BENCH]
    params = {"detector": "./scoring_plugins.py:one_bench", "color": "scoring_plugins:all_red"}
    reward = rewards.build("geneval", params)
    out = reward(images, [r["prompt"] for r in records], records)
    assert out["correct"].tolist() == [1.0, 1.0] and out["score"].tolist() == [1.0, 1.0]
    # the benchmark over the same scorer ranks by the official verdict
    meta = plugin_file.parent / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    bench = benchmarks.build("geneval", {**params, "metadata": str(meta)})
    scores = bench.score(images, [r["prompt"] for r in records], records)
    assert list(scores) == ["score", "strict", "partial"] and scores["score"].tolist() == [1.0, 1.0]
    assert bench.engine == "./scoring_plugins.py:one_bench + scoring_plugins:all_red"


def test_ocr_engine_by_file(plugin_file: Path) -> None:
    reward = rewards.build("ocr", {"engine": "./scoring_plugins.py:reads_hello"})
    out = reward(torch.zeros(2, 3, 8, 8), ['a sign that says "hello"', 'a sign that says "Bye"'], [{}, {}])
    assert out["score"].tolist() == [1.0, 0.0] and out["exact"].tolist() == [1.0, 0.0]


def test_unknown_detector_is_one_line_with_suggestions() -> None:
    with pytest.raises(PluginError, match=r"unknown detector 'mask2formr'; did you mean 'mask2former'"):
        detectors.get("mask2formr")


def test_with_params_of_adds_the_base_parameters_after_its_own() -> None:
    def base(model: str = "m", device: str = "cpu") -> tuple[str, str]:
        return model, device

    reg = Registry("reward")

    @reg.register("wrapped")
    @with_params_of(base)
    def wrapped(scale: float = 1.0, **model: str) -> tuple[float, tuple[str, str]]:
        return scale, base(**model)

    assert reg.build("wrapped", {"scale": 2.0, "device": "cuda"}) == (2.0, ("m", "cuda"))
    with pytest.raises(PluginError, match=r"unexpected keyword argument 'devcie' \(accepted: scale, model, device\)"):
        check_builder_params(wrapped, {"devcie": "cuda"}, "reward 'wrapped'")


def test_with_params_of_refuses_a_builder_that_cannot_take_them() -> None:
    def base(model: str = "m") -> str:
        return model

    with pytest.raises(TypeError, match="needs \\*\\*params"):
        with_params_of(base)(lambda scale=1.0: scale)
    with pytest.raises(TypeError, match="both take model"):
        with_params_of(base)(lambda model="x", **rest: model)
