"""Run directories and atomic file writes.

Layout of a run directory::

    recipe.yaml               the resolved recipe (after --set overrides)
    metrics.jsonl             one JSON object per logged step
    samples/step_000100.png   image grids
    checkpoints/step_000100/  weights (safetensors) + trainer_state.json
    checkpoints/latest.json   {"step": 100, "dir": "step_000100"}: written last, atomically

Every file is written to a temporary name in the same directory and renamed into place, so a run
killed at any instant leaves either the old or the new file, never a torn one; ``latest.json`` is
only updated after the checkpoint it points to is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # mkstemp creates 0600, and some writers (safetensors) recreate the file as 0600: once
        # written, give it the permissions an ordinary open() would
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors_atomic(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a flat ``{name: tensor}`` dict as safetensors, atomically (tensors made contiguous)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a killed run loses at most the line in flight)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise OpdkitError(f"{path}:{i + 1}: corrupt JSON line") from None
    return records


def rewrite_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically (used to cut metrics back to a checkpoint on resume)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class RunDir:
    """A training run's directory (see the module docstring for its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"

    def prepare(self, recipe_yaml: str, resume: bool) -> None:
        """Create the directory; refuse to overwrite a previous run unless resuming."""
        if not resume and self.latest() is not None:
            raise OpdkitError(
                f"{self.root}: holds a previous run (checkpoint at step {self.latest()[0]}); "
                "pass --resume to continue it or --out to start elsewhere"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "recipe.yaml", recipe_yaml)
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def latest(self) -> tuple[int, Path] | None:
        """(step, directory) of the last complete checkpoint, or None."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.is_file():
            return None
        try:
            info = json.loads(pointer.read_text())
            return int(info["step"]), self.checkpoints / info["dir"]
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            raise OpdkitError(f"{pointer}: unreadable checkpoint pointer: {exc}") from None

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def commit_checkpoint(self, step: int, keep: int = 2) -> None:
        """Point ``latest.json`` at a complete checkpoint and prune older ones (keep the newest ``keep``)."""
        atomic_write_json(self.checkpoints / "latest.json", {"step": step, "dir": self.checkpoint_dir(step).name})
        done = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            if old != self.checkpoint_dir(step):
                shutil.rmtree(old, ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop metric lines logged after the checkpoint's step."""
        kept = [r for r in read_jsonl(self.metrics_path) if int(r.get("step", 0)) <= step]
        rewrite_jsonl(self.metrics_path, kept)
