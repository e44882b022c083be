"""Packaging: the wheel installs only ``opdkit``; the core imports without the optional extras."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Not part of a build: VCS data, caches, earlier build outputs, run outputs.
IGNORED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "runs", "results")

OPTIONAL = (
    "rapidocr_onnxruntime",
    "mmdet",
    "mmcv",
    "hpsv2",
    "ImageReward",
    "open_clip",
    "timm",
    "torchvision",
    "matplotlib",
    "tensorboard",
)


def build_wheel(out_dir: Path) -> Path:
    """Build a wheel from a copy of the working tree (other developers share the checkout's build/)."""
    source = out_dir / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*IGNORED))
    dist = out_dir / "dist"
    # setuptools >= 70.1 builds wheels itself, so the declared `wheel` requirement may be absent.
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check"]
    proc = subprocess.run(
        [*cmd, "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("opdkit-*.whl")
    return wheel


def test_wheel_holds_only_the_opdkit_package(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()

    roots = {name.split("/")[0] for name in names}
    assert roots == {"opdkit", dist_info}, sorted(roots)
    assert top_level == ["opdkit"]
    for polluting in ("rewards", "teachers", "benchmarks", "recipes"):
        assert not any(n.startswith(f"{polluting}/") for n in names), polluting
    for required in (
        "opdkit/__init__.py",
        "opdkit/cli.py",
        "opdkit/registry.py",
        "opdkit/recipe.py",
        "opdkit/rewards/__init__.py",
        "opdkit/rewards/shapes.py",
        "opdkit/teachers/__init__.py",
        "opdkit/teachers/routers.py",
        "opdkit/teachers/regularizers.py",
        "opdkit/benchmarks/__init__.py",
        "opdkit/recipes/__init__.py",
        "opdkit/py.typed",
    ):
        assert required in names, required
    # Every module of the core package is shipped: a subpackage missing from [tool.setuptools]
    # packages would be left out silently (an editable install still finds it).
    for source in (REPO_ROOT / "opdkit").rglob("*.py"):
        assert f"opdkit/{source.relative_to(REPO_ROOT / 'opdkit').as_posix()}" in names, source
    # Every plug-in module of the source folders is shipped under opdkit.<folder>.
    for folder in ("rewards", "teachers", "benchmarks", "recipes"):
        for source in (REPO_ROOT / folder).glob("*.py"):
            assert f"opdkit/{folder}/{source.name}" in names, source
    # Every shipped recipe is package data.
    for recipe in (REPO_ROOT / "recipes").glob("**/*.yaml"):
        assert f"opdkit/recipes/{recipe.relative_to(REPO_ROOT / 'recipes').as_posix()}" in names, recipe
    assert "opdkit = opdkit.cli:main" in entry_points


def test_core_imports_without_optional_extras(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import importlib.abc
        import sys

        BLOCKED = {OPTIONAL!r}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked (optional extra not installed)")
                return None

        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Blocker())
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")

        import opdkit
        import opdkit.cli
        import opdkit.recipe
        import opdkit.registry
        from opdkit.registry import REGISTRIES

        for kind, registry in sorted(REGISTRIES.items()):
            names = registry.names()
            registry.entries()
            print(kind, len(names))
        assert REGISTRIES["reward"].names(), "no reward registered"
        leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        assert not leaked, leaked
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the repository root: top-level rewards/ must not be importable
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "ok"
    kinds = [line.split()[0] for line in proc.stdout.splitlines()[:-1]]
    assert kinds == sorted(
        ["reward", "teacher", "router", "regularizer", "benchmark", "model", "detector", "color_classifier", "ocr_engine"]
    )
