"""Where scoring models' weights come from: a local path, a hub id, or the conversion cache.

One module for every model a scorer loads (GenEval's detector and CLIP, the preference models), so
that "is this a path or a hub id" is decided by one rule (:func:`looks_local`). Every plug-in
parameter that names weights accepts

* a local directory or file (used as is), or
* a Hugging Face hub id ``owner/name`` (a directory of a model) or ``owner/name:file`` (one file
  of a repository), resolved through the hub's own cache; downloads happen only where the hub
  client is online, and only for what the user (or a default they left in place) names.

When neither works, the error is ONE line that names what to fetch and which parameter to set,
so a recipe or an ``opdkit eval --param`` can point at a local copy instead. GenEval's models are
checked before any image is generated (:func:`resolve_pretrained`) and loaded on first use
(:func:`load_resolved`); the preference models load at once (:func:`load_pretrained`,
:func:`resolve_file`); each pair words its messages for its plug-ins (the GenEval ones point at
``hf download --local-dir`` and ``--param NAME=DIR``, the preference ones at the recipe key and
``--param NAME=PATH``).

Converted weights (HPSv2.1, ImageReward, the Aesthetic head) are written once into
``$OPDKIT_CACHE/preference/<kind>-<key>/`` (default ``~/.cache/opdkit``); ``key`` is derived from
the source file's absolute path, size and modification time, so a changed source converts again.
The source file's sha256 is recorded in the converted directory's ``opdkit_conversion.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from opdkit.data.cache import cache_dir
from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Written last into a converted directory: its presence means the conversion finished.
CONVERSION_RECORD = "opdkit_conversion.json"


def cache_root() -> Path:
    """``$OPDKIT_CACHE/preference`` (default ``~/.cache/opdkit/preference``)."""
    return cache_dir() / "preference"


def param_hint(param: str) -> str:
    """How a user points a plug-in at local weights, in a recipe and on the eval command line."""
    return f"set `{param}:` in the plug-in's params (recipe) or pass --param {param}=PATH (opdkit eval)"


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def looks_local(spec: str) -> bool:
    """True for things that can only be paths (``/x``, ``./x``, ``~/x``, ``a/b/c``), not hub ids."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def load_pretrained(loader: Callable[[str], T], spec: str, what: str, param: str) -> T:
    """``loader(path_or_id)`` with one-line errors for a missing directory or an unreachable hub id.

    Args:
        loader: e.g. ``CLIPModel.from_pretrained``.
        spec: local directory or hub id ``owner/name``.
        what: what is being loaded, for messages (``"PickScore model"``).
        param: the plug-in parameter that takes ``spec`` (named in the message).
    """
    path = Path(spec).expanduser()
    if path.exists():
        try:
            return loader(str(path))
        except (OSError, ValueError) as exc:
            raise OpdkitError(f"{what}: cannot load {str(path)!r}: {_first_line(exc)}") from None
    if looks_local(spec):
        raise OpdkitError(f"{what}: {spec!r} does not exist; {param_hint(param)}")
    try:
        return loader(spec)
    except (OSError, ValueError) as exc:
        raise OpdkitError(
            f"{what}: cannot load hub id {spec!r} (not in the local Hugging Face cache and the hub is not "
            f"reachable: {_first_line(exc, 100)}); fetch it with `hf download {spec}` where there is network, "
            f"or {param_hint(param)}"
        ) from None


def resolve_file(spec: str, what: str, param: str, fetch: str | None = None) -> Path:
    """A local file, or ``owner/name:file`` fetched through the hub client (its cache first).

    Args:
        spec: a path, or ``owner/name:filename`` on the Hugging Face hub.
        what: what the file is, for messages (``"HPSv2.1 checkpoint"``).
        param: the plug-in parameter that takes ``spec``.
        fetch: where to get the file when ``spec`` is a path that does not exist (a URL).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    repo, sep, filename = spec.partition(":")
    if sep and filename and not looks_local(repo) and repo.count("/") == 1:
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # hub errors have many types (offline, 404, auth): one line each
            raise OpdkitError(
                f"{what}: cannot fetch {filename!r} from hub repository {repo!r} ({type(exc).__name__}: "
                f"{_first_line(exc, 100)}); fetch it with `hf download {repo} {filename}` where there is "
                f"network, or {param_hint(param)}"
            ) from None
    where = f" (get it from {fetch})" if fetch else ""
    raise OpdkitError(f"{what}: {spec!r} does not exist{where}; {param_hint(param)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(spec: str, what: str, param: str) -> str:
    """Check that weights ``spec`` (a directory or a Hugging Face hub id) can be loaded; return it.

    Cheap: loads no model. A directory must hold ``config.json``. A hub id must already be in the
    Hugging Face cache, or (unless ``HF_HUB_OFFLINE`` is set) its ``config.json`` must download;
    the weights themselves are fetched when the model is first used.

    Args:
        spec: a local directory or a hub id such as ``openai/clip-vit-large-patch14``.
        what: what the weights are for, used in the message (``"the CLIP colour classifier"``).
        param: the benchmark/reward parameter that takes them (``"clip_model"``).

    Raises:
        OpdkitError: one line naming what to fetch and which parameter to set.
    """
    path = Path(spec).expanduser()
    if looks_local(spec) or path.exists():
        if not (path / "config.json").is_file():
            raise OpdkitError(f"{param}={spec}: not a model directory (no config.json) for {what}")
        return str(path)
    fetch = f"on a connected machine run `hf download {spec} --local-dir DIR`, then pass --param {param}=DIR"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # a malformed id: the checks below report it
        cached = None
    if isinstance(cached, str):
        return spec
    if _offline():
        raise OpdkitError(
            f"{what}: {spec!r} is not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set); {fetch}"
        )
    try:  # one small file proves the hub is reachable and the repository exists; weights come later
        from huggingface_hub import hf_hub_download

        hf_hub_download(spec, "config.json")
    except Exception as exc:
        raise OpdkitError(
            f"{what}: {spec!r} is not a local directory, not in the Hugging Face cache, and could not be fetched "
            f"({type(exc).__name__}: no network, or no such repository); {fetch}"
        ) from None
    return spec


def load_resolved(cls: Any, spec: str, what: str, param: str) -> Any:
    """``cls.from_pretrained(spec)`` for a ``spec`` :func:`resolve_pretrained` accepted; any failure is one line."""
    try:
        return cls.from_pretrained(spec)
    except Exception as exc:  # hub/network/cache/format failures come in many types: report one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if Path(spec).expanduser().is_dir():
            raise OpdkitError(f"{what}: cannot load {spec} ({type(exc).__name__}: {first}); check --param {param}") from None
        raise OpdkitError(
            f"{what}: cannot load {spec!r} ({type(exc).__name__}: {first}); on a connected machine run "
            f"`hf download {spec} --local-dir DIR`, then pass --param {param}=DIR"
        ) from None


def conversion_dir(kind: str, source: Path) -> Path:
    """Where the converted weights of ``source`` live (whether or not they exist yet)."""
    stat = source.resolve().stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{kind}-{key}"


def is_converted(directory: Path) -> bool:
    """A finished conversion (its record is written last)."""
    return (directory / CONVERSION_RECORD).is_file()


def write_converted(directory: Path, write: Callable[[Path], dict[str, Any]]) -> Path:
    """Run ``write(tmp_dir) -> record`` in a temporary directory and move it into place.

    A conversion killed half way leaves only a temporary directory behind, never a directory that
    :func:`is_converted` accepts. Two processes converting at once both succeed; the second
    rename finds the first's result and keeps it.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        record = write(tmp)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, directory)
        except OSError:  # the target appeared meanwhile (a concurrent conversion): keep it
            if not is_converted(directory):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_upstream_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from an upstream torch checkpoint, read with ``weights_only=True``.

    The upstream formats are pickled torch files, which ``torch.load(weights_only=True)`` reads
    without running arbitrary code. Accepts a bare state dict or ``{"state_dict": ...}`` (HPSv2's
    layout), and strips a ``module.`` prefix left by DistributedDataParallel.
    """
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; the safe loader refused or failed
        raise OpdkitError(
            f"{what} {str(path)!r}: not readable as a torch checkpoint with weights_only=True "
            f"({type(exc).__name__}: {_first_line(exc, 120)})"
        ) from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise OpdkitError(f"{what} {str(path)!r}: expected a state dict of tensors, got {type(loaded).__name__}")
    state = {str(k): v for k, v in loaded.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    others = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise OpdkitError(f"{what} {str(path)!r}: {len(others)} entries are not tensors: {', '.join(others[:10])}")
    return state


def resolve_device(device: str) -> str:
    """``"auto"``: the current CUDA device if there is one, else ``"cpu"``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str) -> torch.dtype:
    """``float32``/``fp32``, ``float16``/``fp16`` or ``bfloat16``/``bf16``."""
    import torch

    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    }  # fmt: skip
    if name not in table:
        raise OpdkitError(f"dtype {name!r}: expected one of {', '.join(table)}")
    return table[name]
