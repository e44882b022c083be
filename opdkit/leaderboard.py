"""``opdkit leaderboard``: one table of every model's results, in the terminal, Markdown or HTML.

Reads ``<results>/<model>/<bench>.json`` summaries written by ``opdkit eval``. Columns are grouped
by benchmark family (GenEval per tag first, then OCR, then everything else); the best value of
each column is bold; arrows give each column's direction.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError
from opdkit.rundir import atomic_write_text

GENEVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("overall", "Overall"),
    ("single_object", "Single"),
    ("two_object", "Two"),
    ("counting", "Counting"),
    ("colors", "Colors"),
    ("position", "Position"),
    ("color_attr", "Attr. binding"),
)


@dataclass(frozen=True)
class Column:
    bench: str
    metric: str
    title: str
    higher_is_better: bool


def load_results(results_dir: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {bench: summary}}`` from every ``<model>/<bench>.json`` under ``results_dir``."""
    root = Path(results_dir)
    if not root.is_dir():
        raise OpdkitError(f"{root}: no such results directory (run `opdkit eval` first)")
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(root.glob("*/*.json")):
        if path.name.endswith(".settings.json"):
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise OpdkitError(f"{path}: not a valid result file: {exc.msg}") from None
        if not isinstance(summary, dict) or "bench" not in summary or "metrics" not in summary:
            continue
        table.setdefault(str(summary.get("model", path.parent.name)), {})[summary["bench"]] = summary
    if not table:
        raise OpdkitError(f"{root}: holds no result files (<model>/<bench>.json)")
    return table


def columns_for(results: dict[str, dict[str, dict[str, Any]]]) -> list[Column]:
    """GenEval-family benchmarks get per-tag columns; every other benchmark its ``overall``."""
    benches: dict[str, dict[str, Any]] = {}
    for per_model in results.values():
        for bench, summary in per_model.items():
            benches.setdefault(bench, summary)

    def order(item: tuple[str, dict[str, Any]]) -> tuple[int, str]:
        family = item[1].get("family", "")
        return ({"GenEval": 0, "OCR": 1}.get(family, 2), item[0])

    cols: list[Column] = []
    for bench, summary in sorted(benches.items(), key=order):
        hib = bool(summary.get("higher_is_better", True))
        if summary.get("family") == "GenEval":
            cols += [Column(bench, key, f"{bench} {title}" if key == "overall" else title, hib) for key, title in GENEVAL_COLUMNS]
        else:
            cols.append(Column(bench, "overall", bench, hib))
    return cols


def _cell(results: dict[str, dict[str, dict[str, Any]]], model: str, col: Column) -> float | None:
    value = results.get(model, {}).get(col.bench, {}).get("metrics", {}).get(col.metric)
    return float(value) if isinstance(value, (int, float)) else None


def _best(results: dict[str, dict[str, dict[str, Any]]], col: Column) -> float | None:
    values = [v for m in results if (v := _cell(results, m, col)) is not None]
    if not values:
        return None
    return max(values) if col.higher_is_better else min(values)


def _engines(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, str]:
    return {b: s.get("engine", "") for per in results.values() for b, s in per.items()}


def to_markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    cols = columns_for(results)
    head = ["Model", *[f"{c.title} {'↑' if c.higher_is_better else '↓'}" for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in sorted(results):
        cells = [model]
        for col in cols:
            value, best = _cell(results, model, col), _best(results, col)
            text = "-" if value is None else f"{value:.3f}"
            cells.append(f"**{text}**" if value is not None and value == best and len(results) > 1 else text)
        lines.append("| " + " | ".join(cells) + " |")
    engines = _engines(results)
    notes = ", ".join(f"{b}: {e}" for b, e in sorted(engines.items()) if e)
    if notes:
        lines += ["", f"Engines: {notes}."]
    return "\n".join(lines) + "\n"


def to_html(results: dict[str, dict[str, dict[str, Any]]], results_dir: Path) -> str:
    """A self-contained page (inline CSS, images embedded as data URIs)."""
    import base64

    cols = columns_for(results)
    rows = []
    for model in sorted(results):
        cells = [f"<th>{html.escape(model)}</th>"]
        for col in cols:
            value, best = _cell(results, model, col), _best(results, col)
            text = "-" if value is None else f"{value:.3f}"
            cls = ' class="best"' if value is not None and value == best and len(results) > 1 else ""
            cells.append(f"<td{cls}>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{html.escape(c.title)} {'↑' if c.higher_is_better else '↓'}</th>" for c in cols)
    grids = []
    for model in sorted(results):
        for bench in sorted(results[model]):
            grid = results_dir / model / f"{bench}.grid.png"
            if grid.is_file():
                data = base64.b64encode(grid.read_bytes()).decode()
                grids.append(
                    f'<figure><figcaption>{html.escape(model)} · {html.escape(bench)}</figcaption>'
                    f'<img alt="{html.escape(model)} {html.escape(bench)} samples" src="data:image/png;base64,{data}"></figure>'
                )
    engines = ", ".join(f"{html.escape(b)}: {html.escape(e)}" for b, e in sorted(_engines(results).items()) if e)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>opdkit leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
thead th {{ background: #f0f0f0; }} tbody th {{ text-align: left; }} td.best {{ font-weight: bold; background: #e8f5e9; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 560px; }}
</style></head><body>
<h1>opdkit leaderboard</h1>
<table><thead><tr><th>Model</th>{head}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>
<p>Engines: {engines}</p>
<h2>Samples</h2>
{"".join(grids)}
</body></html>
"""


def run_leaderboard(results_dir: str | Path, out: str | Path | None = None) -> str:
    """Print the table in the terminal and optionally write Markdown or HTML; returns Markdown."""
    from rich.console import Console
    from rich.table import Table

    results_dir = Path(results_dir)
    results = load_results(results_dir)
    cols = columns_for(results)
    table = Table(title=f"opdkit leaderboard ({results_dir})")
    table.add_column("Model")
    for col in cols:
        table.add_column(f"{col.title} {'↑' if col.higher_is_better else '↓'}", justify="right")
    for model in sorted(results):
        cells = [model]
        for col in cols:
            value, best = _cell(results, model, col), _best(results, col)
            text = "-" if value is None else f"{value:.3f}"
            cells.append(f"[bold]{text}[/]" if value is not None and value == best and len(results) > 1 else text)
        table.add_row(*cells)
    Console().print(table)
    markdown = to_markdown(results)
    if out is not None:
        out = Path(out)
        if out.suffix == ".md":
            atomic_write_text(out, markdown)
        elif out.suffix in (".html", ".htm"):
            atomic_write_text(out, to_html(results, results_dir))
        else:
            raise OpdkitError(f"--out {out}: expected a .md or .html file name")
        Console(stderr=True).print(f"wrote {out}")
    return markdown
