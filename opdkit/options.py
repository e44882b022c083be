"""Range checks of command-line values, shared by the CLI and the library functions behind it.

Each check raises :class:`~opdkit.errors.OpdkitError` with one line that names the option as the
user typed it (``--samples 0: expected a whole number >= 1``), so a bad value is refused before
anything is loaded or written: a count of 0 is not silently read as "the default", and a NaN
never reaches a results or weights file.
"""

from __future__ import annotations

import math
import os

from opdkit.errors import OpdkitError


def check_count(option: str, value: int | None, minimum: int = 1) -> None:
    """``value`` is None (the default) or a whole number >= ``minimum``."""
    if value is not None and value < minimum:
        raise OpdkitError(f"{option} {value}: expected a whole number >= {minimum}")


def check_float(option: str, value: float | None, *, minimum: float | None = None, above: float | None = None,
                maximum: float | None = None) -> None:  # fmt: skip
    """``value`` is None or a finite number in the range given (``above`` is an open lower bound)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise OpdkitError(f"{option} {value}: expected a finite number")
    low_ok = (minimum is None or value >= minimum) and (above is None or value > above)
    if low_ok and (maximum is None or value <= maximum):
        return
    low = f"[{minimum:g}" if minimum is not None else (f"({above:g}" if above is not None else "(-inf")
    high = f"{maximum:g}]" if maximum is not None else "inf)"
    raise OpdkitError(f"{option} {value}: expected a number in {low}, {high}")


def check_folder_name(option: str, name: str) -> None:
    """``name`` is one ordinary folder name, so ``<out>/<name>`` stays inside ``<out>``.

    Refused: empty, ``.`` and ``..``, a path separator, a leading dot (a hidden folder, and the
    results folder's own ``.lock``), and control characters (a name must print on one line).
    """
    problem = plain_name_problem(name)
    if problem is not None:
        raise OpdkitError(f"{option} {name!r}: results go to --out/NAME, and NAME must be one plain folder name ({problem})")


def plain_name_problem(name: str) -> str | None:
    """Why ``name`` is not one plain file or folder name (see :func:`check_folder_name`), or None."""
    if not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is not a folder of its own"
    if "/" in name or "\\" in name or os.sep in name:
        return "it contains '/'"
    if name.startswith("."):
        return "it starts with '.', which hides the folder"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character"
    return None
