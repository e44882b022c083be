"""``opdkit eval``: generate a benchmark's images, score them, and write results (over 500 lines:
resolving the model, the settings that decide reuse, the resumable loop and the checks of a
plug-in's output are one pipeline, read top to bottom).

Files under ``<out>/<model name>/``::

    <bench>.jsonl        one record per image: prompt index, sample index, seed, prompt, tag, scores
    <bench>/NNNNN_S.png  every generated image (prompt NNNNN, sample S)
    <bench>.json         the summary: model, bench, protocol, engine, n, seed, metrics, stderr
                         (of overall, over prompts: stderr_unit "prompt") ...
    <bench>.grid.png     a captioned grid of the first images with their scores
    <bench>.settings.json  the generation settings; a resumed eval must match them

Resumable: images already recorded in ``<bench>.jsonl`` are neither regenerated nor rescored.
Each image's initial noise comes from its own seed (derived from ``--seed``, the prompt index and
the sample index), so results do not depend on batch size or on where a run was interrupted.

Generated once per model folder: an image whose prompt and seed another benchmark of the folder
already generated with the same sampler settings and weights is read from that benchmark's PNG
and scored, not generated again. The preference benchmarks all default to DrawBench 200 x 5 at
the same settings, and shapes-quality's prompts begin with shapes-geneval's, so most of their
images are shared. Every scorer reads the 8-bit levels of the PNG, so a read image scores what
the generated one would.

One eval at a time per folder: ``<out>/<model name>/.lock`` is held (``flock``) while an eval
runs, and a second eval of that folder refuses at once instead of writing duplicate rows. The
lock dies with its process, so a killed eval never leaves the folder locked.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError, first_line
from opdkit.eval.uncertainty import PROMPT_UNIT, prompt_means, stderr_over_prompts, tag_averaged
from opdkit.options import check_count, check_float, check_folder_name, plain_name_problem
from opdkit.registry import benchmarks, models
from opdkit.rundir import (
    append_jsonl,
    atomic_write_json,
    check_out_folder,
    folder_lock,
    naming_path,
    read_jsonl,
    refuse_a_run_in_training,
    remove_leftover_tmp,
)

if TYPE_CHECKING:
    import torch

    from opdkit.eval.benchmark import Benchmark
    from opdkit.models.flow_model import FlowModel


def image_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one image's initial noise: stable across batch sizes and resumes."""
    return (base_seed * 1_000_003 + prompt_index * 1_009 + sample_index) % (2**63 - 1)


def resolve_model(spec: str, step: int | None = None) -> tuple[FlowModel, str]:
    """A model from a registered name (``shapes-base``), a pipeline or run directory, or a committed run.

    ``step`` picks a GRPO/OPD run's checkpoint of that step instead of its final weights (results
    are then filed under ``<run>-step<N>``, apart from the final model's).
    Returns the model and the name results are filed under.
    """
    from opdkit.checkpoint import COMMITTED_DIR, resolve_weights_path

    # a user path, else a run committed with the package such as shapes-teachers/ocr
    path = Path(spec).expanduser() if spec in models.names() else resolve_weights_path(spec)
    if step is not None:
        if not (path.is_dir() and (path / "recipe.yaml").is_file() and (path / "checkpoints").is_dir()):
            raise OpdkitError(f"--checkpoint {step}: --model {spec} is not a GRPO/OPD run directory with checkpoints/")
        from opdkit.runs import load_run_checkpoint

        return load_run_checkpoint(path, step), f"{path.resolve().name}-step{step}"
    problem = model_spec_problem(spec)
    if problem is not None:
        raise OpdkitError(f"--model {spec}: {problem}")
    if not path.is_dir():
        return models.build(spec), spec
    if (path / "model" / "model_index.json").is_file():  # a pretrain run directory
        # scoring weights a training is about to replace would file results the next eval refuses
        refuse_a_run_in_training(path, f"--model {spec}", "evaluate it when that training ends")
        path = path / "model"
    # names come from the resolved folder: `--model .` or `--model ..` is filed under the
    # folder's own name, never under "." or ".." (which would leave --out)
    full = path.resolve()
    if (path / "model_index.json").is_file():
        from opdkit.models.loading import load_flow_model, pipeline_sources

        name = full.parent.name if full.name == "model" else full.name
        loaded = load_flow_model(path)
        loaded.sources = pipeline_sources(path)
        return loaded, name
    from opdkit.runs import load_run_model  # a GRPO/OPD run directory: base + final weights

    refuse_a_run_in_training(path, f"--model {spec}", "evaluate it when that training ends")
    # a committed run is filed under its whole name: shapes-teachers/ocr -> shapes-teachers-ocr
    name = spec.strip("/").replace("/", "-") if path.is_relative_to(COMMITTED_DIR) else full.name
    return load_run_model(path), name


def model_spec_problem(spec: str) -> str | None:
    """Why ``--model SPEC`` cannot be evaluated, from names and files alone (no weights are read),
    or None where it resolves: a registered name, a pipeline folder, a pretrain run's folder, a
    GRPO/OPD run with final weights, or a committed run (``shapes-teachers/ocr``). A study checks
    its model rows with it when it loads, before any row is trained."""
    import difflib

    from opdkit.checkpoint import COMMITTED_DIR, resolve_weights_path
    from opdkit.runs import is_run_dir

    registered = spec in models.names()
    path = Path(spec).expanduser() if registered else resolve_weights_path(spec)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "model" / "model_index.json").is_file():
            return None
        if (path / "recipe.yaml").is_file():
            return None if is_run_dir(path) else f"the run in {str(path)!r} has no final weights yet (final/final.json)"
        return f"{str(path)!r} is not a pipeline or run directory (no model_index.json, no recipe.yaml)"
    if registered:
        return None
    committed = [
        d.relative_to(COMMITTED_DIR).as_posix()
        for d in sorted(COMMITTED_DIR.glob("*/**/"))
        if (d / "model_index.json").is_file() or is_run_dir(d)
    ]
    close = difflib.get_close_matches(spec, committed, n=3, cutoff=0.8)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    if "/" in spec or spec.startswith("."):
        return f"no such directory{hint}"
    return f"{models.unknown_message(spec)}; or give a pipeline/run directory"


def check_world(bench: Benchmark, model_world: str, model_name: str) -> None:
    """Refuse a model of the wrong world with one line pointing at the right benchmark."""
    if bench.world == model_world:
        return
    twin = f"shapes-{bench.name}" if model_world == "shapes" else bench.name.removeprefix("shapes-")
    hint = f"; use --bench {twin}" if twin in benchmarks.names() else ""
    raise OpdkitError(
        f"benchmark {bench.name!r} scores {bench.world}-world models, but {model_name!r} is a "
        f"{model_world}-world model{hint}"
    )


def generate(
    model: FlowModel,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    cfg: float,
    resolution: int,
    shift: float | None = None,
) -> torch.Tensor:
    """ODE-sample one image per (prompt, seed): (B, 3, H, W) float in [0, 1]."""
    import torch

    from opdkit.sampling import sample_ode

    shape = model.latent_shape(resolution)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        x0 = sample_ode(model, prompts, steps=steps, cfg=cfg, shift=shift, noise=noise.to(model.device, model.dtype))
        return model.decode(x0).float().clamp(0, 1).cpu()


def run_eval(bench: str, model: str, out_dir: str | Path = "results", **options: Any) -> dict[str, Any]:
    """Run one benchmark on one model; returns the summary written to ``<bench>.json``.

    ``options`` are :func:`run_evals`' (``samples``, ``limit``, ``seed``, ``steps``, ``cfg``,
    ``batch_size``, ``name``, ``bench_params``, ``step``: a run's checkpoint, see
    :func:`resolve_model`). Raises :class:`OpdkitError` for an option out of range, a results name
    that would leave ``out_dir``, or a results folder another eval is writing, before anything is
    written.
    """
    return run_evals([bench], model, out_dir, **options)[0]


def run_evals(
    benches: list[str],
    model: str,
    out_dir: str | Path = "results",
    samples: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    batch_size: int = 32,
    name: str | None = None,
    bench_params: dict[str, Any] | None = None,
    step: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_model: Callable[[FlowModel], Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_eval` of several benchmarks, in order, on one model loaded once; the summaries.

    Every name is checked before the model is loaded, so a typo in the last one costs nothing.
    Each benchmark is built when its turn comes (a preference benchmark's scorer is a model too).
    ``bench_params`` go to every benchmark. ``on_result`` gets each summary as soon as its
    benchmark is written, so a caller can report it while the next one runs. ``on_model`` gets the
    model once it is loaded (a study remembers its fingerprint instead of loading it again).
    """
    check_eval_options(samples=samples, limit=limit, steps=steps, cfg=cfg, batch_size=batch_size, name=name,
                       checkpoint=step)  # fmt: skip
    if not benches:
        raise OpdkitError("no benchmark given (--bench NAME, repeatable)")
    for bench in benches:  # an unknown name or a parameter it lacks is one line before the model loads
        benchmarks.check_params(bench, bench_params or {})
    check_out_folder(out_dir)
    flow_model, default_name = resolve_model(model, step)
    if on_model is not None:
        on_model(flow_model)
    if name is None:
        try:
            check_folder_name("--name", default_name)
        except OpdkitError:
            raise OpdkitError(
                f"--model {model}: cannot file results under {default_name!r} (not one folder name); pass --name"
            ) from None
    model_name = name or default_name
    for bench in benches:
        twin = f"shapes-{bench}"
        if flow_model.world == "shapes" and not bench.startswith("shapes-") and twin in benchmarks.names():
            # say the model is of the wrong world before the benchmark asks for its prompt files
            raise OpdkitError(
                f"benchmark {bench!r} scores sd3-world models, but {model_name!r} is a shapes-world "
                f"model; use --bench {twin}"
            )
    root = Path(out_dir) / model_name
    source = model if step is None else f"{model} --checkpoint {step}"
    summaries = []
    for bench in benches:
        benchmark = check_benchmark(bench, benchmarks.build(bench, bench_params or {}))
        check_world(benchmark, flow_model.world, model_name)
        subset = recorded_limit(limit, len(benchmark.prompts))
        records = benchmark.prompts[:subset] if subset is not None else benchmark.prompts
        settings = eval_settings(benchmark, flow_model, samples=samples, seed=seed, steps=steps, cfg=cfg)
        root.mkdir(parents=True, exist_ok=True)
        with results_lock(root), naming_path(root):
            summaries.append(_run_locked(root, benchmark, flow_model, source, model_name, records, settings, subset,
                                         seed, batch_size))  # fmt: skip
        if on_result is not None:
            on_result(summaries[-1])
    return summaries


def check_benchmark(spec: str, built: Any) -> Benchmark:
    """What a benchmark builder returned, refused in one line unless it is a :class:`Benchmark`."""
    from opdkit.eval.benchmark import Benchmark

    if not isinstance(built, Benchmark):
        raise OpdkitError(f"benchmark {spec!r}: its builder returned {type(built).__name__}, not a Benchmark (opdkit.eval.benchmark)")
    # the name is a file name in the results folder: '../x' would write beside it, or anywhere
    problem = plain_name_problem(built.name) if isinstance(built.name, str) else "it is not a string"
    if problem is not None:
        raise OpdkitError(
            f"benchmark {spec!r}: its name {built.name!r} is not one plain file name ({problem}); "
            "results go to --out/MODEL/NAME.json"
        )
    return built


def eval_settings(benchmark: Benchmark, model: Any, *, samples: int | None = None, seed: int = 0,
                  steps: int | None = None, cfg: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The generation settings of an eval (``<bench>.settings.json``); a resumed eval must match them.

    ``model`` is what is evaluated, or anything with its ``base_fingerprint()``,
    ``weights_fingerprint()`` and ``embedded_guidance`` (what :mod:`opdkit.study` keeps instead of
    a loaded model); None options take the benchmark's defaults, CFG through :func:`benchmark_cfg`.
    """
    sampler = dict(benchmark.sampler)
    return {
        "bench": benchmark.name,
        "seed": seed,
        "samples_per_prompt": samples or benchmark.samples_per_prompt,
        "steps": steps or sampler.get("steps", 40),
        "cfg": cfg if cfg is not None else benchmark_cfg(model, sampler),
        "resolution": sampler.get("resolution", 512),
        "shift": sampler.get("shift"),
        "protocol": benchmark.protocol,
        # a protocol names its prompt set and scorer, not the file or weights a parameter pointed
        # at: rows scored by another scorer, or of other prompts at the same indices, are not
        # these results
        "engine": benchmark.engine,
        "prompts_sha256": prompts_sha256(benchmark.prompts),
        # results are kept per model *name*: retrained weights under the same name must not
        # resume from, or be mixed with, the images of the old weights. "weights" (rounded to
        # bf16) cannot tell a short LoRA run from its base; "weights_exact" can.
        "weights": model.base_fingerprint(),
        "weights_exact": model.weights_fingerprint(),
    }


# Settings keys recorded since results folders were first written: a settings file without one
# predates it and is judged on the others, as it was when it was written.
RECORDED_SINCE: tuple[str, ...] = ("weights_exact", "engine", "prompts_sha256")


def prompts_sha256(records: list[dict[str, Any]]) -> str:
    """SHA-256 of a benchmark's whole prompt list (every record, in order).

    The whole list, not the ``--limit`` prefix evaluated: a larger ``--limit`` resumes the same
    list, while another file of prompts (even one sharing a prefix) starts its own results.
    """
    import hashlib

    text = json.dumps(records, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def changed_settings(previous: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The keys of ``settings`` (what an eval would record now) that ``previous`` (a results
    folder's ``BENCH.settings.json``) records otherwise, sorted; a key of :data:`RECORDED_SINCE`
    that ``previous`` lacks is not counted."""
    keys = set(settings) | set(previous)
    return sorted(k for k in keys if previous.get(k) != settings.get(k) and not (k in RECORDED_SINCE and k not in previous))


def remove_results(root: Path, bench: str) -> None:
    """Delete one benchmark's results of one model folder (summary, rows, settings, grid, images)."""
    import shutil

    for name in (f"{bench}.json", f"{bench}.jsonl", f"{bench}.settings.json", f"{bench}.grid.png"):
        (root / name).unlink(missing_ok=True)
    if (root / bench).is_dir():
        shutil.rmtree(root / bench)


def _run_locked(root: Path, benchmark: Benchmark, flow_model: FlowModel, model: str, model_name: str,
                records: list[dict[str, Any]], settings: dict[str, Any], limit: int | None, seed: int,
                batch_size: int) -> dict[str, Any]:  # fmt: skip
    """The part of :func:`run_eval` that reads and writes ``root`` (with its lock held)."""
    import torch

    remove_leftover_tmp(root)
    n_samples = settings["samples_per_prompt"]
    image_dir = root / benchmark.name
    records_path = root / f"{benchmark.name}.jsonl"
    settings_path = root / f"{benchmark.name}.settings.json"
    if settings_path.is_file():
        previous = _read_json(settings_path, "settings")
        if not isinstance(previous, dict):
            raise OpdkitError(f"{settings_path}: unreadable settings file (not a JSON object); delete it, or pass another --out")
        changed = changed_settings(previous, settings)
        if changed:
            raise OpdkitError(
                f"{settings_path}: earlier results used other settings ({', '.join(changed)}); "
                "delete that directory or pass another --out"
            )
    atomic_write_json(settings_path, settings)

    done = set(_rows_by_image(records_path))
    todo = [(i, s) for i in range(len(records)) for s in range(n_samples) if (i, s) not in done]
    shared = _images_of_other_benchmarks(root, benchmark.name, settings)
    reused: list[tuple[int, int]] = []
    fresh: list[tuple[int, int]] = []
    for i, s in todo:
        (reused if (records[i]["prompt"], image_seed(seed, i, s)) in shared else fresh).append((i, s))
    # read images and generated ones never share a batch; each image's noise has its own seed, so
    # the generated ones do not depend on which others fill their batch
    batches = [(True, reused[k : k + batch_size]) for k in range(0, len(reused), batch_size)]
    batches += [(False, fresh[k : k + batch_size]) for k in range(0, len(fresh), batch_size)]

    from PIL import Image

    from opdkit.progress import progress_bar
    from opdkit.scoring.scorer import to_uint8

    total = len(records) * n_samples
    label = f"eval {benchmark.name} / {model_name}"
    if reused:
        label += f" ({len(reused)} images read from other benchmarks)"
    completed = total - len(todo)
    t0 = time.perf_counter()
    with progress_bar(label, total=total, completed=completed) as bar:
        for read, chunk in batches:
            chunk_records = [records[i] for i, _ in chunk]
            seeds = [image_seed(seed, i, s) for i, s in chunk]
            if read:
                images = torch.stack([_read_png(shared[(r["prompt"], n)]) for r, n in zip(chunk_records, seeds, strict=True)])
            else:
                images = generate(
                    flow_model,
                    [r["prompt"] for r in chunk_records],
                    seeds,
                    steps=settings["steps"],
                    cfg=settings["cfg"],
                    resolution=settings["resolution"],
                    shift=settings["shift"],
                )
            scores = _score_batch(benchmark, images, chunk_records)
            pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
            image_dir.mkdir(parents=True, exist_ok=True)
            for j, ((i, s), record) in enumerate(zip(chunk, chunk_records, strict=True)):
                file = image_dir / f"{i:05d}_{s}.png"
                Image.fromarray(pixels[j]).save(file)
                row = {
                    "prompt_index": i,
                    "sample_index": s,
                    "seed": seeds[j],
                    "image": str(file.relative_to(root)),
                    **{k: v for k, v in record.items()},
                    **{k: v[j] for k, v in scores.items()},
                }
                append_jsonl(records_path, row)
            completed += len(chunk)
            bar.update(completed)
    seconds = time.perf_counter() - t0

    rows = summarized_rows(records_path, len(records), n_samples)
    metrics = _summarize(benchmark, rows, records_path)
    # over prompts, not images: a prompt's samples are correlated, and a GenEval overall weighs
    # tags, not images (the error opdkit compare pairs; opdkit.eval.uncertainty)
    stderr = stderr_over_prompts(prompt_means(rows), tag_averaged(benchmark.family))
    summary = {
        "model": model_name,
        "model_source": model,
        "bench": benchmark.name,
        "family": benchmark.family,
        "protocol": benchmark.protocol,
        "engine": benchmark.engine,
        "world": benchmark.world,
        "n_prompts": len(records),
        "n_images": len(rows),
        "limit": limit,
        "seed": seed,
        "sampler": {k: settings[k] for k in ("steps", "cfg", "resolution", "shift")},
        "metrics": metrics,
        "higher_is_better": benchmark.higher_is_better,
        "stderr": stderr,
        # summaries without it (written before) hold a stderr over images; readers tell them apart
        "stderr_unit": PROMPT_UNIT,
        "generation_seconds_this_run": round(seconds, 2),
        "images_read_this_run": len(reused),
    }
    atomic_write_json(root / f"{benchmark.name}.json", summary)
    _write_grid(root, benchmark.name, rows)
    return summary


def _score_batch(benchmark: Benchmark, images: torch.Tensor, records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``benchmark.score`` of one batch as ``{name: one float per image}``, checked before any row
    of the batch is written, so a plug-in's failure leaves the rows of earlier batches whole."""
    import numpy as np
    import torch

    from opdkit.scoring.scorer import call_scorer

    what = f"benchmark {benchmark.name!r}"
    out = call_scorer(benchmark.score, what, images, [r["prompt"] for r in records], records)
    columns: dict[str, list[float]] = {}
    for key, value in out.items():
        try:
            # float64 holds every float32/bf16 value exactly: the rows keep what the scorer returned
            flat = value.detach().cpu().double() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
            values = [float(v) for v in flat.reshape(-1).tolist()]
        except (TypeError, ValueError, RuntimeError) as exc:
            raise OpdkitError(f"{what}: {key!r} is not numbers ({first_line(exc)})") from None
        if len(values) != len(records):
            raise OpdkitError(f"{what}: {key!r} has {len(values)} values for {len(records)} images")
        columns[str(key)] = values
    if not all(math.isfinite(v) for v in columns["score"]):
        raise OpdkitError(f"{what} returned a non-finite score")
    return columns


def _summarize(benchmark: Benchmark, rows: list[dict[str, Any]], records_path: Path) -> dict[str, Any]:
    """``benchmark.summarize(rows)``, refused in one line unless it gives numbers and a finite
    ``overall``: a summary is what the leaderboard and compare trust as finished."""
    import numbers

    what = f"benchmark {benchmark.name!r}"
    kept = f"its {len(rows)} scored rows are kept in {records_path}"
    try:
        metrics = benchmark.summarize(rows)
    except OpdkitError:
        raise
    except Exception as exc:  # the plug-in's own failure, named, in one line
        raise OpdkitError(f"{what}: summarize raised {first_line(exc)}; {kept}") from exc
    if not isinstance(metrics, dict):
        raise OpdkitError(f"{what}: summarize returned {type(metrics).__name__}, not a dict of metrics; {kept}")
    clean: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OpdkitError(f"{what}: summarize returned {key!r}: {value!r}, not a number; {kept}")
        clean[str(key)] = value if isinstance(value, (int, float)) else float(value)  # numpy scalars -> JSON
    overall = clean.get("overall")
    if overall is None or not math.isfinite(overall):
        raise OpdkitError(f"{what}: summarize returned no finite 'overall' (the headline metric): {overall!r}; {kept}")
    return clean


SAME_GENERATION = ("steps", "cfg", "resolution", "shift", "weights", "weights_exact")
"""The settings under which two benchmarks' images of one prompt and seed are the same image."""


def _images_of_other_benchmarks(root: Path, bench: str, settings: dict[str, Any]) -> dict[tuple[str, int], Path]:
    """``{(prompt, seed): PNG}`` of the images other benchmarks in ``root`` generated with ``settings``' sampler and weights.

    A benchmark whose settings or rows cannot be read is passed over: it only means its images are
    generated again.
    """
    found: dict[tuple[str, int], Path] = {}
    for settings_path in sorted(root.glob("*.settings.json")):
        other = settings_path.name.removesuffix(".settings.json")
        if other == bench:
            continue
        try:
            previous = json.loads(settings_path.read_text(encoding="utf-8"))
            if not isinstance(previous, dict) or any(previous.get(k) != settings[k] for k in SAME_GENERATION):
                continue
            rows = _rows_by_image(root / f"{other}.jsonl").values()
            for row in rows:
                file = root / str(row["image"])
                if file.is_file():
                    found.setdefault((str(row["prompt"]), int(row["seed"])), file)
        except (OSError, OpdkitError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            continue
    return found


def _read_png(path: Path) -> torch.Tensor:
    """A saved image as the runner generates it: (3, H, W) float in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def benchmark_cfg(model: Any, sampler: dict[str, Any]) -> float:
    """The benchmark's CFG (default 4.5), or 1 for a guidance-distilled model (FLUX.1-dev), whose
    guidance is an input of every forward: CFG on top would be a second, untrained guidance."""
    if getattr(model, "embedded_guidance", False):
        return 1.0
    return float(sampler.get("cfg", 4.5))


def recorded_limit(limit: int | None, n_prompts: int) -> int | None:
    """The ``--limit`` a summary records: None where it keeps every prompt, since that evaluates the
    whole set (no subset, no leaderboard dagger) and pairs with a full eval, whose images it shares."""
    return limit if limit is not None and limit < n_prompts else None


def check_eval_options(*, samples: int | None = None, limit: int | None = None, steps: int | None = None,
                       cfg: float | None = None, batch_size: int = 1, name: str | None = None,
                       checkpoint: int | None = None) -> None:  # fmt: skip
    """Refuse a value out of range with one line naming its option (None: the benchmark's default).

    Counts are >= 1 (``--samples 0`` is not "the default", ``--limit -1`` not "all but the
    last"), a checkpoint step >= 0, the guidance scale is finite and >= 0 (a NaN would make every
    rerun refuse its own settings), and ``--name`` is one folder name inside ``--out``.
    """
    for option, value in (("--samples", samples), ("--limit", limit), ("--steps", steps), ("--batch-size", batch_size)):
        check_count(option, value)
    check_count("--checkpoint", checkpoint, minimum=0)
    check_float("--cfg", cfg, minimum=0.0)
    if name is not None:
        check_folder_name("--name", name)


@contextmanager
def results_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` while an eval writes ``root``; refuse at once if another eval does."""
    with folder_lock(root, "another `opdkit eval` is writing to this results folder",
                     "wait for it to finish, or pass another --out or --name"):  # fmt: skip
        yield


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpdkitError(f"{path}: unreadable {what} file ({exc}); delete it, or pass another --out") from None


def _rows_by_image(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """``{(prompt index, sample index): row}`` of a results JSONL, the first row of each image."""
    import numbers

    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for n, row in enumerate(read_jsonl(path), start=1):
        try:
            key = (int(row["prompt_index"]), int(row["sample_index"]))
        except (TypeError, KeyError, ValueError):
            raise OpdkitError(f"{path}: record {n} is not a result row (no prompt_index/sample_index)") from None
        # every reader sums or prints the scores: a hand-edited row is named here, not a KeyError there
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise OpdkitError(f"{path}: record {n} has no numeric 'score' (got {score!r}); delete that line or evaluate again")
        rows.setdefault(key, row)
    return rows


def summarized_rows(path: Path, n_prompts: int | None, n_samples: int | None = None) -> list[dict[str, Any]]:
    """The rows of a results JSONL that its summary counts: one per image, of the first
    ``n_prompts`` prompts (the summary's ``n_prompts``; None: all) and ``n_samples`` samples.

    Rows of later prompts stay in the file after a smaller ``--limit`` reran, for a larger one to
    resume. Two writers at once (on a filesystem where flock is not shared between machines, say)
    leave duplicate rows; the first of an image is counted, once.
    """
    return [
        row
        for (i, s), row in _rows_by_image(path).items()
        if (n_prompts is None or i < n_prompts) and (n_samples is None or s < n_samples)
    ]


def _write_grid(root: Path, bench: str, rows: list[dict[str, Any]], count: int = 32) -> None:
    import numpy as np
    from PIL import Image

    from opdkit.grid import save_grid

    shown = sorted(rows, key=lambda r: (r["prompt_index"], r["sample_index"]))
    # one sample of as many different prompts as fit, so the grid shows the range of the set
    first = [r for r in shown if r["sample_index"] == 0][:count] or shown[:count]
    images = np.stack([np.asarray(Image.open(root / r["image"]).convert("RGB")) for r in first])
    captions = [f"{r['prompt']}\nscore {r['score']:.2f}" for r in first]
    save_grid(images, captions, root / f"{bench}.grid.png")
