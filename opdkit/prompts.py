"""Prompt sources for training and evaluation.

A prompt record is a plain dict with at least ``prompt`` (str) and ``tag`` (the task tag routers
and per-tag metrics use); GenEval-style records add ``include``/``exclude``, OCR ones ``text``.
Sources: the built-in ``shapes`` world (shipped train/test splits), or a file the user names:
``.jsonl`` (one record per line) or ``.txt`` (one prompt per line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError

if TYPE_CHECKING:
    from opdkit.recipe import PromptsSpec

BUILTIN_DATASETS = ("shapes",)


def check_prompt_source(spec: PromptsSpec) -> None:
    """Raise :class:`OpdkitError` if the source cannot exist (no file read beyond a stat)."""
    if spec.dataset in BUILTIN_DATASETS:
        return
    path = Path(spec.dataset).expanduser()
    if path.suffix not in (".jsonl", ".txt"):
        raise OpdkitError(
            f"{spec.dataset!r} is neither a built-in prompt set ({', '.join(BUILTIN_DATASETS)}) "
            "nor a .jsonl/.txt file path"
        )
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
    check_prompt_source(spec)
    if spec.dataset == "shapes":
        from opdkit.shapes.prompts import load_split

        records = [dict(r) for r in load_split(spec.split)]
    else:
        records = read_prompt_file(spec.dataset, spec.tag)
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
