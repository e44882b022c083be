"""User-facing errors.

Every error a user can cause (bad recipe, unknown plug-in, missing weights) is an
:class:`OpdkitError` whose ``str()`` is ONE line naming the file, key and what was expected.
The CLI prints it and exits 1 instead of showing a traceback.
"""

from __future__ import annotations


class OpdkitError(Exception):
    """Base class of errors caused by user input; the message is a single line."""


class RecipeError(OpdkitError):
    """A recipe file (or a ``--set`` override) is malformed."""


class PluginError(OpdkitError):
    """A plug-in name cannot be resolved, or its parameters do not fit its builder."""
