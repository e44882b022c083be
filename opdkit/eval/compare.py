"""``opdkit compare``: the difference between two models on each benchmark, with its paired error.

Two models evaluated with the same protocol, prompts, sampler and seed draw image ``(p, s)`` of
prompt ``p`` from the same starting noise, so their scores are paired. The difference of a headline metric is
then estimated from per-prompt differences ``d_p`` (the mean over the prompt's samples of
``score_A - score_B``), which cancels most of the prompt-to-prompt and noise-to-noise spread that
each model's own stderr carries:

* a metric that is the mean of all images (OCR, quality, preference scores):
  ``diff = mean_p d_p``, ``SE = sd(d_p) / sqrt(P)``;
* a GenEval-family ``overall`` (the mean over tags of each tag's accuracy):
  ``diff = mean_t mean_{p in t} d_p``, ``SE = sqrt(sum_t sd_t^2 / n_t) / T``
  (a tag with a single prompt adds no variance term).

The SE is :func:`opdkit.eval.uncertainty.stderr_over_prompts` of the ``d_p``, the formula each
summary's own ``stderr`` takes over its per-prompt scores.

Each difference is checked against the two summaries' own ``overall`` before it is reported, so a
benchmark whose headline is some other function of its rows is refused, not misreported.
"""

from __future__ import annotations

import numbers
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdkit.errors import OpdkitError
from opdkit.eval.leaderboard import PAIRED_FIELDS, Results, load_results, recorded_models
from opdkit.eval.runner import summarized_rows
from opdkit.eval.uncertainty import rows_by_prompt, stderr_over_prompts, tag_averaged


@dataclass(frozen=True)
class Difference:
    """``a - b`` on one benchmark's headline metric (``overall``), with its paired standard error."""

    bench: str
    a: float
    b: float
    diff: float
    stderr: float
    n_prompts: int

    @property
    def interval(self) -> tuple[float, float]:
        """The normal 95% interval of the difference."""
        return self.diff - 1.96 * self.stderr, self.diff + 1.96 * self.stderr


def paired_difference(bench: str, a: dict[str, Any], b: dict[str, Any], rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> Difference:
    """The paired difference of two results of ``bench`` (summaries ``a``, ``b`` and their rows)."""
    for key in PAIRED_FIELDS:
        if a.get(key) != b.get(key):
            raise OpdkitError(f"{bench}: the two results differ in {key} ({a.get(key)!r} against {b.get(key)!r}); rerun one of them to pair them")
    pa, pb = rows_by_prompt(rows_a), rows_by_prompt(rows_b)
    if pa.keys() != pb.keys() or any(pa[p][2].keys() != pb[p][2].keys() for p in pa):
        raise OpdkitError(f"{bench}: the two results hold different images (prompt and sample indices); rerun one of them")
    if not pa:
        raise OpdkitError(f"{bench}: no scored images")
    # rows are paired by prompt index: two prompt files (`-p prompts=`) put other prompts there
    other = next((p for p in sorted(pa) if pa[p][1] != pb[p][1]), None)
    if other is not None:
        raise OpdkitError(
            f"{bench}: the two results were evaluated on different prompt lists (prompt {other}: "
            f"{pa[other][1]!r} against {pb[other][1]!r}); evaluate both on the same prompts to pair them"
        )
    by_tag: dict[str, list[tuple[float, float, float]]] = {}  # tag -> per prompt (mean a, mean b, diff)
    all_a: list[float] = []
    all_b: list[float] = []
    for p in sorted(pa):
        tag, _, sa = pa[p]
        sb = pb[p][2]
        all_a.extend(sa.values())
        all_b.extend(sb.values())
        ma, mb = statistics.fmean(list(sa.values())), statistics.fmean(list(sb.values()))
        by_tag.setdefault(tag, []).append((ma, mb, ma - mb))
    by_tags = tag_averaged(a.get("family"))
    if by_tags:
        tags = sorted(by_tag)
        value_a = statistics.fmean([statistics.fmean([x[0] for x in by_tag[t]]) for t in tags])
        value_b = statistics.fmean([statistics.fmean([x[1] for x in by_tag[t]]) for t in tags])
    else:
        value_a, value_b = statistics.fmean(all_a), statistics.fmean(all_b)
    # no group of two prompts (one prompt, or one per tag): no spread to estimate, reported as 0
    stderr = stderr_over_prompts(((t, x[2]) for t, xs in by_tag.items() for x in xs), by_tags) or 0.0
    for value, summary, name in ((value_a, a, "first"), (value_b, b, "second")):
        reported = summary.get("metrics", {}).get("overall")
        if isinstance(reported, bool) or not isinstance(reported, numbers.Real) or abs(value - float(reported)) > 1e-6:
            raise OpdkitError(
                f"{bench}: the {name} model's overall ({reported}) is not the mean of its rows ({value:.6f}); "
                "compare knows image means and GenEval's mean over tags only"
            )
    return Difference(bench, value_a, value_b, value_a - value_b, stderr, len(pa))


def results_folder(results: Results, root: Path, model: str) -> str:
    """The results folder a model name means: the folder of that name, else the one folder whose
    results record that model; several such folders are refused, naming them."""
    if model in results:
        return model
    found = [folder for folder, per_model in sorted(results.items()) if model in recorded_models(per_model, folder)]
    if len(found) == 1:
        return found[0]
    if found:
        raise OpdkitError(
            f"{root}: model {model!r} has results in {len(found)} folders ({', '.join(found)}); give the folder name"
        )
    raise OpdkitError(f"{root}: no results for model {model!r} (have: {', '.join(sorted(results))})")


def compare(results_dir: str | Path, model_a: str, model_b: str, benches: list[str] | None = None) -> list[Difference]:
    """``model_a - model_b`` on every benchmark both have (or on ``benches``), from ``results_dir``.

    A model is named by its results folder (what the leaderboard's rows show), or by the model
    name its results record when exactly one folder holds it.
    """
    root = Path(results_dir)
    results = load_results(root)  # refuses a summary whose metrics are no object, naming it
    folder_a, folder_b = results_folder(results, root, model_a), results_folder(results, root, model_b)
    shared = [x for x in results[folder_a] if x in results[folder_b]]
    chosen = benches or shared
    missing = [x for x in chosen if x not in shared]
    if missing or not chosen:
        raise OpdkitError(f"{root}: {model_a!r} and {model_b!r} do not both have results for {missing or 'any benchmark'}")
    out = []
    for bench in chosen:
        a, b = results[folder_a][bench], results[folder_b][bench]
        rows_a, rows_b = (_summarized(root / s["_dir"] / f"{bench}.jsonl", s) for s in (a, b))
        out.append(paired_difference(bench, a, b, rows_a, rows_b))
    return out


def _summarized(path: Path, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``path`` that ``summary`` counts, as the runner picked them when it wrote it."""
    n_prompts = summary.get("n_prompts")
    if n_prompts is not None and (isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 0):
        raise OpdkitError(f"{path.with_suffix('.json')}: n_prompts is {n_prompts!r}, expected a whole number >= 0")
    return summarized_rows(path, n_prompts)


def print_differences(differences: list[Difference], model_a: str, model_b: str) -> None:
    """The differences as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"A = {model_a}, B = {model_b}: A - B, SE paired over prompts")
    for title in ("benchmark", "A", "B", "A - B", "SE", "95% CI", "prompts"):
        table.add_column(title, justify="left" if title == "benchmark" else "right", no_wrap=True)
    for d in differences:
        lo, hi = d.interval
        table.add_row(d.bench, f"{d.a:.3f}", f"{d.b:.3f}", f"{d.diff:+.3f}", f"{d.stderr:.3f}", f"{lo:+.3f}..{hi:+.3f}", str(d.n_prompts))
    Console().print(table)
