"""The ``ocr`` benchmark and reward with the REAL PP-OCRv4 engine (rapidocr), prompt set, end to end.

The accuracy test renders the first 100 targets of flow_grpo's OCR test set as clean dark text on
a light 512 x 512 background (PIL + a TrueType font of the machine) and reads them back through
the ``ocr`` reward: the mean must be at least 0.95, and blank images must score near 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from opdkit.data import cache, sources
from opdkit.errors import OpdkitError
from opdkit.registry import benchmarks, rewards

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_SHA256 = "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc"
SIZE = 512
BACKGROUND = (245, 245, 240)
INK = (20, 20, 20)

needs_rapidocr = pytest.mark.skipif(
    importlib.util.find_spec("rapidocr_onnxruntime") is None,
    reason='rapidocr-onnxruntime not installed (pip install -e ".[ocr]")',
)


def shared_dir() -> Path:
    raw = Path(os.environ.get("OPDKIT_SHARED", "../shared"))
    return raw if raw.is_absolute() else (REPO_ROOT / raw).resolve()


def official_prompts() -> Path:
    path = shared_dir() / "data" / "ocr" / "test.txt"
    if not path.is_file():
        pytest.skip(f"flow_grpo OCR test prompts not found at {path} (set OPDKIT_SHARED to the shared folder)")
    return path


def find_font() -> str:
    """A TrueType font on this machine: DejaVu Serif preferred (its I and l differ, unlike sans fonts)."""
    candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ]
    if shutil.which("fc-match"):
        for family in ("DejaVu Serif", "serif"):
            proc = subprocess.run(["fc-match", "-f", "%{file}", family], capture_output=True, text=True, timeout=10)
            if proc.returncode == 0 and proc.stdout.endswith((".ttf", ".otf")):
                candidates.insert(0, proc.stdout)
    for path in candidates:
        if Path(path).is_file():
            return path
    pytest.skip("no TrueType font found (apt-get install -y fonts-dejavu-core)")


def render(text: str, font_path: str, size: int = SIZE) -> np.ndarray:
    """``text`` centred in dark ink on a light square, word-wrapped and shrunk to fit 90% of it."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    points = size // 10
    while True:
        font = ImageFont.truetype(font_path, points)
        lines: list[str] = []
        for word in text.split():
            trial = f"{lines[-1]} {word}" if lines else word
            if lines and draw.textlength(trial, font=font) <= 0.9 * size:
                lines[-1] = trial
            else:
                lines.append(word)
        fits = max(draw.textlength(line, font=font) for line in lines) <= 0.9 * size
        if (fits and len(lines) * points * 1.4 <= 0.9 * size) or points <= 12:
            break
        points -= 2
    draw.multiline_text((size / 2, size / 2), "\n".join(lines), fill=INK, font=font, anchor="mm", align="center", spacing=points // 3)
    return np.asarray(image)


def as_batch(images: list[np.ndarray]) -> Any:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1], the reward's input."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


# ------------------------------------------------------------------------------------------
# Prompt set
# ------------------------------------------------------------------------------------------


def test_official_prompt_set_loads_byte_for_byte() -> None:
    path = official_prompts()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == OFFICIAL_SHA256
    records, located = sources.load_ocr_prompts(path)
    assert located.official
    lines = [line for line in data.decode().splitlines() if line.strip()]
    assert len(records) == len(lines) == 1018
    assert [r["prompt"] for r in records] == [line.strip() for line in lines]
    # the target is upstream's prompt.split('"')[1]
    assert [r["text"] for r in records] == [line.split('"')[1] for line in lines]
    assert all(r["tag"] == "ocr" for r in records)


def test_ocr_benchmark_defaults_and_missing_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OpdkitError) as info:
        benchmarks.build("ocr", {})
    message = str(info.value)
    assert "\n" not in message and "--param prompts=PATH" in message and "download=true" in message
    custom = tmp_path / "mine.txt"
    custom.write_text('a sign that says "Hello"\n\nA poster reading "Open 24 Hours"\n')
    bench = benchmarks.build("ocr", {"prompts": str(custom)})
    assert [r["text"] for r in bench.prompts] == ["Hello", "Open 24 Hours"]
    assert bench.world == "sd3" and bench.family == "OCR" and bench.samples_per_prompt == 1
    assert bench.sampler == {"steps": 40, "cfg": 4.5, "resolution": 512, "shift": None}
    assert bench.protocol.startswith("flow_grpo-ocr/1+prompts-sha256:")
    bad = tmp_path / "bad.txt"
    bad.write_text("no quotes here\n")
    with pytest.raises(OpdkitError, match=r"bad.txt:1: .*double quotes"):
        benchmarks.build("ocr", {"prompts": str(bad)})


def test_ocr_download_with_monkeypatched_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = official_prompts().read_bytes()
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_fetch", lambda url, timeout=60.0: data)
    records, located = sources.load_ocr_prompts(download=True)
    assert len(records) == 1018 and located.official
    assert located.path == tmp_path / "cache" / "ocr" / "test.txt"


def test_missing_engine_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    # A fresh interpreter where rapidocr cannot be imported: the benchmark refuses before any work.
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["rapidocr_onnxruntime"] = None  # import fails as if not installed
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "rapidocr_onnxruntime" else real(name, *a)
        from opdkit.errors import OpdkitError
        from opdkit.scoring.ocr_engines import build_rapidocr
        from opdkit.registry import benchmarks
        for make in (lambda: build_rapidocr(), lambda: benchmarks.build("ocr", {{"prompts": {str(tmp_path / "p.txt")!r}}})):
            try:
                make()
            except OpdkitError as exc:
                print(exc)
        """
    )
    (tmp_path / "p.txt").write_text('a sign that says "Hi"\n')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all('pip install -e ".[ocr]"' in line for line in lines)


# ------------------------------------------------------------------------------------------
# The real engine
# ------------------------------------------------------------------------------------------


@needs_rapidocr
def test_ocr_reward_reads_clean_renders_and_not_blank_images() -> None:
    records, _ = sources.load_ocr_prompts(official_prompts())
    targets = [r["text"] for r in records[:100]]
    font = find_font()
    reward = rewards.build("ocr", {})
    start = time.perf_counter()
    scores: list[float] = []
    for first in range(0, len(targets), 10):  # 10 images of 512 x 512 at a time keeps memory small
        chunk = targets[first : first + 10]
        prompts = [f'a sign that says "{t}"' for t in chunk]
        out = reward(as_batch([render(t, font) for t in chunk]), prompts, [{} for _ in chunk])
        scores += out["score"].tolist()
        assert set(out) == {"score", "exact"}
    seconds = time.perf_counter() - start
    mean = sum(scores) / len(scores)
    misread = [(t, s) for t, s in zip(targets, scores, strict=True) if s < 1.0]
    print(f"OCR reward on 100 clean renders: mean {mean:.4f}, {len(misread)} imperfect {misread}, {seconds / 100:.3f} s/image")
    assert mean >= 0.95, misread
    blank = np.full((SIZE, SIZE, 3), BACKGROUND, dtype=np.uint8)
    out = reward(as_batch([blank] * 10), [f'a sign that says "{t}"' for t in targets[:10]], [{}] * 10)
    assert float(out["score"].mean()) <= 0.05


@needs_rapidocr
def test_opdkit_eval_ocr_end_to_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from opdkit.cli import app
    from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

    model = build_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    args = ["eval", "--bench", "ocr", "--model", str(model), "--limit", "8", "--steps", "2", "--out", str(tmp_path / "results")]
    args += ["--param", f"prompts={official_prompts()}", "--param", "resolution=32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    root = tmp_path / "results" / "tiny-sd3"
    summary = json.loads((root / "ocr.json").read_text())
    assert summary["bench"] == "ocr" and summary["family"] == "OCR" and summary["protocol"] == "flow_grpo-ocr/1"
    assert summary["engine"] == "rapidocr (PP-OCRv4 onnx)"
    assert summary["n_prompts"] == 8 and summary["n_images"] == 8
    assert set(summary["metrics"]) == {"overall", "exact"} and 0.0 <= summary["metrics"]["overall"] <= 1.0
    rows = [json.loads(line) for line in (root / "ocr.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "text", "score", "exact", "seed"} <= set(r) for r in rows)
    assert (root / "ocr.grid.png").stat().st_size > 0
