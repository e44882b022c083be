"""Prompt records and the readers that build them from files, validating as they go.

A prompt record is a plain dict with at least ``prompt`` (str) and ``tag`` (the task tag routers
and per-tag metrics use). GenEval-style records add ``include`` (and optionally ``exclude``):
``[{"class", "count", "color"?, "position"?}]``; OCR records add ``text``, the target to render.
Readers keep upstream strings verbatim and report a malformed file as one line naming the file
(and the line number where there is one). Formats:

* a prompt file: ``.jsonl`` (one record per line) or ``.txt`` (one prompt per line);
* GenEval's ``evaluation_metadata.jsonl`` (records as above, upstream's schema);
* flow_grpo's OCR prompts: one prompt per line, the target in its first double quotes;
* DrawBench: the sheet's CSV export (header ``Prompts,Category``; 200 prompts, 11 categories,
  tag = category), or any ``.jsonl``/``.txt`` prompt file;
* HPD v2 benchmark: a directory holding ``anime.json``, ``concept-art.json``, ``paintings.json``
  and ``photo.json`` (each a JSON list of 800 prompt strings, from the ``zhwang/HPDv2`` dataset's
  ``benchmark/`` folder; tag = style), or one such ``.json`` file (tag = its stem).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError

HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


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


def read_plain_prompts(file: Path, tag: str) -> list[dict[str, Any]]:
    """:func:`read_prompt_file`, refusing any suffix but ``.txt`` and ``.jsonl``."""
    if file.suffix not in (".txt", ".jsonl"):
        raise OpdkitError(f"{file}: expected a .txt (one prompt per line) or .jsonl prompt file")
    return read_prompt_file(file, tag)


def read_geneval_metadata(path: Path) -> list[dict[str, Any]]:
    """GenEval metadata records, one per non-empty line, upstream strings verbatim.

    Raises:
        OpdkitError: a line is not JSON or lacks ``prompt`` or ``tag``; or the file holds none.
    """
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OpdkitError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or "prompt" not in record or "tag" not in record:
            raise OpdkitError(f"{path}:{number}: a GenEval record needs 'prompt' and 'tag'")
        records.append(record)
    if not records:
        raise OpdkitError(f"{path}: holds no GenEval records")
    return records


def read_ocr_prompts(path: Path) -> list[dict[str, Any]]:
    """OCR records ``{"prompt", "tag": "ocr", "text"}``, one per non-empty line (stripped).

    The target ``text`` is the text inside the prompt's first pair of double quotes
    (:func:`opdkit.scoring.ocr.ocr_target`).

    Raises:
        OpdkitError: a prompt has no quoted text; or the file holds none.
    """
    # imported here: opdkit.scoring's __init__ imports numpy, which no other reader needs
    from opdkit.scoring.ocr import ocr_target

    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        prompt = line.strip()
        if not prompt:
            continue
        try:
            text = ocr_target(prompt)
        except ValueError as exc:
            raise OpdkitError(f"{path}:{number}: {exc}") from None
        records.append({"prompt": prompt, "tag": "ocr", "text": text})
    if not records:
        raise OpdkitError(f"{path}: holds no OCR prompts")
    return records


def read_drawbench(file: Path) -> list[dict[str, Any]]:
    """DrawBench records (tag = category, ``drawbench`` where a row has none); may be empty.

    A ``.csv`` is the sheet's export, any other suffix a prompt file (:func:`read_plain_prompts`).
    """
    if file.suffix != ".csv":
        return read_plain_prompts(file, "drawbench")
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


def read_hpd(file: Path) -> list[dict[str, Any]]:
    """HPD v2 records ``{"prompt", "tag": style, "index": position in its style's list}``.

    ``file``: the directory of the four style lists (read in :data:`HPD_STYLES` order), one
    style's ``.json`` (tag = its stem), or a prompt file (:func:`read_plain_prompts`).
    """
    if file.is_dir():
        missing = [s for s in HPD_STYLES if not (file / f"{s}.json").is_file()]
        if missing:
            raise OpdkitError(f"{file}: missing {', '.join(s + '.json' for s in missing)} (HPD v2 has four styles)")
        return [r for style in HPD_STYLES for r in _read_hpd_json(file / f"{style}.json", style)]
    if file.suffix == ".json":
        return _read_hpd_json(file, file.stem)
    return read_plain_prompts(file, "hpdv2")
