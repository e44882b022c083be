"""Prompts: the records models are trained and evaluated on, where they come from, and the file cache.

A prompt record is a plain dict with at least ``prompt`` (str) and ``tag`` (the task tag routers
and per-tag metrics use); GenEval-style records add ``include``/``exclude``, OCR ones ``text``.

Modules, each importing only those listed above it (and nothing of the recipe or the trainers:
:mod:`opdkit.recipe` calls in here, never the other way):

- :mod:`~opdkit.data.cache`: the download cache ``$OPDKIT_CACHE``; sha256-pinned upstream files,
  located from a user path, the cache or a verified download.
- :mod:`~opdkit.data.records`: the record format and the readers that build and validate records
  from prompt files (JSONL/TXT, GenEval metadata, OCR prompts, DrawBench CSV, HPD v2 JSON).
- :mod:`~opdkit.data.sources`: named prompt sources (``shapes``, the named prompt sets, the
  pinned GenEval and OCR test files) and the records a recipe's ``prompts`` section selects.
"""
