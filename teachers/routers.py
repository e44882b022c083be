"""Router plug-ins: which teacher supervises each sample, decided per sample inside a batch.

A router builder returns a callable ``(records, teacher_names) -> list[str]`` giving one teacher
name per prompt record. A record no rule routes is an error naming the prompt and its tag, unless
the router was given a ``fallback`` teacher.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from opdkit.errors import OpdkitError
from opdkit.registry import routers

Router = Callable[[Sequence[dict[str, Any]], Sequence[str]], list[str]]


def _finish(choice: str | None, record: dict[str, Any], teachers: Sequence[str], fallback: str | None, rule: str) -> str:
    if choice is not None and choice in teachers:
        return choice
    if fallback is not None:
        if fallback not in teachers:
            raise OpdkitError(f"router fallback {fallback!r} is not a teacher (teachers: {', '.join(teachers)})")
        return fallback
    shown = f" -> {choice!r}, which is not a teacher" if choice is not None else ""
    raise OpdkitError(
        f"unrouted prompt {record.get('prompt')!r} (tag {record.get('tag')!r}) by {rule}{shown}; "
        f"teachers: {', '.join(teachers)}; name a 'fallback' teacher to route it anyway"
    )


@routers.register("tag")
def route_by_tag(mapping: dict[str, str] | None = None, fallback: str | None = None) -> Router:
    """Route by the record's task tag; ``mapping`` renames tags to teachers (default: same name)."""
    table = dict(mapping or {})

    def route(records: Sequence[dict[str, Any]], teachers: Sequence[str]) -> list[str]:
        out = []
        for record in records:
            tag = record.get("tag")
            out.append(_finish(table.get(tag, tag) if tag is not None else None, record, teachers, fallback, "tag"))
        return out

    return route


@routers.register("keyword")
def route_by_keyword(patterns: dict[str, str], fallback: str | None = None) -> Router:
    """Route by the first regular expression (``{teacher: regex}``, in order) matching the prompt."""
    try:
        compiled = [(teacher, re.compile(rx)) for teacher, rx in patterns.items()]
    except re.error as exc:
        raise OpdkitError(f"keyword router: bad regular expression: {exc}") from None

    def route(records: Sequence[dict[str, Any]], teachers: Sequence[str]) -> list[str]:
        out = []
        for record in records:
            prompt = str(record.get("prompt", ""))
            choice = next((t for t, rx in compiled if rx.search(prompt)), None)
            out.append(_finish(choice, record, teachers, fallback, "keyword"))
        return out

    return route


@routers.register("dataset")
def route_by_dataset(mapping: dict[str, str] | None = None, fallback: str | None = None) -> Router:
    """Route every prompt of a dataset (the record's ``dataset`` key) to one teacher."""
    table = dict(mapping or {})

    def route(records: Sequence[dict[str, Any]], teachers: Sequence[str]) -> list[str]:
        out = []
        for record in records:
            name = record.get("dataset")
            out.append(_finish(table.get(name, name) if name is not None else None, record, teachers, fallback, "dataset"))
        return out

    return route
