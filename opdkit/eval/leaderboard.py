"""``opdkit leaderboard``: one table of every model's results, in the terminal, Markdown or HTML
(over 500 lines: reading and checking summaries, the columns by settings and the three renderings
share one table model).

Reads ``<results>/<model>/<bench>.json`` summaries written by ``opdkit eval``. One table per world
(SD3, shapes: a model is only ever scored on its own world's benchmarks), one row per model;
wide columns grouped by benchmark family: each GenEval-family benchmark gets Overall, Single,
Two, Counting, Colors, Position and Attr. binding; then OCR-family benchmarks; then every other
benchmark's headline metric. Results of a benchmark made with other settings than most (another
split, sampler, seed, ``--limit``: see :func:`columns_for`) get columns of their own, titled by
what differs. The best value of each column is bold (when two or more models have one); arrows
give each column's direction; the detector/engine and protocol of every benchmark are listed
under the table; a value computed on a subset (``--limit``) carries a ``†``.

The HTML page is self-contained (inline CSS, images as data URIs): the table, the engines, the
sample grid of every (model, benchmark), and reward/KL curves of the training runs found beside
the results (``runs/`` next to the results directory, or ``--runs DIR``: any directory holding a
``metrics.jsonl``; see :mod:`opdkit.eval.curves`). Curves need matplotlib (extra ``plots``);
without it the page says so.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError
from opdkit.eval.curves import curves_html
from opdkit.eval.uncertainty import STDERR_UNITS, stderr_unit
from opdkit.rundir import atomic_write_text

Results = dict[str, dict[str, dict[str, Any]]]
"""``{folder: {bench: summary}}``, as read by :func:`load_results`: one row per results folder."""

GENEVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("overall", "Overall"),
    ("single_object", "Single"),
    ("two_object", "Two"),
    ("counting", "Counting"),
    ("colors", "Colors"),
    ("position", "Position"),
    ("color_attr", "Attr. binding"),
)
"""GenEval metric keys (as :func:`opdkit.scoring.geneval.summarize` names them) and column titles."""

FAMILY_ORDER = {"GenEval": 0, "OCR": 1}
SUBSET_MARK = "†"
# the summary fields that must agree for two results to be paired image by image (opdkit compare)
# and to be ranked in one column here
PAIRED_FIELDS = ("protocol", "engine", "seed", "sampler", "n_prompts", "n_images", "limit")


@dataclass(frozen=True)
class Column:
    """One leaderboard column: a metric of a benchmark, over the results made with one set of
    settings (:func:`settings_key`)."""

    bench: str
    metric: str
    metric_title: str  # a GenEval tag's title ("Counting"); "" for a benchmark's one column
    higher_is_better: bool
    family: str = ""
    settings: str = ""  # the settings_key of the results this column ranks; "" for all of the benchmark's
    variant: str = ""  # how those settings differ from the benchmark's usual ones; "" for the usual

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    @property
    def label(self) -> str:
        """The benchmark, with what differs for a column of other settings: ``shapes-ocr (steps=2)``."""
        return f"{self.bench} ({self.variant})" if self.variant else self.bench

    @property
    def title(self) -> str:
        """``shapes-ocr``, ``shapes-geneval Overall``, ``Counting`` (a tag: its benchmark heads the overall)."""
        if not self.metric_title:
            return self.label
        return f"{self.label} {self.metric_title}" if self.metric == "overall" else self.metric_title


def load_results(results_dir: str | Path, skipped: list[Path] | None = None) -> Results:
    """``{folder: {bench: summary}}`` from every ``<folder>/<bench>.json`` under ``results_dir``.

    Rows are keyed by folder, not by the model name a summary records: two folders holding the
    same model (a copied or renamed folder) are two rows, never one hiding the other. Each
    summary gets ``_dir``, the folder its rows and grid live in.

    Only a file named after the benchmark it records is read: a copy kept beside the live one
    (``shapes-ocr.old.json``, still recording ``"bench": "shapes-ocr"``) would otherwise replace
    it, and its rows file is not the copy's. Such files are appended to ``skipped``.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise OpdkitError(f"{root}: no such results directory (run `opdkit eval` first)")
    table: Results = {}
    for path in sorted(root.glob("*/*.json")):
        if path.name.endswith(".settings.json"):
            continue
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OpdkitError(f"{path}: not a valid result file: {getattr(exc, 'msg', exc)}") from None
        if not isinstance(summary, dict) or "bench" not in summary:
            continue
        if path.name != f"{summary['bench']}.json":
            if skipped is not None:
                skipped.append(path)
            continue
        _check_summary(path, summary)
        folder = path.parent.name
        summary = {**summary, "_dir": folder}
        table.setdefault(folder, {})[str(summary["bench"])] = summary
    if not table:
        raise OpdkitError(f"{root}: holds no result files (<model>/<bench>.json)")
    return table


def _check_summary(path: Path, summary: dict[str, Any]) -> None:
    """Refuse, in one line naming the file and key, a hand-edited summary field the table reads
    as a type it is not: a result whose metrics are gone is not dropped from the table unsaid,
    and a stderr that is no number does not fail the HTML page after the table was printed."""
    optional = (int, float, type(None))
    expected = {"metrics": (dict, "an object of metric values"), "stderr": (optional, "a number or null"),
                "sampler": ((dict, type(None)), "an object or null")}  # fmt: skip
    for key, (types, what) in expected.items():
        value = summary.get(key)  # an absent stderr or sampler is None, as the table reads it
        if isinstance(value, bool) or not isinstance(value, types):
            raise OpdkitError(f"{path}: {key}: expected {what} (got {json.dumps(value)})")
    unit = summary.get("stderr_unit")  # absent in summaries written before it was recorded
    if unit is not None and unit not in STDERR_UNITS:
        raise OpdkitError(f"{path}: stderr_unit: expected one of {', '.join(map(json.dumps, STDERR_UNITS))} (got {json.dumps(unit)})")


def recorded_models(per_model: dict[str, dict[str, Any]], folder: str) -> list[str]:
    """The model names a folder's summaries record (the folder's name where one records none)."""
    return sorted({str(s.get("model", folder)) for s in per_model.values()})


def row_label(results: Results, folder: str) -> str:
    """How a row is named: its folder, and the recorded model name too when that differs.

    ``opdkit eval`` files a model's results under its own name, so the two differ only for a
    folder copied or renamed by hand; its row then says which model it holds: ``copy/ (sd35m)``.
    """
    names = recorded_models(results[folder], folder)
    return folder if names == [folder] else f"{folder}/ ({', '.join(names)})"


def model_collisions(results: Results) -> dict[str, list[str]]:
    """``{model name: [folders]}`` for every model name recorded in more than one folder."""
    folders: dict[str, list[str]] = {}
    for folder, per_model in sorted(results.items()):
        for name in recorded_models(per_model, folder):
            folders.setdefault(name, []).append(folder)
    return {name: found for name, found in folders.items() if len(found) > 1}


def settings_of(summary: dict[str, Any]) -> dict[str, Any]:
    """What results of a benchmark must share to be ranked in one column: the fields ``opdkit
    compare`` pairs two results on (another split is another protocol; other sampler steps, seed,
    ``--limit`` or samples per prompt are other images)."""
    return {key: summary.get(key) for key in PAIRED_FIELDS}


def settings_key(summary: dict[str, Any]) -> str:
    """:func:`settings_of` as one string: equal for results ranked in one column."""
    return json.dumps(settings_of(summary), sort_keys=True, default=str)


def _variant(settings: dict[str, Any], usual: dict[str, Any]) -> str:
    """What ``settings`` (:func:`settings_of`) has that ``usual`` has otherwise, short:
    ``steps=2``, ``seed=5``, ``protocol flow_grpo-ocr/shapes-train/3``; "" where nothing differs."""
    parts = []
    for key, value in settings.items():
        if value == usual.get(key):
            continue
        if key == "n_prompts" and settings.get("limit") != usual.get("limit"):
            continue  # the number of prompts follows from the limit
        if key == "n_images" and settings.get("n_prompts") != usual.get("n_prompts"):
            continue  # and the number of images from the number of prompts
        if key == "sampler" and isinstance(value, dict) and isinstance(usual.get(key), dict):
            parts += [f"{k}={value.get(k)}" for k in {**usual[key], **value} if value.get(k) != usual[key].get(k)]
        elif key in ("protocol", "engine"):
            parts.append(f"{key} {value}")
        elif key == "limit" and value is None:
            parts.append("all prompts")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _usual(settings: list[dict[str, Any]]) -> dict[str, Any]:
    """Field by field, the value most of ``settings`` have (on a tie, the first one's)."""
    usual = {}
    for key in settings[0]:
        counts = Counter(json.dumps(s[key], sort_keys=True, default=str) for s in settings)
        usual[key] = json.loads(counts.most_common(1)[0][0])
    return usual


def columns_for(results: Results) -> list[Column]:
    """GenEval-family benchmarks get per-tag columns; every other benchmark its ``overall``.

    Results of one benchmark made with other settings (:func:`settings_of`) get columns of their
    own, so that a best value is only picked among numbers that measure the same thing. Results
    with the benchmark's usual settings (field by field, what most folders have) keep the plain
    title; others are titled by what differs from them, ``shapes-ocr (steps=2)``.
    """
    every: dict[str, list[dict[str, Any]]] = {}  # bench -> each folder's settings
    first: dict[str, dict[str, Any]] = {}
    for _, per_model in sorted(results.items()):
        for bench, summary in per_model.items():
            every.setdefault(bench, []).append(settings_of(summary))
            first.setdefault(bench, summary)

    def order(bench: str) -> tuple[int, str]:
        return (FAMILY_ORDER.get(str(first[bench].get("family", "")), 2), bench)

    cols: list[Column] = []
    for bench in sorted(every, key=order):
        summary = first[bench]
        hib = bool(summary.get("higher_is_better", True))
        family = str(summary.get("family", ""))
        usual = _usual(every[bench])
        distinct = {settings_key(settings): settings for settings in every[bench]}  # a settings dict is its own settings_of
        for variant, found in sorted((_variant(settings, usual), key) for key, settings in distinct.items()):
            key = found if len(distinct) > 1 else ""  # one column takes every result: no check per cell
            if family == "GenEval":
                cols += [
                    Column(bench, metric, title, hib, family, key, variant) for metric, title in GENEVAL_COLUMNS
                ]
            else:
                cols.append(Column(bench, "overall", "", hib, family, key, variant))
    return cols


def _cell(results: Results, model: str, col: Column) -> float | None:
    summary = results.get(model, {}).get(col.bench)
    if summary is None or (col.settings and settings_key(summary) != col.settings):
        return None  # in the column of the settings it was made with
    value = summary["metrics"].get(col.metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _best(results: Results, col: Column) -> float | None:
    """The best value of a column, or None when fewer than two models have one (nothing to rank)."""
    values = [v for m in results if (v := _cell(results, m, col)) is not None]
    if len(values) < 2:
        return None
    return max(values) if col.higher_is_better else min(values)


def _is_subset(results: Results, model: str, bench: str) -> bool:
    return results.get(model, {}).get(bench, {}).get("limit") is not None


def _text(results: Results, model: str, col: Column) -> tuple[str, bool]:
    """(formatted value with a subset mark, is it the column's best)."""
    value = _cell(results, model, col)
    if value is None:
        return "-", False
    mark = SUBSET_MARK if _is_subset(results, model, col.bench) else ""
    best = _best(results, col)
    return f"{value:.3f}{mark}", best is not None and value == best


def bench_notes(results: Results) -> dict[str, list[str]]:
    """Per benchmark, one line per distinct (protocol, engine): what scored it and for which models.

    Two engines for one benchmark mean its numbers are not comparable across those models; the
    notes say so by listing the models of each.
    """
    seen: dict[str, dict[tuple[str, str], list[str]]] = {}
    for model, per_model in sorted(results.items()):
        for bench, s in per_model.items():
            key = (str(s.get("protocol", "")), str(s.get("engine", "")))
            seen.setdefault(bench, {}).setdefault(key, []).append(row_label(results, model))
    notes: dict[str, list[str]] = {}
    for bench, variants in sorted(seen.items()):
        lines = []
        for (protocol, engine), models in variants.items():
            text = ", ".join(x for x in (f"engine {engine}" if engine else "", f"protocol {protocol}" if protocol else "") if x)
            if len(variants) > 1:
                text += f" (models: {', '.join(models)})"
            lines.append(text or "no engine recorded")
        notes[bench] = lines
    return notes


def _any_subset(results: Results) -> bool:
    return any(_is_subset(results, m, b) for m in results for b in results[m])


WORLD_TITLES = {"sd3": "SD3 world", "shapes": "Shapes world"}


def split_by_world(results: Results) -> list[tuple[str, Results]]:
    """``[(world, results of that world)]``, SD3 first: one table per world.

    A model is evaluated only on benchmarks of its own world (the runner refuses others), so
    separate tables keep every row dense instead of one very wide, mostly empty table.
    """
    worlds: dict[str, Results] = {}
    for model, per_model in results.items():
        for bench, summary in per_model.items():
            worlds.setdefault(str(summary.get("world", "")), {}).setdefault(model, {})[bench] = summary
    order = {"sd3": 0, "shapes": 1}
    return sorted(worlds.items(), key=lambda kv: (order.get(kv[0], 2), kv[0]))


def _world_title(world: str) -> str:
    return WORLD_TITLES.get(world, f"{world} world" if world else "Results")


# ------------------------------------------------------------------------------------------
# Markdown and terminal
# ------------------------------------------------------------------------------------------


def _markdown_table(results: Results) -> list[str]:
    cols = columns_for(results)
    head = ["Model", *[f"{c.title} {c.arrow}" for c in cols]]
    align = ["---", *["---:" for _ in cols]]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for model in sorted(results):
        cells = [row_label(results, model).replace("|", "\\|")]
        for col in cols:
            text, best = _text(results, model, col)
            cells.append(f"**{text}**" if best else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(results: Results) -> str:
    """GitHub-flavoured Markdown: one table per world (headed when there are several), then notes."""
    worlds = split_by_world(results)
    lines: list[str] = []
    for world, part in worlds:
        if len(worlds) > 1:
            lines += [f"### {_world_title(world)}", ""]
        lines += [*_markdown_table(part), ""]
    for bench, notes in bench_notes(results).items():
        lines.append(f"- `{bench}`: " + "; ".join(notes))
    if _any_subset(results):
        lines.append(f"- {SUBSET_MARK} computed on a subset of the prompts (`--limit`): a quick look, not the full protocol.")
    return "\n".join(lines) + "\n"


def print_table(results: Results, title: str) -> None:
    """The leaderboard as rich tables in the terminal (best values bold), one per world.

    A world's table is split when it does not fit the terminal: one table per GenEval-family
    benchmark and one for all other benchmarks, each listing only the models with results there.
    """
    from rich.console import Console

    console = Console()
    worlds = split_by_world(results)
    for world, part in worlds:
        _print_world(console, part, f"{title}: {_world_title(world)}" if len(worlds) > 1 else title)
    for bench, notes in bench_notes(results).items():
        console.print(f"{bench}: {'; '.join(notes)}", markup=False, highlight=False)
    if _any_subset(results):
        console.print(f"{SUBSET_MARK} subset of the prompts (--limit)", markup=False, highlight=False)


def _print_world(console: Any, results: Results, title: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    cols = columns_for(results)
    model_width = max(len(row_label(results, m)) for m in results)
    # cell text is at most 6 characters ("0.123†"); rich adds 3 per column for padding and rules
    needed = model_width + 4 + sum(max(len(f"{c.title} {c.arrow}"), 6) + 3 for c in cols)
    if needed <= console.width:
        parts = [cols]
    else:
        parts = [[c for c in cols if c.label == b] for b in dict.fromkeys(c.label for c in cols if c.family == "GenEval")]
        parts.append([c for c in cols if c.family != "GenEval"])
    for i, part in enumerate(p for p in parts if p):
        table = Table(title=title if i == 0 else None)
        table.add_column("Model", no_wrap=True)
        for col in part:
            table.add_column(escape(f"{col.title} {col.arrow}"), justify="right")
        for model in sorted(results):
            cells = [_text(results, model, col) for col in part]
            if all(text == "-" for text, _ in cells):
                continue
            table.add_row(escape(row_label(results, model)), *[f"[bold]{text}[/]" if best else text for text, best in cells])
        console.print(table)


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-top: 0; }
table.board { border-collapse: collapse; font-variant-numeric: tabular-nums; }
.board th, .board td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
.board thead th { background: #f3f3f3; } .board thead tr.groups th { background: #e6ecf5; text-align: center; }
.board tbody th { text-align: left; } .board td.best { font-weight: bold; background: #e8f5e9; }
.board td.missing { color: #aaa; }
ul.notes { color: #444; } figure { display: inline-block; margin: 0.8em; vertical-align: top; }
figcaption { font-weight: 600; margin-bottom: 0.3em; } img { max-width: 640px; border: 1px solid #ddd; }
p.note { color: #8a5a00; background: #fff7e0; padding: 0.5em 0.8em; display: inline-block; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _cell_title(summary: dict[str, Any], col: Column) -> str:
    sampler = summary.get("sampler") or {}
    parts = [f"{summary.get('n_images', '?')} images"]
    if summary.get("stderr") is not None and col.metric == "overall":
        # older summaries hold a stderr over images, smaller than the one over prompts now written
        parts.append(f"stderr {summary['stderr']:.3f} over {stderr_unit(summary)}s")
    if sampler:
        parts.append(f"{sampler.get('steps')} steps, CFG {sampler.get('cfg')}, {sampler.get('resolution')} px")
    if summary.get("limit") is not None:
        parts.append(f"first {summary['limit']} prompts only")
    return "; ".join(parts)


def _html_table(results: Results) -> str:
    cols = columns_for(results)
    groups: list[tuple[str, int]] = []
    for col in cols:
        same = col.family.lower() == col.label.lower()
        label = col.family if same else (f"{col.family} · {col.label}" if col.family else col.label)
        if groups and groups[-1][0] == label:
            groups[-1] = (label, groups[-1][1] + 1)
        else:
            groups.append((label, 1))
    group_row = "".join(f'<th colspan="{n}">{html.escape(label)}</th>' for label, n in groups)
    title_row = "".join(
        f'<th title="{"higher" if c.higher_is_better else "lower"} is better">'
        f"{html.escape(c.title.removeprefix(c.label + ' ') if c.family == 'GenEval' else 'Score')} {c.arrow}</th>"
        for c in cols
    )
    body = []
    for model in sorted(results):
        cells = [f"<th>{html.escape(row_label(results, model))}</th>"]
        for col in cols:
            text, best = _text(results, model, col)
            summary = results[model].get(col.bench)
            classes = "best" if best else ("missing" if text == "-" else "")
            title = f' title="{html.escape(_cell_title(summary, col))}"' if summary and text != "-" else ""
            cells.append(f'<td class="{classes}"{title}>{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="board"><thead>\n<tr class="groups"><th rowspan="2">Model</th>{group_row}</tr>\n'
        f"<tr>{title_row}</tr>\n</thead><tbody>\n{''.join(body)}\n</tbody></table>"
    )


def to_html(results: Results, results_dir: Path, runs_dir: Path | None = None) -> str:
    """A self-contained page: one table per world, engines, training curves and sample grids."""
    worlds = split_by_world(results)
    tables = "\n".join(
        (f"<h2>{html.escape(_world_title(world))}</h2>\n" if len(worlds) > 1 else "") + _html_table(part)
        for world, part in worlds
    )

    notes = "".join(
        f"<li><b>{html.escape(bench)}</b>: {html.escape('; '.join(lines))}</li>" for bench, lines in bench_notes(results).items()
    )
    if _any_subset(results):
        notes += f"<li>{SUBSET_MARK} computed on a subset of the prompts (<code>--limit</code>): a quick look, not the full protocol.</li>"

    curves = curves_html(runs_dir)

    grids = []
    for model in sorted(results):
        for bench in sorted(results[model]):
            folder = results[model][bench].get("_dir", model)
            grid = results_dir / folder / f"{bench}.grid.png"
            label = html.escape(row_label(results, model))
            if grid.is_file():
                grids.append(
                    f"<figure><figcaption>{label} · {html.escape(bench)}</figcaption>"
                    f'<img alt="{label} {html.escape(bench)} samples" src="{_data_uri(grid)}"></figure>'
                )
    samples = "".join(grids) or '<p class="note">No sample grids found.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>opdkit leaderboard</title>
<style>{_CSS}</style></head><body>
<h1>opdkit leaderboard</h1>
<p class="meta">{len(results)} models · results from {html.escape(str(results_dir))} · best value per column in bold</p>
{tables}
<h2>Protocols and engines</h2>
<ul class="notes">{notes}</ul>
<h2>Training curves</h2>
{curves}
<h2>Samples</h2>
{samples}
</body></html>
"""


def run_leaderboard(results_dir: str | Path, out: str | Path | None = None, runs_dir: str | Path | None = None) -> str:
    """Print the table in the terminal and optionally write Markdown or HTML; returns the Markdown.

    Args:
        results_dir: directory of ``<model>/<bench>.json`` files.
        out: ``FILE.md`` or ``FILE.html`` to write as well.
        runs_dir: training runs to plot in the HTML; default ``runs/`` beside ``results_dir``
            when it exists.
    """
    from rich.console import Console

    results_dir = Path(results_dir)
    if out is not None and Path(out).suffix not in (".md", ".html", ".htm"):  # before anything is printed
        raise OpdkitError(f"--out {out}: expected a .md or .html file name")
    if runs_dir is not None and not Path(runs_dir).is_dir():
        raise OpdkitError(f"--runs {runs_dir}: no such directory")
    skipped: list[Path] = []
    results = load_results(results_dir, skipped)
    warn = Console(stderr=True, highlight=False, soft_wrap=True)
    if skipped:
        warn.print(f"warning: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} not named after the benchmark "
                   f"they record (a copy?): {', '.join(str(p) for p in skipped)}", markup=False)  # fmt: skip
    for name, folders in model_collisions(results).items():
        shown = ", ".join(str(results_dir / f) for f in folders)
        warn.print(f"warning: model {name!r} has results in {len(folders)} folders ({shown}); each is its own row, "
                   "named by its folder", markup=False)  # fmt: skip
    print_table(results, f"opdkit leaderboard ({results_dir})")
    markdown = to_markdown(results)
    if out is not None:
        out = Path(out)
        if out.suffix == ".md":
            atomic_write_text(out, markdown)
        elif out.suffix in (".html", ".htm"):
            if runs_dir is None:
                beside = results_dir.resolve().parent / "runs"
                runs_dir = beside if beside.is_dir() else None
            atomic_write_text(out, to_html(results, results_dir, Path(runs_dir) if runs_dir is not None else None))
        Console(stderr=True).print(f"wrote {out}", markup=False)
    return markdown
