"""The plug-in registry: decorators, did-you-mean, double registration, entry points, explicit paths."""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from opdkit.errors import PluginError
from opdkit.registry import REGISTRIES, Registry, load_object

# -- registration --------------------------------------------------------------------------------


def test_decorator_registers_under_given_and_default_names() -> None:
    reg = Registry("reward")

    @reg.register("named")
    def builder_a(scale: float = 1.0) -> str:
        """First line of the doc.

        More text that `opdkit list` does not show.
        """
        return f"a{scale}"

    @reg.register()
    def builder_b() -> str:
        return "b"

    assert reg.get("named") is builder_a
    assert reg.get("builder_b") is builder_b
    assert set(reg.names()) >= {"named", "builder_b"}
    assert reg.build("named", {"scale": 2.0}) == "a2.0"
    (row,) = [e for e in reg.entries() if e.name == "named"]
    assert (row.kind, row.source, row.doc) == ("reward", "builtin", "First line of the doc.")


def test_unknown_name_is_one_line_with_did_you_mean() -> None:
    reg = Registry("reward")
    for name in ("shapes_ocr", "shapes_geneval", "pickscore"):
        reg.add(name, lambda: None)
    with pytest.raises(PluginError) as info:
        reg.get("shapes_ocrr")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown reward 'shapes_ocrr'")
    assert "did you mean 'shapes_ocr'" in message
    assert "pickscore" in message  # the known names are listed


def test_unknown_name_without_close_match_has_no_hint() -> None:
    reg = Registry("router")
    reg.add("tag", lambda: None)
    with pytest.raises(PluginError) as info:
        reg.get("zzzzzzzz")
    assert "did you mean" not in str(info.value)
    assert "known: tag" in str(info.value)


def test_two_different_builders_under_one_name_are_refused() -> None:
    reg = Registry("reward")

    def first() -> int:
        return 1

    def second() -> int:
        return 2

    reg.add("score", first)
    with pytest.raises(PluginError, match=r"reward 'score' is already registered by .*refusing a second"):
        reg.add("score", second)
    assert reg.get("score") is first  # the first registration survives


def test_same_function_registered_twice_is_fine() -> None:
    reg = Registry("reward")

    def score() -> int:
        return 1

    reg.add("score", score)
    reg.register("score")(score)
    assert reg.get("score") is score


def test_reloaded_module_may_register_again(tmp_path: Path) -> None:
    """A module reload defines a new function object from the same source line: not a clash."""
    reg = Registry("reward")
    source = "def score():\n    return 1\n"
    code = compile(source, str(tmp_path / "plugin.py"), "exec")
    builders: list[Callable[[], int]] = []
    for _ in range(2):  # two executions of one module, as importlib.reload does
        namespace: dict[str, Any] = {"__name__": "plugin_module"}
        exec(code, namespace)
        builders.append(namespace["score"])
    assert builders[0] is not builders[1]
    reg.add("score", builders[0])
    reg.add("score", builders[1])
    assert reg.get("score") is builders[1]


def test_second_copy_of_builtin_module_is_refused(forget_modules: Callable[[str], None]) -> None:
    """The sharp edge: ``import rewards`` from the repository root loads rewards/shapes.py twice."""
    import opdkit.rewards.shapes as installed

    from opdkit.registry import rewards

    before = {name: rewards.get(name) for name in rewards.names()}
    assert before["shapes_geneval"] is installed.shapes_geneval
    source = Path(installed.__file__)
    module_name = "rewards_second_copy_of_shapes"
    forget_modules(module_name)
    spec = importlib.util.spec_from_file_location(module_name, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(PluginError) as info:
        spec.loader.exec_module(module)
    message = str(info.value)
    assert "\n" not in message
    assert "already registered" in message and module_name in message
    # The registry still holds the installed builders, untouched.
    assert {name: rewards.get(name) for name in rewards.names()} == before


# -- parameters ------------------------------------------------------------------------------------


def test_build_checks_params_against_signature() -> None:
    reg = Registry("reward")

    @reg.register("score")
    def score(scale: float = 1.0, *, strict: bool = False) -> tuple[float, bool]:
        return scale, strict

    assert reg.build("score", {"strict": True}) == (1.0, True)
    reg.check_params("score", {"scale": 3.0})
    with pytest.raises(PluginError) as info:
        reg.build("score", {"scael": 3.0})
    message = str(info.value)
    assert "\n" not in message
    assert "reward 'score': bad parameters ['scael']" in message
    assert "unexpected keyword argument 'scael'" in message
    assert "accepted: scale, strict" in message


def test_a_literal_param_takes_one_of_its_values_before_the_build() -> None:
    reg = Registry("benchmark")
    built = []

    @reg.register("bench")
    def bench(split: Literal["test", "fold"] = "test", samples: int = 4) -> str:
        built.append(split)
        return split

    reg.check_params("bench", {"split": "fold", "samples": 2})
    assert reg.build("bench", {"split": "fold"}) == "fold"
    with pytest.raises(PluginError, match=r"^benchmark 'bench': split='flod' is not one of 'test', 'fold'$"):
        reg.check_params("bench", {"split": "flod"})
    with pytest.raises(PluginError, match="split='flod'"):
        reg.build("bench", {"split": "flod"})
    assert built == ["fold"]  # refused before the builder ran


def test_literal_choices_are_checked_inside_optional_and_through_with_params_of() -> None:
    from opdkit.registry import with_params_of

    reg = Registry("reward")

    def scorer(mode: Literal["fast", "exact"] = "fast") -> str:
        return mode

    @reg.register("optional")
    def optional(split: Literal["test", "fold"] | None = None) -> str:
        return str(split)

    @reg.register("passes_on")
    @with_params_of(scorer)
    def passes_on(weight: float = 1.0, **params: Any) -> str:
        return scorer(**params)

    reg.check_params("optional", {"split": None})
    reg.check_params("passes_on", {"mode": "exact"})
    with pytest.raises(PluginError, match=r"split='flod' is not one of 'test', 'fold', None"):
        reg.check_params("optional", {"split": "flod"})
    with pytest.raises(PluginError, match=r"mode='zzz' is not one of 'fast', 'exact'"):
        reg.check_params("passes_on", {"mode": "zzz"})


def test_missing_required_param_is_reported() -> None:
    reg = Registry("teacher")

    @reg.register("lora")
    def lora(path: str) -> str:
        return path

    with pytest.raises(
        PluginError, match=r"teacher 'lora': bad parameters \[\]: missing a required argument: 'path'"
    ):
        reg.check_params("lora", {})


# -- explicit module:function and ./file.py:function -----------------------------------------------


def test_explicit_file_and_module_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_modules: Callable[[str], None]
) -> None:
    package = tmp_path / "opdkit_test_userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugins.py").write_text("def score(scale=1.0):\n    return ('module', scale)\n")
    (tmp_path / "my_plugin.py").write_text("def score(scale=1.0):\n    return ('file', scale)\n")
    forget_modules("opdkit_test_userpkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    reg = Registry("reward")
    assert reg.build("./my_plugin.py:score", {"scale": 2}) == ("file", 2)
    assert reg.build("opdkit_test_userpkg.plugins:score", {"scale": 3}) == ("module", 3)
    assert reg.names() == sorted(reg._installed_entry_points())  # explicit paths are never registered
    file_module = load_object("./my_plugin.py:score").__module__
    forget_modules(file_module)
    assert file_module.startswith("opdkit_user_")


def test_files_whose_names_differ_only_in_punctuation_are_two_plug_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a-b.py and a_b.py (or sub/ocr.py and sub_ocr.py) once got one module name: the second
    # lookup returned the first file's function, and the wrong code ran without a word
    (tmp_path / "sub").mkdir()
    files = {"a-b.py": "first", "a_b.py": "second", "sub/ocr.py": "third", "sub_ocr.py": "fourth"}
    for name, text in files.items():
        (tmp_path / name).write_text(f"def score():\n    return {text!r}\n")
    monkeypatch.chdir(tmp_path)
    loaded = [load_object(f"./{name}:score") for name in files]
    assert [f() for f in loaded] == list(files.values())
    for f in loaded:
        sys.modules.pop(f.__module__, None)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("./missing.py:fn", r"reward './missing.py:fn': file '.*missing.py' does not exist"),
        ("./my_plugin.py:nope", r"reward './my_plugin.py:nope': './my_plugin.py' has no attribute 'nope'"),
        ("./my_plugin.py:VALUE", r"reward './my_plugin.py:VALUE': 'VALUE' is not callable"),
        ("./broken.py:fn", r"reward './broken.py:fn': importing '.*broken.py' failed: ZeroDivisionError"),
        ("no_such_module_opdkit_test:fn", r"cannot import module 'no_such_module_opdkit_test'"),
        ("json:", r"expected 'module.path:function' or './file.py:function'"),
    ],
)
def test_explicit_path_errors_are_one_line(
    spec: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_plugin.py").write_text("VALUE = 3\n")
    (tmp_path / "broken.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PluginError) as info:
        Registry("reward").get(spec)
    assert "\n" not in str(info.value)
    assert re.search(expected, str(info.value)), str(info.value)


# -- entry points ------------------------------------------------------------------------------


def _fake_distribution(root: Path, module: str, group: str, entries: dict[str, str]) -> None:
    """An installed distribution ``opdkit-test-plugins`` in ``root`` declaring ``entries``."""
    dist_info = root / "opdkit_test_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: opdkit-test-plugins\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (dist_info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
    (root / f"{module}.py").write_text(
        textwrap.dedent(
            '''
            def plugin_score(scale=1.0):
                """A reward from an installed third-party package."""
                return ("entry point", scale)
            '''
        )
    )


ENTRY_MODULE = "opdkit_test_ep_plugin"


def test_entry_point_listed_without_import_then_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_modules: Callable[[str], None]
) -> None:
    _fake_distribution(
        tmp_path,
        ENTRY_MODULE,
        "opdkit.rewards",
        {
            "third_party_score": f"{ENTRY_MODULE}:plugin_score",
            "broken_score": "opdkit_test_missing_module:fn",
        },
    )
    forget_modules(ENTRY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("reward")
    reg._entry_points = None
    assert "third_party_score" in reg.names()
    assert ENTRY_MODULE not in sys.modules  # listed from metadata only
    (row,) = [e for e in reg.entries() if e.name == "third_party_score"]
    assert row.source == "entry point (opdkit-test-plugins)"
    assert ENTRY_MODULE not in sys.modules
    # Another kind's group does not see it.
    assert "third_party_score" not in Registry("router").names()

    builder = reg.get("third_party_score")
    assert ENTRY_MODULE in sys.modules
    assert builder is sys.modules[ENTRY_MODULE].plugin_score
    assert reg.build("third_party_score", {"scale": 0.5}) == ("entry point", 0.5)
    assert reg.get("third_party_score") is builder  # cached as a registered builder now

    with pytest.raises(PluginError) as info:
        reg.get("broken_score")
    assert "\n" not in str(info.value)
    assert "reward 'broken_score': entry point 'opdkit_test_missing_module:fn' failed to import" in str(
        info.value
    )


def test_global_registry_sees_entry_points_after_cache_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_modules: Callable[[str], None]
) -> None:
    from opdkit.registry import rewards

    _fake_distribution(
        tmp_path, ENTRY_MODULE, "opdkit.rewards", {"third_party_score": f"{ENTRY_MODULE}:plugin_score"}
    )
    forget_modules(ENTRY_MODULE)
    rewards.names()  # built-ins first, as in real use
    # monkeypatch restores the cache and the builder table after the test: no global pollution.
    monkeypatch.setattr(rewards, "_builders", dict(rewards._builders))
    monkeypatch.setattr(rewards, "_sources", dict(rewards._sources))
    monkeypatch.setattr(rewards, "_entry_points", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "third_party_score" in rewards.names()
    assert "shapes_geneval" in rewards.names()
    assert ENTRY_MODULE not in sys.modules
    assert rewards.build("third_party_score") == ("entry point", 1.0)


def test_one_registry_per_kind() -> None:
    assert sorted(REGISTRIES) == sorted(
        ["reward", "teacher", "router", "regularizer", "benchmark", "model", "detector", "color_classifier", "ocr_engine"]
    )
    for kind, reg in REGISTRIES.items():
        assert reg.kind == kind
        assert reg.entry_point_group == f"opdkit.{kind}s"
