"""Prompt sets of the preference benchmarks: DrawBench, the PickScore test set, HPD v2's four styles.

opdkit ships none of these files and downloads none of them: their upstream copies are not
pinned by a sha256 opdkit could verify (DrawBench is published as a Google Sheet whose CSV export
is not byte-stable; the PickScore and HPD v2 files were not available to hash when this was
written). So a user gives a local copy, either with the benchmark parameter ``prompts`` or by
placing it at the set's cache path (``$OPDKIT_CACHE/prompts/...``, default ``~/.cache/opdkit``),
where every later run finds it without parameters (e.g. from a recipe's ``eval.benchmarks``).

Formats read (records get ``prompt`` and ``tag``; the tag names the per-category metric):

* DrawBench: the sheet's CSV export (header ``Prompts,Category``; 200 prompts, 11 categories,
  tag = category), or any ``.jsonl``/``.txt`` prompt file.
* PickScore test set: flow_grpo's ``dataset/pickscore/test.txt`` (one prompt per line, tag
  ``pickscore``), or a ``.jsonl``.
* HPD v2 benchmark: a directory holding ``anime.json``, ``concept-art.json``, ``paintings.json``
  and ``photo.json`` (each a JSON list of 800 prompt strings, from the ``zhwang/HPDv2`` dataset's
  ``benchmark/`` folder; tag = style), or one such ``.json`` file (tag = its stem).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError

HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclass(frozen=True)
class PromptSet:
    """One named prompt set.

    Attributes:
        name: the name benchmarks take (``prompt_set`` parameter).
        title: for messages.
        cache_name: where a user copy is found under ``$OPDKIT_CACHE`` when no path is given.
        source: the upstream location, named in messages.
        count: prompts in the official set, where known (informational; a subset is allowed).
        samples_per_prompt: images per prompt in the usual protocol.
    """

    name: str
    title: str
    cache_name: str
    source: str
    count: int | None
    samples_per_prompt: int


PROMPT_SETS: dict[str, PromptSet] = {
    "drawbench": PromptSet(
        name="drawbench",
        title="DrawBench",
        cache_name="prompts/drawbench.csv",
        source="the DrawBench sheet as CSV, columns Prompts and Category "
        "(docs.google.com/spreadsheets/d/1y7nAbmR4FREi6npB1u-Bo3GFdwdOPYJc617rBOxIRHY, File > Download > CSV)",
        count=200,
        samples_per_prompt=5,
    ),
    "pickscore-test": PromptSet(
        name="pickscore-test",
        title="PickScore test set",
        cache_name="prompts/pickscore_test.txt",
        source="flow_grpo's dataset/pickscore/test.txt (github.com/yifan123/flow_grpo)",
        count=None,
        samples_per_prompt=1,
    ),
    # Flow-GRPO's training prompt sets (the sd35m recipes train on them).
    "geneval-train": PromptSet(
        name="geneval-train",
        title="Flow-GRPO GenEval training metadata",
        cache_name="prompts/geneval_train_metadata.jsonl",
        source="flow_grpo's dataset/geneval/train_metadata.jsonl (github.com/yifan123/flow_grpo)",
        count=None,
        samples_per_prompt=1,
    ),
    "ocr-train": PromptSet(
        name="ocr-train",
        title="Flow-GRPO OCR training prompts",
        cache_name="prompts/ocr_train.txt",
        source="flow_grpo's dataset/ocr/train.txt (github.com/yifan123/flow_grpo)",
        count=None,
        samples_per_prompt=1,
    ),
    "pickscore-train": PromptSet(
        name="pickscore-train",
        title="Flow-GRPO PickScore training prompts",
        cache_name="prompts/pickscore_train.txt",
        source="flow_grpo's dataset/pickscore/train.txt (github.com/yifan123/flow_grpo)",
        count=None,
        samples_per_prompt=1,
    ),
    "hpdv2": PromptSet(
        name="hpdv2",
        title="HPD v2 benchmark prompts",
        cache_name="prompts/hpdv2",
        source="benchmark/{anime,concept-art,paintings,photo}.json of the Hugging Face dataset zhwang/HPDv2",
        count=3200,
        samples_per_prompt=1,
    ),
}


def cache_root() -> Path:
    """``$OPDKIT_CACHE`` (default ``~/.cache/opdkit``)."""
    env = os.environ.get("OPDKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opdkit"


def prompt_set(name: str) -> PromptSet:
    if name not in PROMPT_SETS:
        raise OpdkitError(f"prompt set {name!r}: expected one of {', '.join(PROMPT_SETS)} (or a file path)")
    return PROMPT_SETS[name]


def load_prompt_set(name: str, path: str | Path | None = None) -> list[dict[str, Any]]:
    """The records of prompt set ``name`` from ``path``, else from its cache path.

    Raises:
        OpdkitError: one line naming the upstream file, the ``prompts`` parameter and the cache
            path when there is no copy; or a malformed file.
    """
    spec = prompt_set(name)
    if path is None:
        cached = cache_root() / spec.cache_name
        if not cached.exists():
            raise OpdkitError(
                f"no {spec.title}: get {spec.source} ({f'{spec.count} prompts; ' if spec.count else ''}no sha256 is "
                f"pinned for it, so opdkit does not download it) and pass --param prompts=PATH, or copy it to {cached}"
            )
        path = cached
    file = Path(path).expanduser()
    if not file.exists():
        raise OpdkitError(f"--param prompts={path}: no such file or directory (expected the {spec.title}: {spec.source})")
    if name == "drawbench":
        records = _read_drawbench(file)
    elif name == "hpdv2":
        records = _read_hpd(file)
    else:
        # the task tag of a plain prompt set: "ocr" for ocr-train, "pickscore" for the others
        records = _read_plain(file, "ocr" if name.startswith("ocr") else name.split("-")[0])
    if not records:
        raise OpdkitError(f"{file}: holds no prompts")
    return records


def _read_plain(file: Path, tag: str) -> list[dict[str, Any]]:
    from opdkit.prompts import read_prompt_file

    if file.suffix not in (".txt", ".jsonl"):
        raise OpdkitError(f"{file}: expected a .txt (one prompt per line) or .jsonl prompt file")
    return read_prompt_file(file, tag)


def _read_drawbench(file: Path) -> list[dict[str, Any]]:
    if file.suffix != ".csv":
        return _read_plain(file, "drawbench")
    with file.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    try:
        p_col = header.index("prompts") if "prompts" in header else header.index("prompt")
    except ValueError:
        raise OpdkitError(f"{file}:1: expected a header with a 'Prompts' column, got {rows[0]}") from None
    c_col = header.index("category") if "category" in header else None
    records = []
    for row in rows[1:]:
        if len(row) <= p_col or not row[p_col].strip():
            continue
        category = row[c_col].strip() if c_col is not None and len(row) > c_col and row[c_col].strip() else "drawbench"
        records.append({"prompt": row[p_col], "tag": category})
    return records


def _read_hpd_json(file: Path, style: str) -> list[dict[str, Any]]:
    try:
        prompts = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise OpdkitError(f"{file}: not JSON: {exc.msg}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise OpdkitError(f"{file}: expected a JSON list of prompt strings")
    return [{"prompt": p, "tag": style, "index": i} for i, p in enumerate(prompts)]


def _read_hpd(file: Path) -> list[dict[str, Any]]:
    if file.is_dir():
        missing = [s for s in HPD_STYLES if not (file / f"{s}.json").is_file()]
        if missing:
            raise OpdkitError(f"{file}: missing {', '.join(s + '.json' for s in missing)} (HPD v2 has four styles)")
        return [r for style in HPD_STYLES for r in _read_hpd_json(file / f"{style}.json", style)]
    if file.suffix == ".json":
        return _read_hpd_json(file, file.stem)
    return _read_plain(file, "hpdv2")
