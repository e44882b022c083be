"""Training curves of runs for the leaderboard's HTML page: reward, KL (or loss) against step.

A run is any directory holding a ``metrics.jsonl`` (one JSON object per logged step, as the
trainers write it). Plots need matplotlib (extra ``plots``); without it the page says so.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any

from opdkit.rundir import read_jsonl

_KL_KEY = re.compile(r"(^|[/_])kl($|[/_])")


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories (holding ``metrics.jsonl``) directly under ``runs_dir`` or one level deeper."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = {p.parent for pattern in ("*/metrics.jsonl", "*/*/metrics.jsonl") for p in root.glob(pattern)}
    return sorted(found)


def curve_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Reward, KL and (when neither is logged, e.g. pretraining) loss series of one run.

    Returns ``{"reward": {key: [(step, value)]}, "kl": {...}, "loss": {...}}``: reward keys are
    ``reward`` and per-reward ``reward/<name>/mean``; KL keys are ``kl`` and any ``kl``-named
    component (``kl/teacher``, ``mar_kl``, ...), standard deviations excluded.
    """
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {"reward": {}, "kl": {}, "loss": {}}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        if not isinstance(step, int | float):
            continue
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            if "std" in key:
                continue
            if key == "reward" or (key.startswith("reward/") and key.endswith("/mean")):
                panel = "reward"
            elif _KL_KEY.search(key):
                panel = "kl"
            elif key == "loss":
                panel = "loss"
            else:
                continue
            panels[panel].setdefault(key, []).append((float(step), float(value)))
    if panels["reward"] or panels["kl"]:
        panels.pop("loss")
    return {name: series for name, series in panels.items() if series}


def plot_run(run: Path) -> str | None:
    """A PNG data URI with the run's reward and KL (or loss) curves; None if nothing to plot.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    panels = curve_series(read_jsonl(run / "metrics.jsonl"))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for key, points in series.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=key, linewidth=1.4)
        ax.set_title({"reward": "reward (mean)", "kl": "KL", "loss": "loss"}[name])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_html(runs_dir: Path | None) -> str:
    """The leaderboard page's "Training curves" section: one figure per run under ``runs_dir``, or a note why none."""
    if runs_dir is None:
        return '<p class="note">No runs directory given or found beside the results.</p>'
    runs = find_runs(runs_dir)
    if not runs:
        return f'<p class="note">No training runs (directories with metrics.jsonl) under {html.escape(str(runs_dir))}.</p>'
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            f'<p class="note">{len(runs)} training runs found, curves skipped: matplotlib is not installed '
            '(<code>pip install -e ".[plots]"</code>).</p>'
        )
    figures = []
    for run in runs:
        uri = plot_run(run)
        if uri is not None:
            figures.append(
                f'<figure><figcaption>{html.escape(run.name)}</figcaption><img alt="{html.escape(run.name)} curves" src="{uri}"></figure>'
            )
    return "".join(figures) or '<p class="note">The runs found log no reward, KL or loss.</p>'
