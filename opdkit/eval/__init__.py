"""Evaluation: run benchmarks on models, and compare and tabulate their results.

* :mod:`~opdkit.eval.benchmark` — :class:`Benchmark`, what a benchmark plug-in returns;
* :mod:`~opdkit.eval.runner` — ``opdkit eval``: :func:`run_eval` generates, scores and files
  one benchmark's results for one model (resumable, seeds per image);
* :mod:`~opdkit.eval.leaderboard` — ``opdkit leaderboard``: every model's results in one table
  (terminal, Markdown, HTML);
* :mod:`~opdkit.eval.curves` — reward/KL curves of training runs for the HTML leaderboard;
* :mod:`~opdkit.eval.compare` — ``opdkit compare``: paired differences of two models.

Image grids (:mod:`opdkit.grid`) stay outside: training writes sample grids too.
"""
