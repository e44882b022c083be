"""Plug-in registries: one small :class:`Registry` per plug-in kind.

A plug-in is a *builder*: a function whose keyword arguments are its YAML parameters and which
returns a plain callable or object. Three ways to provide one:

1. Built-ins register with a decorator (``@rewards.register("shapes_ocr")``) in a module listed
   in the registry's ``builtin_modules``; those modules are imported on first lookup, so they
   must keep heavy imports (torch models, transformers) inside the builder.
2. Installed third-party packages declare entry points in the group ``opdkit.<kind>s``; only
   their metadata is read until one is used.
3. A recipe may name ``module.path:function`` or ``./file.py:function`` — code the user names
   explicitly. This is the only way code outside installed packages is imported.

Registries live at the plug-in boundary only; training loops receive already-built objects.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from opdkit.errors import OpdkitError, PluginError, first_line

Builder = Callable[..., Any]


@dataclass(frozen=True)
class Entry:
    """One row of ``opdkit list``."""

    name: str
    kind: str
    source: str  # "builtin", "entry point <dist>", or "path"
    doc: str


def first_doc_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """Named builders of one plug-in kind (reward, teacher, router, ...)."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self.entry_point_group = f"opdkit.{kind}s"
        self._builtin_modules = tuple(builtin_modules)
        self._builders: dict[str, Builder] = {}
        self._sources: dict[str, str] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None
        self._builtins_loaded = False

    # -- registration -------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[Builder], Builder]:
        """Decorator: ``@rewards.register("my_reward")`` (default name: the function's)."""

        def decorator(builder: Builder) -> Builder:
            self.add(name or builder.__name__, builder)
            return builder

        return decorator

    def add(self, name: str, builder: Builder, source: str = "builtin") -> None:
        """Register ``builder`` under ``name``; a second, different object is an error.

        Re-registering the *same* function is allowed (module reloads). A different object under
        a taken name usually means a module was imported twice under two names (e.g.
        ``import rewards`` from the repository root beside ``opdkit.rewards``), which would
        silently shadow a plug-in; so refuse it.
        """
        if not callable(builder):
            raise PluginError(f"{self.kind} {name!r}: builder must be callable, got {builder!r}")
        existing = self._builders.get(name)
        if existing is not None and not _same_function(existing, builder):
            raise PluginError(
                f"{self.kind} {name!r} is already registered by "
                f"{_where(existing)}; refusing a second, different builder from {_where(builder)}"
            )
        self._builders[name] = builder
        self._sources[name] = source

    # -- lookup -------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)

    def _installed_entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self._entry_points is None:
            found = importlib.metadata.entry_points(group=self.entry_point_group)
            self._entry_points = {ep.name: ep for ep in found}
        return self._entry_points

    def names(self) -> list[str]:
        """All names known without importing third-party code."""
        self._load_builtins()
        return sorted(set(self._builders) | set(self._installed_entry_points()))

    def entries(self) -> list[Entry]:
        self._load_builtins()
        rows = [
            Entry(name, self.kind, self._sources[name], first_doc_line(builder))
            for name, builder in self._builders.items()
        ]
        for name, ep in self._installed_entry_points().items():
            if name not in self._builders:
                dist = ep.dist.name if ep.dist is not None else "?"
                rows.append(Entry(name, self.kind, f"entry point ({dist})", ep.value))
        return sorted(rows, key=lambda e: e.name)

    def get(self, name: str) -> Builder:
        """The builder for a registered name, an entry point, or an explicit ``x:function``."""
        if ":" in name:
            return load_object(name, self.kind)
        self._load_builtins()
        if name in self._builders:
            return self._builders[name]
        ep = self._installed_entry_points().get(name)
        if ep is not None:
            try:
                builder = ep.load()
            except Exception as exc:  # third-party import failure: name it, one line
                raise PluginError(
                    f"{self.kind} {name!r}: entry point {ep.value!r} failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.add(name, builder, source=f"entry point ({ep.value})")
            return builder
        raise PluginError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(known) if known else "none"
        return f"unknown {self.kind} {name!r}{hint} (known: {listing})"

    def check_params(self, name: str, params: dict[str, Any]) -> None:
        """Bind ``params`` against the builder's signature without calling it."""
        builder = self.get(name)
        check_builder_params(builder, params, f"{self.kind} {name!r}")

    def problems(self, names: list[str], params: dict[str, Any]) -> tuple[dict[int, str], str | None]:
        """What stops building each of ``names`` with the same ``params``, without building: the
        error of each unknown name, by its index, and the first known builder's refusal of
        ``params`` (one for the key, however many builders refuse it)."""
        unknown: dict[int, str] = {}
        refused: str | None = None
        for i, name in enumerate(names):
            try:
                self.get(name)
            except OpdkitError as exc:
                unknown[i] = str(exc)
                continue
            if refused is None:
                try:
                    self.check_params(name, params)
                except OpdkitError as exc:
                    refused = str(exc)
        return unknown, refused

    def build(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """Resolve ``name``, check ``params`` against its signature, and call the builder."""
        params = dict(params or {})
        builder = self.get(name)
        check_builder_params(builder, params, f"{self.kind} {name!r}")
        try:
            return builder(**params)
        except OpdkitError:
            raise
        except Exception as exc:  # a plug-in's own failure: name the plug-in, one line
            raise PluginError(f"{self.kind} {name!r}: its builder raised {first_line(exc)}") from exc


def check_builder_params(builder: Builder, params: dict[str, Any], what: str) -> None:
    """Raise a one-line :class:`PluginError` if ``params`` do not fit ``builder(**params)``."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    try:
        signature.bind(**params)
    except TypeError as exc:
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        raise PluginError(
            f"{what}: bad parameters {sorted(params)}: {exc} (accepted: {', '.join(accepted) or 'none'})"
        ) from None
    _check_choices(builder, params, what)


def _check_choices(builder: Builder, params: dict[str, Any], what: str) -> None:
    """A parameter annotated ``Literal[...]`` takes one of its values: a misspelt value in a
    recipe fails when the recipe loads, not when the plug-in is built after hours of training."""
    hints: dict[str, Any] = {}
    # the parameters a builder takes from another's (with_params_of) are annotated there
    for source in (getattr(builder, "__params_of__", None), builder):
        try:
            hints.update(get_type_hints(source) if source is not None else {})
        except Exception:  # a name the builder's module cannot resolve: nothing to check by type
            continue
    for name, value in params.items():
        choices = _literal_choices(hints.get(name))
        if choices is not None and value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise PluginError(f"{what}: {name}={value!r} is not one of {shown}")


def _literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` annotation allows, also inside ``Literal[...] | None``
    (None then among them); None where the annotation allows anything else too."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    members = get_args(hint) if get_origin(hint) in (Union, UnionType) else ()
    literals = [m for m in members if get_origin(m) is Literal]
    if not literals or any(m is not type(None) and get_origin(m) is not Literal for m in members):
        return None
    return tuple(v for m in literals for v in get_args(m)) + ((None,) if type(None) in members else ())


def with_params_of(base: Builder) -> Callable[[Builder], Builder]:
    """Decorator: the builder also takes every keyword parameter of ``base``, in its ``**params``.

    A reward and a benchmark over the same scorer then declare the scorer's parameters once, on
    the scorer's builder, and pass them through. The decorated builder's signature (what
    :func:`check_builder_params` binds and names in its messages) becomes its own parameters
    followed by ``base``'s, keyword-only, so a misspelt parameter is still refused before anything
    is built.

    Raises:
        TypeError: the builder has no ``**params`` to receive them, or shares a parameter name
            with ``base`` (a programming error, raised at import).
    """

    def decorator(builder: Builder) -> Builder:
        own = inspect.signature(builder)
        kept = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        if len(kept) == len(own.parameters):
            raise TypeError(f"{builder.__qualname__} needs **params to take the parameters of {base.__qualname__}")
        names = {p.name for p in kept}
        taken = [
            p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(base).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        clash = sorted(names & {p.name for p in taken})
        if clash:
            raise TypeError(f"{builder.__qualname__} and {base.__qualname__} both take {', '.join(clash)}")
        builder.__signature__ = own.replace(parameters=[*kept, *taken])  # type: ignore[attr-defined]
        builder.__params_of__ = base  # type: ignore[attr-defined]  # whose annotations check the values
        return builder

    return decorator


def load_object(spec: str, kind: str = "plug-in") -> Builder:
    """Import ``module.path:attr`` or ``./file.py:attr`` (relative to the current directory).

    Only what the user names is imported. A file is loaded under a private module name
    derived from its absolute path, so two files named ``reward.py`` (or ``a-b.py`` and
    ``a_b.py``) do not collide.
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise PluginError(f"{kind} {spec!r}: expected 'module.path:function' or './file.py:function'")
    if target.endswith(".py") or "/" in target or target.startswith("."):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"{kind} {spec!r}: file {str(path)!r} does not exist")
        # the path's digest tells apart files whose names differ only in '-', '.', '_' or '/'
        # (a-b.py and a_b.py), which a name made of their parts alone would give one module
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module_name = f"opdkit_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
        module = sys.modules.get(module_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(module_name, path)
            if file_spec is None or file_spec.loader is None:
                raise PluginError(f"{kind} {spec!r}: cannot import {str(path)!r}")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[module_name] = module
            try:
                file_spec.loader.exec_module(module)
            except (Exception, SystemExit) as exc:  # sys.exit() at import too: never exit silently
                del sys.modules[module_name]
                raise PluginError(f"{kind} {spec!r}: importing {str(path)!r} failed: {first_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as exc:
            raise PluginError(f"{kind} {spec!r}: cannot import module {target!r}: {first_line(exc)}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{kind} {spec!r}: {target!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise PluginError(f"{kind} {spec!r}: {attr!r} is not callable")
    return obj


def _same_function(a: Builder, b: Builder) -> bool:
    if a is b:
        return True
    # The same source function defined again by a reload of its module.
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        code_a is not None
        and code_b is not None
        and getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and code_a.co_filename == code_b.co_filename
        and code_a.co_firstlineno == code_b.co_firstlineno
    )


def _where(obj: object) -> str:
    module = getattr(obj, "__module__", "?")
    code = getattr(obj, "__code__", None)
    return f"{module} ({code.co_filename})" if code is not None else str(module)


# One registry per kind. Built-in modules keep heavy imports inside their builders.
rewards = Registry("reward", ["opdkit.rewards"])
teachers = Registry("teacher", ["opdkit.teachers"])
routers = Registry("router", ["opdkit.teachers.routers"])
regularizers = Registry("regularizer", ["opdkit.teachers.regularizers"])
benchmarks = Registry("benchmark", ["opdkit.benchmarks"])
models = Registry("model", ["opdkit.models"])
# The parts scorers are made of (opdkit.scoring): GenEval's detector and colour classifier, OCR engines.
detectors = Registry("detector", ["opdkit.scoring.detectors"])
color_classifiers = Registry("color_classifier", ["opdkit.scoring.colors"])
ocr_engines = Registry("ocr_engine", ["opdkit.scoring.ocr_engines"])

REGISTRIES: dict[str, Registry] = {
    r.kind: r
    for r in (rewards, teachers, routers, regularizers, benchmarks, models, detectors, color_classifiers, ocr_engines)
}
