"""Shared fixtures: a valid minimal recipe on disk, a way to forget modules a test imported, and a
way to signal a process at a chosen moment of its work."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# A valid GRPO recipe that loads no model: every line below is referred to by key, never by number.
MINIMAL_RECIPE = """\
method: grpo
description: minimal recipe written by the test-suite
model:
  type: shapes
prompts:
  dataset: shapes
rewards:
  - type: shapes_geneval
    weight: 1.0
    params:
      strict: false
sampler:
  steps: 4
  resolution: 32
train:
  seed: 0
  lr: 1.0e-4
  batch_size: 2
"""


@pytest.fixture(scope="session", autouse=True)
def library_loggers_bound_to_pytest() -> None:
    """Create transformers' and diffusers' log handlers before any test runs.

    Each library makes its stderr handler once, on the stream ``sys.stderr`` is at that moment.
    Made inside a ``CliRunner.invoke`` (the CLI imports them lazily), it keeps the runner's
    stream, which the runner closes when the invocation ends, and every later warning of that
    library prints "--- Logging error ---" with a traceback into another test's output. Made
    here, it holds pytest's stream, open for the session.
    """
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.get_logger("transformers")
    diffusers.utils.logging.get_logger("diffusers")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def shapes_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure the model registry knows ``shapes`` (the recipes' default model).

    While the built-in shapes model is not registered yet, a stub builder stands in for it; the
    stub is removed again after the test, so the global registry is left as it was.
    """
    from opdkit.registry import models

    if "shapes" in models.names():  # also imports the built-ins, so the stub cannot clash later
        return

    def shapes(path: str | None = None) -> None:
        """Stand-in for the built-in shapes model (test stub)."""

    monkeypatch.setattr(models, "_builders", {**models._builders, "shapes": shapes})
    monkeypatch.setattr(models, "_sources", {**models._sources, "shapes": "builtin"})


@pytest.fixture
def minimal_recipe_text() -> str:
    """The text of a valid minimal GRPO recipe (tests edit it into malformed ones)."""
    return MINIMAL_RECIPE


@pytest.fixture
def minimal_recipe(tmp_path: Path, shapes_model: None) -> Path:
    """A valid recipe file ``tmp_path/recipe.yaml``; its text is :data:`MINIMAL_RECIPE`."""
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL_RECIPE, encoding="utf-8")
    return path


@pytest.fixture
def forget_modules() -> Iterator[Callable[[str], None]]:
    """``forget_modules(prefix)``: drop modules named ``prefix``/``prefix.*`` from sys.modules after the test."""
    prefixes: list[str] = []
    yield prefixes.append
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


def _signal_when(
    process: subprocess.Popen[str], ready: Callable[[], bool], never: str, sig: int = signal.SIGKILL
) -> None:
    """Send ``sig`` to ``process`` as soon as ``ready()`` (polled, not timed: the signal lands
    inside the work however fast the machine is); fail if it exits first or ``never`` happens in
    240 s. Waits for the process to end."""
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, f"the run {never}"
            time.sleep(0.002)
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def signal_when() -> Callable[..., None]:
    """``signal_when(process, ready, never, sig=SIGKILL)``: see :func:`_signal_when`."""
    return _signal_when


# Holds the flock of the file it is given until its stdin closes: another opdkit process at work.
_HOLD_LOCK = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def _lock_held_elsewhere(path: Path) -> Iterator[None]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.fixture
def lock_held_elsewhere() -> Callable[[Path], AbstractContextManager[None]]:
    """``with lock_held_elsewhere(FOLDER / ".lock"):`` another process holds that lock (``flock``)
    for the block, as a running ``opdkit`` process would."""
    if sys.platform == "win32":
        pytest.skip("flock: POSIX only")
    return _lock_held_elsewhere
