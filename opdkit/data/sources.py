"""Named prompt sources, and the records a recipe's ``prompts`` section selects from them.

A source is one of

* the built-in ``shapes`` world (its shipped train/test splits, :mod:`opdkit.shapes.prompts`);
* a named prompt set (:data:`PROMPT_SETS`): DrawBench, the PickScore test set and HPD v2's four
  styles for the preference benchmarks, and Flow-GRPO's GenEval, OCR and PickScore training
  prompts, found in ``$OPDKIT_CACHE`` at run time;
* a file the user names: ``.jsonl`` (one record per line) or ``.txt`` (one prompt per line);
  a recipe may list several.

The named prompt sets are neither shipped nor downloaded: their upstream copies are not pinned by
a sha256 opdkit could verify (DrawBench is published as a Google Sheet whose CSV export is not
byte-stable; the PickScore and HPD v2 files were not available to hash when this was written). So
a user gives a local copy, either with the benchmark parameter ``prompts`` or by placing it at
the set's cache path (``$OPDKIT_CACHE/prompts/...``, default ``~/.cache/opdkit``), where every
later run finds it without parameters (e.g. from a recipe's ``eval.benchmarks``).

The official test sets of the GenEval and OCR benchmarks are pinned by sha256 and downloaded on
request (:mod:`opdkit.data.cache`). Upstream sources (both MIT):

- GenEval (djghosh13/geneval, commit af4902f2) ``prompts/evaluation_metadata.jsonl``: 553 prompts.
- flow_grpo (yifan123/flow_grpo, commit ac4c86e8) ``dataset/ocr/test.txt``: 1,018 prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from opdkit.data.cache import DatasetFile, PromptFile, cache_dir, resolve_dataset_file
from opdkit.data.records import (
    read_drawbench,
    read_geneval_metadata,
    read_hpd,
    read_ocr_prompts,
    read_plain_prompts,
    read_prompt_file,
)
from opdkit.errors import OpdkitError

BUILTIN_DATASETS = ("shapes",)


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

GENEVAL_METADATA = DatasetFile(
    name="GenEval metadata",
    cache_name="geneval/evaluation_metadata.jsonl",
    urls=(
        "https://raw.githubusercontent.com/djghosh13/geneval/af4902f2/prompts/evaluation_metadata.jsonl",
        "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl",
    ),
    sha256="5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13",
    param="metadata",
    source="github.com/djghosh13/geneval prompts/evaluation_metadata.jsonl",
)

OCR_TEST = DatasetFile(
    name="OCR test prompts",
    cache_name="ocr/test.txt",
    urls=(
        "https://raw.githubusercontent.com/yifan123/flow_grpo/ac4c86e8/dataset/ocr/test.txt",
        "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/ocr/test.txt",
    ),
    sha256="4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc",
    param="prompts",
    source="github.com/yifan123/flow_grpo dataset/ocr/test.txt",
)


def prompt_set(name: str) -> PromptSet:
    """The named prompt set ``name``; an :class:`OpdkitError` listing the names for any other."""
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
        cached = cache_dir() / spec.cache_name
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
        records = read_drawbench(file)
    elif name == "hpdv2":
        records = read_hpd(file)
    else:
        # the task tag of a plain prompt set: "ocr" for ocr-train, "pickscore" for the others
        records = read_plain_prompts(file, "ocr" if name.startswith("ocr") else name.split("-")[0])
    if not records:
        raise OpdkitError(f"{file}: holds no prompts")
    return records


def load_geneval_metadata(path: str | Path | None = None, download: bool = False) -> tuple[list[dict[str, Any]], PromptFile]:
    """GenEval's metadata records (one dict per prompt, upstream strings verbatim) and their file.

    Each record: ``{"tag", "prompt", "include": [{"class", "count", "color"?, "position"?}],
    "exclude"?: [...]}``; the official file has 553.
    """
    located = resolve_dataset_file(GENEVAL_METADATA, path, download)
    return read_geneval_metadata(located.path), located


def load_ocr_prompts(path: str | Path | None = None, download: bool = False) -> tuple[list[dict[str, Any]], PromptFile]:
    """flow_grpo's OCR test prompts as records ``{"prompt", "tag": "ocr", "text": quoted target}``.

    One prompt per non-empty line (the official file: 1,018); the target is the text inside the
    first pair of double quotes (:func:`opdkit.scoring.ocr.ocr_target`).
    """
    located = resolve_dataset_file(OCR_TEST, path, download)
    return read_ocr_prompts(located.path), located


class PromptSelection(Protocol):
    """Which prompts to load: the fields of a recipe's ``prompts`` section (``PromptsSpec`` is one).

    Attributes:
        dataset: a source name or path, or a list of them (records concatenated in that order).
        split: the shapes split, ``"train"``, ``"test"`` or ``"train-minus-fold"`` (other
            sources have one).
        tags: keep only records whose task tag is listed (``None``: all).
        tag: the task tag of records that carry none (plain ``.txt`` prompt files).
        limit: keep the first ``limit`` records (``None``: all).
    """

    @property
    def dataset(self) -> str | Sequence[str]: ...

    @property
    def split(self) -> str: ...

    @property
    def tags(self) -> Sequence[str] | None: ...

    @property
    def tag(self) -> str | None: ...

    @property
    def limit(self) -> int | None: ...


def _sources(spec: PromptSelection) -> list[str]:
    return [spec.dataset] if isinstance(spec.dataset, str) else list(spec.dataset)


def check_prompt_source(spec: PromptSelection) -> None:
    """Raise :class:`OpdkitError` if a source cannot exist (no file read beyond a stat).

    Named prompt sets (:data:`PROMPT_SETS`) are accepted without their file: it is looked up
    (cache, or a clear message naming the upstream file) when the run starts.
    """
    for source in _sources(spec):
        if source in BUILTIN_DATASETS or source in PROMPT_SETS:
            continue
        path = Path(source).expanduser()
        if path.suffix not in (".jsonl", ".txt"):
            names = ", ".join((*BUILTIN_DATASETS, *PROMPT_SETS))
            raise OpdkitError(f"{source!r} is neither a named prompt set ({names}) nor a .jsonl/.txt file path")
        if not path.is_file():
            raise OpdkitError(f"prompt file {str(path)!r} does not exist")


def prompt_split_problem(spec: PromptSelection) -> str | None:
    """Why ``spec.split`` cannot apply to its sources, or None. The recipe schema and
    :func:`load_prompts` both ask, each naming the key its own way."""
    if spec.split == "train-minus-fold" and "shapes" not in _sources(spec):
        # the fold is cut from the shapes train split; elsewhere the split would be ignored silently
        return f"'train-minus-fold' needs the shapes dataset, got dataset {spec.dataset!r}"
    return None


def load_prompts(spec: PromptSelection) -> list[dict[str, Any]]:
    """The prompt records ``spec`` selects, in source order, filtered by tag and limited."""
    check_prompt_source(spec)
    problem = prompt_split_problem(spec)
    if problem is not None:
        raise OpdkitError(f"prompts.split: {problem}")
    records: list[dict[str, Any]] = []
    for source in _sources(spec):
        if source == "shapes":
            # imported here: the shapes world needs numpy, which no other source does
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
