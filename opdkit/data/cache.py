"""opdkit's download cache and the sha256-pinned upstream files it holds.

opdkit ships no third-party prompt files. A pinned file (:class:`DatasetFile`) is located in one of
three ways:

1. ``path``: a file the user already has (``--param metadata=/data/evaluation_metadata.jsonl``).
   Used as is; its sha256 is compared with the official one so results on a different prompt
   set are labelled as such (:attr:`PromptFile.official`).
2. the cache: a file downloaded earlier into ``$OPDKIT_CACHE`` (default ``~/.cache/opdkit``),
   re-verified by sha256 every time it is read.
3. ``download=True``: fetched from the upstream repository, verified against the pinned sha256
   and only then moved into the cache (a corrupted or changed upstream file never lands there).

Nothing is downloaded unless the user asks. Which files are pinned: :mod:`opdkit.data.sources`.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from opdkit.errors import OpdkitError
from opdkit.rundir import atomic_path

__all__ = ["DatasetFile", "PromptFile", "cache_dir", "resolve_dataset_file", "sha256_file"]


@dataclass(frozen=True)
class DatasetFile:
    """One pinned upstream file.

    Attributes:
        name: short name used in messages, e.g. ``"GenEval metadata"``.
        cache_name: path of the file inside the cache directory.
        urls: download locations tried in order (commit-pinned first, then the default branch;
            the sha256 check makes either equally safe).
        sha256: hex digest of the official file.
        param: the benchmark parameter that takes a user path (named in error messages).
        source: human-readable upstream location.
    """

    name: str
    cache_name: str
    urls: tuple[str, ...]
    sha256: str
    param: str
    source: str


@dataclass(frozen=True)
class PromptFile:
    """A located prompt file: where it is, its digest, and whether it is the official one."""

    path: Path
    sha256: str
    official: bool


def cache_dir() -> Path:
    """opdkit's download cache: ``$OPDKIT_CACHE`` if set, else ``~/.cache/opdkit``."""
    env = os.environ.get("OPDKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opdkit"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    """The bytes at ``url`` (http(s) or file://); ``timeout`` in seconds. Separate so tests can replace it."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _download(spec: DatasetFile, target: Path) -> None:
    """Fetch ``spec`` into ``target``, verified by sha256 before it appears there."""
    failures: list[str] = []
    for url in spec.urls:
        try:
            data = _fetch(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        got = hashlib.sha256(data).hexdigest()
        if got != spec.sha256:
            failures.append(f"{url}: sha256 {got[:12]}... is not the pinned {spec.sha256[:12]}...")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return
    raise OpdkitError(
        f"could not download the {spec.name} ({'; '.join(failures)}); fetch {spec.source} yourself "
        f"and pass --param {spec.param}=PATH"
    )


def resolve_dataset_file(spec: DatasetFile, path: str | Path | None = None, download: bool = False) -> PromptFile:
    """Locate ``spec``: the user's ``path``, else the verified cache, else a download if asked.

    Args:
        spec: which upstream file.
        path: a user-supplied copy (any content; its digest decides :attr:`PromptFile.official`).
        download: fetch into the cache when it is not there yet.

    Raises:
        OpdkitError: the path does not exist; or no path, no cached copy and ``download`` is
            false (one line naming the parameter and the download switch); or the download failed.
    """
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise OpdkitError(f"--param {spec.param}={path}: no such file (expected the {spec.name}: {spec.source})")
        digest = sha256_file(file)
        return PromptFile(file, digest, digest == spec.sha256)
    cached = cache_dir() / spec.cache_name
    if cached.is_file():
        digest = sha256_file(cached)
        if digest == spec.sha256:
            return PromptFile(cached, digest, True)
        if not download:
            raise OpdkitError(
                f"{cached}: cached {spec.name} fails its sha256 check; delete it and pass --param download=true"
            )
    if not download:
        raise OpdkitError(
            f"no {spec.name}: pass --param {spec.param}=PATH (a copy of {spec.source}) or --param download=true "
            f"to fetch it into {cache_dir()} (sha256-pinned)"
        )
    _download(spec, cached)
    return PromptFile(cached, spec.sha256, True)
