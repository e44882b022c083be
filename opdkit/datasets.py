"""Official prompt sets of the real benchmarks: read from a path the user gives, or downloaded on request.

opdkit ships no third-party prompt files. A benchmark gets its prompts in one of three ways:

1. ``path``: a file the user already has (``--param metadata=/data/evaluation_metadata.jsonl``).
   Used as is; its sha256 is compared with the official one so results on a different prompt
   set are labelled as such (:attr:`PromptFile.official`).
2. the cache: a file downloaded earlier into ``$OPDKIT_CACHE`` (default ``~/.cache/opdkit``),
   re-verified by sha256 every time it is read.
3. ``download=True``: fetched from the upstream repository, verified against the pinned sha256
   and only then moved into the cache (a corrupted or changed upstream file never lands there).

Nothing is downloaded unless the user asks. Upstream sources (both MIT):

- GenEval (djghosh13/geneval, commit af4902f2) ``prompts/evaluation_metadata.jsonl``: 553 prompts.
- flow_grpo (yifan123/flow_grpo, commit ac4c86e8) ``dataset/ocr/test.txt``: 1,018 prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError
from opdkit.rundir import atomic_path

__all__ = [
    "GENEVAL_METADATA",
    "OCR_TEST",
    "DatasetFile",
    "PromptFile",
    "cache_dir",
    "load_geneval_metadata",
    "load_ocr_prompts",
    "resolve_dataset_file",
    "sha256_file",
]


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


GENEVAL_METADATA = DatasetFile(
    name="GenEval metadata",
    cache_name="geneval/evaluation_metadata.jsonl",
    urls=(
        "https://raw.githubusercontent.com/djghosh13/geneval/af4902f2/prompts/evaluation_metadata.jsonl",
        "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl",
    ),
    sha256="5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13",
    param="metadata",
    source="github.com/djghosh13/geneval prompts/evaluation_metadata.jsonl",
)

OCR_TEST = DatasetFile(
    name="OCR test prompts",
    cache_name="ocr/test.txt",
    urls=(
        "https://raw.githubusercontent.com/yifan123/flow_grpo/ac4c86e8/dataset/ocr/test.txt",
        "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/ocr/test.txt",
    ),
    sha256="4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc",
    param="prompts",
    source="github.com/yifan123/flow_grpo dataset/ocr/test.txt",
)


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
    """The bytes at ``url`` (http(s) or file://). Separate so tests can replace it."""
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


def load_geneval_metadata(path: str | Path | None = None, download: bool = False) -> tuple[list[dict[str, Any]], PromptFile]:
    """GenEval's metadata records (one dict per prompt, upstream strings verbatim) and their file.

    Each record: ``{"tag", "prompt", "include": [{"class", "count", "color"?, "position"?}],
    "exclude"?: [...]}``; the official file has 553.
    """
    located = resolve_dataset_file(GENEVAL_METADATA, path, download)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(located.path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OpdkitError(f"{located.path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or "prompt" not in record or "tag" not in record:
            raise OpdkitError(f"{located.path}:{number}: a GenEval record needs 'prompt' and 'tag'")
        records.append(record)
    if not records:
        raise OpdkitError(f"{located.path}: holds no GenEval records")
    return records, located


def load_ocr_prompts(path: str | Path | None = None, download: bool = False) -> tuple[list[dict[str, Any]], PromptFile]:
    """flow_grpo's OCR test prompts as records ``{"prompt", "tag": "ocr", "text": quoted target}``.

    One prompt per non-empty line (the official file: 1,018); the target is the text inside the
    first pair of double quotes (:func:`opdkit.scoring.ocr.ocr_target`).
    """
    from opdkit.scoring.ocr import ocr_target

    located = resolve_dataset_file(OCR_TEST, path, download)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(located.path.read_text(encoding="utf-8").splitlines(), start=1):
        prompt = line.strip()
        if not prompt:
            continue
        try:
            text = ocr_target(prompt)
        except ValueError as exc:
            raise OpdkitError(f"{located.path}:{number}: {exc}") from None
        records.append({"prompt": prompt, "tag": "ocr", "text": text})
    if not records:
        raise OpdkitError(f"{located.path}: holds no OCR prompts")
    return records, located
