"""Run directories and atomic file writes (over 500 lines: what may change on --resume, the folder's
lock and its atomic files guard one thing, a run's folder, and are read together).

Layout of a run directory::

    recipe.yaml               the resolved recipe (after --set overrides)
    run.json                  the recipe the run started with, the fingerprints of its base and
                              teachers' weights, and its history (created, resumed, ...)
    metrics.jsonl             one JSON object per logged step
    samples/step_000100.png   image grids
    checkpoints/step_000100/  weights (safetensors) + trainer_state.json
    checkpoints/latest.json   {"step": 100, "dir": "step_000100"}: written last, atomically
    .lock                     held (``flock``) by the process training the run

Every file is written to a temporary name in the same directory and renamed into place, so a run
killed at any instant leaves either the old or the new file, never a torn one; ``latest.json`` is
only updated after the checkpoint it points to is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place.

    An OS error (no space, a read-only folder) names ``path``, not the temporary file or nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its errors name the folder it could not make
    with naming_path(path, "*"):  # mkstemp names its random temporary file
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with naming_path(path, tmp):
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
    """Append one JSON line and flush it to disk (a killed run loses at most the line in flight).

    A torn last line left by a process killed mid-append is repaired first (see
    :func:`repair_jsonl_tail`): appended onto, it would glue two records into one corrupt line in
    the middle of the file, which :func:`read_jsonl` refuses.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl_tail(path)
    line = json.dumps(record) + "\n"
    with naming_path(path), path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def repair_jsonl_tail(path: str | Path) -> bool:
    """Make a JSONL file end on a complete line; True if it had to be changed.

    A last line without its newline is the record a killed writer left half-written: when it
    still parses (only the newline was lost) the newline is added; otherwise the file is
    truncated to the end of the last complete line, so that record is written again in full.
    """
    path = Path(path)
    try:
        fh = path.open("rb+")
    except FileNotFoundError:
        return False
    with fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return False
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return False
        start = _last_line_start(fh, end)
        fh.seek(start)
        tail = fh.read(end - start)
        try:
            json.loads(tail)
            complete = True
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            complete = False
        if complete:
            fh.seek(end)
            fh.write(b"\n")
        else:
            fh.truncate(start)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _last_line_start(fh: Any, end: int, block: int = 1 << 16) -> int:
    """Offset just after the last newline before ``end`` (0 if none), read backwards in blocks."""
    pos = end
    while pos > 0:
        step = min(block, pos)
        fh.seek(pos - step)
        found = fh.read(step).rfind(b"\n")
        if found >= 0:
            return pos - step + found + 1
        pos -= step
    return 0


@contextmanager
def naming_path(path: str | Path, *aliases: str) -> Iterator[None]:
    """Make an OS error raised inside name ``path`` when the OS named no file (a failed write or
    fsync: no space left) or one of ``aliases`` (a temporary file; ``"*"``: any file).

    The CLI prints an OS error as ``FILE: reason``; without this a full disk reads "opdkit: No
    space left on device", and an atomic write names a ``.tmp`` file the user never asked for.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and "*" not in aliases and exc.filename not in aliases:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def check_out_folder(path: str | Path) -> None:
    """Refuse an ``--out`` that names a file: runs and results need a folder there."""
    if Path(path).exists() and not Path(path).is_dir():
        raise OpdkitError(f"{path}: --out is a file, not a folder")

LOCK_FILE = ".lock"
# What holds a run folder's lock, as the refusals of a second training and of readers name it.
TRAINING_HOLDER = "another opdkit process is training this run"
# The lock files this process holds: flock conflicts between two descriptors of one process too,
# so a training's own eval must not take its run's lock for another process's.
_HELD_LOCKS: set[Path] = set()


@contextmanager
def folder_lock(root: Path, holder: str, advice: str) -> Iterator[None]:
    """Hold ``root/.lock`` exclusively for the block; refuse at once if another process holds it,
    with ``ROOT: HOLDER (it holds ROOT/.lock); ADVICE``.

    ``flock`` locks belong to the open file, so the kernel releases this one when the process
    exits or is killed; the file itself stays (deleting it would let a third process lock a new
    file while the second still holds the old one). ``root`` must exist. Where the file system
    cannot lock (some NFS and Lustre mounts), the block runs unguarded, with a warning.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): run unlocked
        yield
        return
    path = root / LOCK_FILE
    with naming_path(path):
        # read-only: flock needs no write access, and the file is never changed once it exists
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OpdkitError(f"{root}: {holder} (it holds {path}); {advice}") from None
        except OSError as exc:  # a file system without flock (some NFS and Lustre mounts): work unguarded
            import warnings

            warnings.warn(f"{path}: cannot lock it ({exc.strerror}), so nothing stops a second opdkit process "
                          f"from writing {root} at the same time", stacklevel=3)  # fmt: skip
        held = path.resolve()
        _HELD_LOCKS.add(held)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(held)
    finally:
        os.close(fd)


def locked_elsewhere(root: Path) -> bool:
    """Whether another process holds ``root/.lock`` now (see :func:`folder_lock`).

    The probe takes and drops a shared lock at once; a training starting in that instant is
    refused as if another run held the folder, which a retry settles.
    """
    path = root / LOCK_FILE
    try:
        import fcntl
    except ImportError:
        return False
    if not path.is_file() or path.resolve() in _HELD_LOCKS:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # cannot lock here: nothing to learn
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def refuse_a_run_in_training(run: Path, subject: str, advice: str) -> None:
    """Refuse to read a run's final weights while another process trains it (a ``--resume`` with
    more steps is about to replace them): ``SUBJECT: TRAINING_HOLDER (it holds RUN/.lock), so its
    final weights are about to change; ADVICE``."""
    if locked_elsewhere(run):
        raise OpdkitError(f"{subject}: {TRAINING_HOLDER} (it holds {run / LOCK_FILE}), so its final weights "
                          f"are about to change; {advice}")  # fmt: skip


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
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


# What a run writes into its folder: a new run refuses a folder holding any of them.
RUN_FILES = ("recipe.yaml", "run.json", "metrics.jsonl", "checkpoints", "final", "model", "samples",
             "tensorboard", "ranks", "results")  # fmt: skip
# Recipe keys that only extend or observe a run: --resume accepts a change to them (recorded).
EXTENDING_KEYS = ("train.max_steps", "train.max_minutes", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.log_every", "train.sample_every", "eval", "description")  # fmt: skip


def _extends(key: str, recipe: dict[str, Any] | None = None) -> bool:
    """Whether a change to ``key`` only extends or observes a run of ``recipe`` (as started)."""
    if key == "train.max_steps" and recipe is not None and _cosine_ends_at_max_steps(recipe):
        return False  # the whole schedule is stretched, not the run extended
    return any(key == k or key.startswith(k + ".") for k in EXTENDING_KEYS)


def _cosine_ends_at_max_steps(recipe: dict[str, Any]) -> bool:
    """A cosine lr whose end is ``train.max_steps``: a resumed run with another ``max_steps`` would take
    its next steps on another curve (from 0 at the old end back up, or a jump), neither run's schedule."""
    train = recipe.get("train") or {}
    return train.get("lr_decay") == "cosine" and not train.get("lr_decay_steps")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key.path -> (old, new)`` for every leaf that differs between two resolved recipes."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def fixed_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The :func:`recipe_changes` that a resumed run refuses: every key but :data:`EXTENDING_KEYS`
    (and ``train.max_steps`` too when a cosine lr ends there: set ``train.lr_decay_steps`` to extend)."""
    return {k: v for k, v in recipe_changes(old, new).items() if not _extends(k, old)}


def teacher_changes(
    fixed: dict[str, tuple[Any, Any]], old_recipe: dict[str, Any], recorded: dict[str, str] | None,
    now: Callable[[], dict[str, str]],
) -> dict[str, tuple[Any, Any]]:  # fmt: skip
    """``fixed`` with its teachers judged by their weights, not their paths.

    ``recorded``: name -> :func:`opdkit.training.teachers.teacher_weights` as the run found them at
    its start; ``now()``: the same of the recipe's teachers today. A ``teachers.N.path`` change is
    dropped when the teacher there holds the recorded weights (a study folder moved, ``--out``
    spelled another way); a teacher whose weights changed, at its old path or a new one, is added
    as ``teachers.N.weights``: a student resumed on other teachers would mix two runs. A run that
    recorded no weights (made before they were recorded) is judged by its paths alone.
    """
    if not recorded:
        return fixed
    names = [t.get("name") if isinstance(t, dict) else None for t in old_recipe.get("teachers") or []]
    current = now()
    judged = dict(fixed)
    for i, name in enumerate(names):
        was, found = recorded.get(str(name)), current.get(str(name))
        if was is None or found is None:  # not fingerprinted, or not found (loading says why)
            continue
        if was == found:
            judged.pop(f"teachers.{i}.path", None)
        else:
            judged[f"teachers.{i}.weights"] = (was, found)
    return judged


def recipe_fingerprint(recipe: dict[str, Any]) -> str:
    """SHA-256 of a resolved recipe without the keys that only extend or observe a run."""
    import hashlib

    kept = {k: v for k, v in _flatten(recipe).items() if not _extends(k, recipe)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def remove_leftover_tmp(root: Path, subfolders: tuple[str, ...] = ()) -> None:
    """Delete the ``.NAME.*.tmp`` files killed atomic writes (:func:`atomic_path`) left in ``root``
    and below its named ``subfolders`` (never below others: ``--out .`` may be anywhere)."""
    found = list(root.glob(".*.tmp"))
    for sub in subfolders:
        if (root / sub).is_dir():
            found += (root / sub).rglob(".*.tmp")
    for leftover in found:
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


class RunDir:
    """A training run's directory (see the module docstring for its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"

    def run_files(self) -> list[str]:
        """The names in the folder that a run writes (and a new run would overwrite)."""
        if not self.root.is_dir():
            return []
        return sorted(name for name in RUN_FILES if (self.root / name).exists())

    def check_start(
        self, recipe: dict[str, Any], base: str, *, resume: bool, overwrite: bool,
        read_recipe: Callable[[Path], dict[str, Any]] | None = None,
        teachers: Callable[[], dict[str, str]] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Refuse what would lose or mix runs, before anything is written; returns the history entry.

        A new run refuses a folder holding any file a run writes, unless ``overwrite``. A resumed
        run refuses a recipe that differs from the one the folder was started with in any key but
        those that only extend or observe a run (:data:`EXTENDING_KEYS`), and other base weights;
        teachers are judged by their weights (``teachers()``: name -> fingerprint, recorded when a
        run is created; :func:`teacher_changes`): a path may change, the weights may not.
        ``read_recipe`` reads the ``recipe.yaml`` of a run made before ``run.json`` existed.
        """
        fingerprints = teachers or dict
        check_out_folder(self.root)
        present = self.run_files()
        if not resume:
            if present and not overwrite:
                raise OpdkitError(
                    f"{self.root}: holds a run ({', '.join(present)}); pass --resume to continue it, "
                    "--overwrite to replace it, or --out to start elsewhere"
                )
            return {"event": "created", "base": base, "teachers": fingerprints()}
        before = self.read_info()
        legacy = self.root / "recipe.yaml"
        if before:
            old_recipe = before.get("recipe")
        else:
            old_recipe = read_recipe(legacy) if read_recipe is not None and legacy.is_file() else None
        if old_recipe is None:
            import warnings

            # said aloud: a mistyped --out would otherwise start a long run from scratch unnoticed
            warnings.warn(f"{self.root}: --resume found no run here to continue; starting a new one", stacklevel=2)
            return {"event": "created", "base": base, "teachers": fingerprints()}
        changed = recipe_changes(old_recipe, recipe)
        fixed = teacher_changes(
            fixed_changes(old_recipe, recipe), old_recipe, (before or {}).get("teacher_weights"), fingerprints
        )
        if fixed:
            shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in sorted(fixed.items()))
            if "train.max_steps" in fixed:
                raise OpdkitError(
                    f"{self.root}: --resume with a changed recipe ({shown}); this run's cosine lr ends at its "
                    f"train.max_steps, so another one would change every later step's lr: resume with "
                    f"train.max_steps {fixed['train.max_steps'][0]!r}, or start a new run with --out"
                )
            raise OpdkitError(
                f"{self.root}: --resume with a changed recipe ({shown}); only "
                f"{', '.join(EXTENDING_KEYS)} may change: start a new run with --out"
            )
        if before and before.get("base_weights") not in (None, base):
            raise OpdkitError(
                f"{self.root}: --resume on other base weights (the run started on {before['base_weights']}, "
                f"the model now is {base}); start a new run with --out"
            )
        latest, max_steps = self.latest(), (recipe.get("train") or {}).get("max_steps")
        if latest is not None and isinstance(max_steps, int) and latest[0] > max_steps:
            # the weights would stay those of the later step while the run records the lower count
            raise OpdkitError(
                f"{self.root}: --resume with train.max_steps {max_steps}, but the run is already at step "
                f"{latest[0]} (its last checkpoint); pass train.max_steps >= {latest[0]}, or start a new run with --out"
            )
        return {"event": "resumed", "base": base, "changed": {k: list(v) for k, v in changed.items()}}

    def prepare(
        self, recipe_yaml: str, resume: bool, *, recipe: dict[str, Any], entry: dict[str, Any], overwrite: bool = False
    ) -> None:
        """Create the folder (after :meth:`check_start`): remove a replaced run's files, leftover
        ``.tmp`` files of killed writes, write the resolved recipe and the run's history."""
        if overwrite and not resume:
            for name in self.run_files():
                target = self.root / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        remove_leftover_tmp(self.root, ("checkpoints", "final", "ranks", "model"))
        atomic_write_text(self.root / "recipe.yaml", recipe_yaml)
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        previous = self.read_info() if resume else None
        info = previous or {
            "recipe": recipe, "recipe_sha256": recipe_fingerprint(recipe), "base_weights": entry["base"],
            **({"teacher_weights": entry["teachers"]} if entry.get("teachers") else {}),
        }  # fmt: skip
        event = {k: v for k, v in entry.items() if k not in ("base", "teachers")}
        atomic_write_json(self.info_path, {**info, "history": [*info.get("history", []), event]})

    @property
    def info_path(self) -> Path:
        return self.root / "run.json"

    def read_info(self) -> dict[str, Any] | None:
        """``run.json``: the recipe a run started with, its fingerprints and history; None if absent."""
        if not self.info_path.is_file():
            return None
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OpdkitError(f"{self.info_path}: unreadable run record ({exc}); move the folder aside") from None
        return info if isinstance(info, dict) else None

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
