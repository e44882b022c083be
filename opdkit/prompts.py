"""Prompt sources for training and evaluation.

A prompt record is a plain dict with at least ``prompt`` (str) and ``tag`` (the task tag routers
and per-tag metrics use); GenEval-style records add ``include``/``exclude``, OCR ones ``text``.
Sources: the built-in ``shapes`` world (shipped train/test splits), a named prompt set of
:mod:`opdkit.prompt_sets` (found in ``$OPDKIT_CACHE`` at run time), or a file the user names:
``.jsonl`` (one record per line) or ``.txt`` (one prompt per line); a recipe may list several.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    from opdkit.recipe import PromptsSpec

BUILTIN_DATASETS = ("shapes",)


def _sources(spec: PromptsSpec) -> list[str]:
    return [spec.dataset] if isinstance(spec.dataset, str) else list(spec.dataset)


def check_prompt_source(spec: PromptsSpec) -> None:
    """Raise :class:`OpdkitError` if a source cannot exist (no file read beyond a stat).

    Named prompt sets (:data:`opdkit.prompt_sets.PROMPT_SETS`) are accepted without their file:
    it is looked up (cache, or a clear message naming the upstream file) when the run starts.
    """
    from opdkit.prompt_sets import PROMPT_SETS

    for source in _sources(spec):
        if source in BUILTIN_DATASETS or source in PROMPT_SETS:
            continue
        path = Path(source).expanduser()
        if path.suffix not in (".jsonl", ".txt"):
            names = ", ".join((*BUILTIN_DATASETS, *PROMPT_SETS))
            raise OpdkitError(f"{source!r} is neither a named prompt set ({names}) nor a .jsonl/.txt file path")
        if not path.is_file():
            raise OpdkitError(f"prompt file {str(path)!r} does not exist")


def read_prompt_file(path: str | Path, default_tag: str | None = None) -> list[dict[str, Any]]:
    """Records from a ``.jsonl`` or ``.txt`` file; a record without ``tag`` gets ``default_tag``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OpdkitError(f"prompt file {str(path)!r} does not exist")
    tag = default_tag or "default"
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise OpdkitError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise OpdkitError(f"{path}:{number}: expected an object with a string 'prompt'")
                record.setdefault("tag", tag)
            else:
                record = {"prompt": line.rstrip("\n"), "tag": tag}
            records.append(record)
    if not records:
        raise OpdkitError(f"prompt file {str(path)!r} holds no prompts")
    return records


def load_prompts(spec: PromptsSpec) -> list[dict[str, Any]]:
    """The prompt records a recipe's ``prompts`` section names, filtered and limited."""
    from opdkit.prompt_sets import PROMPT_SETS, load_prompt_set

    check_prompt_source(spec)
    records: list[dict[str, Any]] = []
    for source in _sources(spec):
        if source == "shapes":
            from opdkit.shapes.prompts import load_split

            part = [dict(r) for r in load_split(spec.split)]
        elif source in PROMPT_SETS:
            part = load_prompt_set(source)
        else:
            part = read_prompt_file(source, spec.tag)
        for record in part:  # the `dataset` router sends whole sources to one teacher
            record.setdefault("dataset", source)
        records.extend(part)
    if spec.tag is not None:
        for record in records:
            record.setdefault("tag", spec.tag)
    if spec.tags is not None:
        wanted = set(spec.tags)
        records = [r for r in records if r.get("tag") in wanted]
        if not records:
            raise OpdkitError(f"prompts: no record of {spec.dataset!r} has a tag in {sorted(wanted)}")
    if spec.limit is not None:
        records = records[: spec.limit]
    return records
