"""User-facing errors.

Every error a user can cause (bad recipe, unknown plug-in, missing weights) is an
:class:`OpdkitError` whose ``str()`` is ONE line naming the file, key and what was expected.
The CLI prints it and exits 1 instead of showing a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class OpdkitError(Exception):
    """Base class of errors caused by user input; the message is a single line."""


class RecipeError(OpdkitError):
    """A recipe file (or a ``--set`` override) is malformed."""


class PluginError(OpdkitError):
    """A plug-in name cannot be resolved, or its parameters do not fit its builder."""


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``: how a plug-in's own exception is shown in one line
    (the traceback is printed too when ``OPDKIT_DEBUG=1`` or ``--debug``)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


@contextmanager
def prefixed(place: str) -> Iterator[None]:
    """Re-raise an :class:`OpdkitError` from inside with ``place`` (say ``FILE:LINE: rewards.0``)
    in front: a plug-in's error found while running still names the recipe line that chose it."""
    try:
        yield
    except OpdkitError as exc:
        raise type(exc)(f"{place}: {exc}") from exc
