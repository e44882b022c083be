"""The eval runner end to end on a fresh tiny shapes model: records, summary, grid, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opdkit.errors import OpdkitError
from opdkit.eval.runner import image_seed, run_eval
from opdkit.rundir import read_jsonl


@pytest.fixture(scope="module")
def tiny_shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary

    out = tmp_path_factory.mktemp("tiny-shapes")
    config = ShapesModelConfig(patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16)
    return build_shapes_pipeline(out, shapes_vocabulary(), config, seed=0)


def test_eval_writes_records_summary_and_grid(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    summary = run_eval("shapes-geneval", str(tiny_shapes_dir), out_dir=tmp_path, limit=3, samples=2, steps=2, batch_size=4)
    root = tmp_path / tiny_shapes_dir.name
    rows = read_jsonl(root / "shapes-geneval.jsonl")
    assert len(rows) == 6 and summary["n_images"] == 6
    assert {(r["prompt_index"], r["sample_index"]) for r in rows} == {(i, s) for i in range(3) for s in range(2)}
    assert all(r["seed"] == image_seed(0, r["prompt_index"], r["sample_index"]) for r in rows)
    assert all((root / r["image"]).is_file() for r in rows)
    saved = json.loads((root / "shapes-geneval.json").read_text())
    assert saved["metrics"] == summary["metrics"]
    assert 0.0 <= saved["metrics"]["overall"] <= 1.0
    for key in ("model", "bench", "protocol", "engine", "n_images", "seed", "higher_is_better", "stderr"):
        assert key in saved
    assert (root / "shapes-geneval.grid.png").stat().st_size > 0


def test_eval_resume_generates_only_missing_images(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path, limit=2, samples=1, steps=2, batch_size=8)
    root = tmp_path / tiny_shapes_dir.name
    first = read_jsonl(root / "shapes-ocr.jsonl")
    image = root / first[0]["image"]
    stamp = image.stat().st_mtime_ns
    summary = run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path, limit=4, samples=1, steps=2, batch_size=8)
    rows = read_jsonl(root / "shapes-ocr.jsonl")
    assert len(rows) == 4 and summary["n_images"] == 4
    assert rows[:2] == first  # earlier records kept as they were
    assert image.stat().st_mtime_ns == stamp  # and their images were not regenerated


def test_same_seed_same_images_regardless_of_batch(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    a = run_eval("shapes-quality", str(tiny_shapes_dir), out_dir=tmp_path / "a", limit=3, samples=1, steps=2, batch_size=1)
    b = run_eval("shapes-quality", str(tiny_shapes_dir), out_dir=tmp_path / "b", limit=3, samples=1, steps=2, batch_size=3)
    ra = read_jsonl(tmp_path / "a" / tiny_shapes_dir.name / "shapes-quality.jsonl")
    rb = read_jsonl(tmp_path / "b" / tiny_shapes_dir.name / "shapes-quality.jsonl")
    assert [r["score"] for r in ra] == pytest.approx([r["score"] for r in rb], abs=1e-6)
    assert a["metrics"]["overall"] == pytest.approx(b["metrics"]["overall"], abs=1e-6)


def test_an_image_another_benchmark_generated_is_read_not_generated(
    tiny_shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import opdkit.eval.runner as runner

    alone = run_eval("shapes-quality", str(tiny_shapes_dir), out_dir=tmp_path / "alone", limit=3, samples=2, steps=2)
    # shapes-quality's prompts begin with shapes-geneval's: its first two prompts' images are shared
    run_eval("shapes-geneval", str(tiny_shapes_dir), out_dir=tmp_path / "shared", limit=2, samples=2, steps=2)
    run_eval("shapes-geneval", str(tiny_shapes_dir), out_dir=tmp_path / "other", limit=2, samples=2, steps=3)
    generated: list[int] = []
    real_generate = runner.generate

    def counting_generate(model, prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
        generated.append(len(prompts))
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(runner, "generate", counting_generate)
    shared = run_eval("shapes-quality", str(tiny_shapes_dir), out_dir=tmp_path / "shared", limit=3, samples=2, steps=2)
    assert shared["images_read_this_run"] == 4 and sum(generated) == 2
    assert shared["metrics"] == alone["metrics"]
    name = tiny_shapes_dir.name
    rows = {(r["prompt_index"], r["sample_index"]): r for r in read_jsonl(tmp_path / "shared" / name / "shapes-quality.jsonl")}
    for r in read_jsonl(tmp_path / "alone" / name / "shapes-quality.jsonl"):
        assert rows[r["prompt_index"], r["sample_index"]] == r
        assert (tmp_path / "shared" / name / r["image"]).read_bytes() == (tmp_path / "alone" / name / r["image"]).read_bytes()
    # images of other sampler settings are not the same images
    generated.clear()
    other = run_eval("shapes-quality", str(tiny_shapes_dir), out_dir=tmp_path / "other", limit=3, samples=2, steps=2)
    assert other["images_read_this_run"] == 0 and sum(generated) == 6


def test_changed_settings_refuse_to_mix_results(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path, limit=1, samples=1, steps=2)
    with pytest.raises(OpdkitError, match="other settings \\(steps\\)"):
        run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path, limit=1, samples=1, steps=3)


def test_other_weights_under_the_same_name_refuse_to_mix_results(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary

    config = ShapesModelConfig(patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16)
    retrained = build_shapes_pipeline(tmp_path / "retrained", shapes_vocabulary(), config, seed=1)
    run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path / "results", limit=1, samples=1, steps=2, name="m")
    run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path / "results", limit=1, samples=1, steps=2, name="m")
    with pytest.raises(OpdkitError, match="other settings \\(weights, weights_exact\\)"):
        run_eval("shapes-ocr", str(retrained), out_dir=tmp_path / "results", limit=1, samples=1, steps=2, name="m")



def test_weights_within_a_bf16_step_of_the_old_ones_are_other_weights(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    """A run retrained under the same name whose weights moved by less than a bf16 step (a short
    LoRA run) is not its old results: ``weights`` (rounded) agrees, ``weights_exact`` does not."""
    import torch

    from opdkit.models.loading import load_flow_model

    model = load_flow_model(tiny_shapes_dir)
    with torch.no_grad():
        next(model.transformer.parameters()).view(-1)[0] *= 1 + 1e-5  # a bf16 step is 2**-8
    retrained = model.save_pretrained(tmp_path / "retrained")
    results = tmp_path / "results"
    run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=results, limit=1, samples=1, steps=2, name="m")
    with pytest.raises(OpdkitError, match="other settings \\(weights_exact\\)"):
        run_eval("shapes-ocr", str(retrained), out_dir=results, limit=1, samples=1, steps=2, name="m")


def test_results_written_before_weights_exact_are_resumed_as_before(tiny_shapes_dir: Path, tmp_path: Path) -> None:
    """A settings file without ``weights_exact`` (written before it was recorded) is judged on the
    rest, as it was then: its images are kept and the file gains the key."""
    run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path, limit=1, samples=1, steps=2)
    root = tmp_path / tiny_shapes_dir.name
    settings_path = root / "shapes-ocr.settings.json"
    settings = json.loads(settings_path.read_text())
    exact = settings.pop("weights_exact")
    settings_path.write_text(json.dumps(settings))
    first = read_jsonl(root / "shapes-ocr.jsonl")
    summary = run_eval("shapes-ocr", str(tiny_shapes_dir), out_dir=tmp_path, limit=2, samples=1, steps=2)
    assert summary["n_images"] == 2 and read_jsonl(root / "shapes-ocr.jsonl")[:1] == first
    assert json.loads(settings_path.read_text())["weights_exact"] == exact

def test_wrong_world_is_refused_with_one_line(tmp_path: Path) -> None:
    from tests.fixtures.tiny_sd3 import build_tiny_sd3_pipeline

    sd3_dir = build_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    with pytest.raises(OpdkitError, match="scores shapes-world models, but 'tiny-sd3' is a sd3-world model") as err:
        run_eval("shapes-geneval", str(sd3_dir), out_dir=tmp_path / "res", limit=1)
    assert "\n" not in str(err.value)


def test_unknown_model_and_bench_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(OpdkitError, match="unknown model 'shapes-bsae'; did you mean 'shapes-base'"):
        run_eval("shapes-geneval", "shapes-bsae", out_dir=tmp_path)
    with pytest.raises(OpdkitError, match="unknown benchmark 'shapes-genevel'; did you mean 'shapes-geneval'"):
        run_eval("shapes-genevel", "shapes-base", out_dir=tmp_path)


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    import torch

    from opdkit.rundir import atomic_write_text, save_safetensors_atomic

    atomic_write_text(tmp_path / "a.txt", "x")
    save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # safetensors recreates the file
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_real_benchmark_on_a_shapes_model_points_to_the_twin_before_asking_for_files(
    tiny_shapes_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(OpdkitError, match="use --bench shapes-geneval") as err:
        run_eval("geneval", str(tiny_shapes_dir), out_dir=tmp_path)  # no metadata path given
    assert "\n" not in str(err.value)


def test_several_benchmarks_in_one_command_load_the_model_once(
    tiny_shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import opdkit.eval.runner as runner
    from opdkit.cli import app

    options = dict(limit=2, samples=1, steps=2)
    one_by_one = [run_eval(b, str(tiny_shapes_dir), out_dir=tmp_path / "a", **options) for b in ("shapes-ocr", "shapes-quality")]
    loads: list[str] = []
    real_resolve = runner.resolve_model
    monkeypatch.setattr(runner, "resolve_model", lambda spec, step=None: loads.append(spec) or real_resolve(spec, step))
    # a typo in the last name, or a parameter one benchmark lacks, is one line before the model loads
    with pytest.raises(OpdkitError, match="unknown benchmark 'shapes-qualty'"):
        runner.run_evals(["shapes-ocr", "shapes-qualty"], str(tiny_shapes_dir), out_dir=tmp_path / "b", **options)
    with pytest.raises(OpdkitError, match="shapes-ocr"):
        runner.run_evals(["shapes-ocr"], str(tiny_shapes_dir), out_dir=tmp_path / "b", bench_params={"nope": 1}, **options)
    assert loads == [] and not (tmp_path / "b").exists()

    args = ["eval", "-b", "shapes-ocr", "-b", "shapes-quality", "-m", str(tiny_shapes_dir), "--limit", "2",
            "--samples", "1", "--steps", "2", "-o", str(tmp_path / "b")]  # fmt: skip
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert loads == [str(tiny_shapes_dir)]
    for summary in one_by_one:
        bench = summary["bench"]
        assert f"{bench}.json" in outcome.output.replace("\n", "")
        together = json.loads((tmp_path / "b" / tiny_shapes_dir.name / f"{bench}.json").read_text())
        assert together["metrics"] == summary["metrics"] and together["n_images"] == summary["n_images"] == 2

    # A caller hears of each benchmark when its file is written, before the next one starts.
    seen: list[tuple[str, bool, bool]] = []
    folder = tmp_path / "c" / tiny_shapes_dir.name
    runner.run_evals(["shapes-ocr", "shapes-quality"], str(tiny_shapes_dir), out_dir=tmp_path / "c", **options,
                     on_result=lambda s: seen.append((s["bench"], (folder / "shapes-ocr.json").is_file(),
                                                      (folder / "shapes-quality.json").is_file())))  # fmt: skip
    assert seen == [("shapes-ocr", True, False), ("shapes-quality", True, True)]


# A benchmark plug-in whose scorer and prompt list are parameters, as a preference benchmark's
# `model=` and `prompts=` are: what it records must change with them.
PLUGIN_BENCH = '''\
import math

import torch

from opdkit.eval.benchmark import Benchmark


def score(images, texts, records, mode="ok"):
    if mode == "raises":
        raise ValueError("scorer blew up")
    mean = images.mean(dim=(1, 2, 3))
    if mode == "wrong-count":
        return {"score": torch.zeros(len(images) + 1)}
    if mode == "no-score":
        return {"value": mean}
    return {"score": mean * math.nan if mode == "nan" else mean}


def summarize(rows, mode="ok"):
    if mode == "summarize-raises":
        return {"overall": rows[0]["nope"]}
    if mode == "no-overall":
        return {"mean": 0.5}
    return {"overall": math.nan if mode == "nan-overall" else sum(r["score"] for r in rows) / len(rows)}


def plug(engine: str = "scorer-a", prompts: str = "a red circle|a blue square", samples_per_prompt: int = 1,
         mode: str = "ok", name: str = "plug"):
    if mode == "not-a-benchmark":
        return {"name": "plug"}
    records = [{"prompt": p, "tag": "t"} for p in prompts.split("|")]
    return Benchmark(name=name, world="shapes", prompts=records, samples_per_prompt=samples_per_prompt,
                     score=lambda images, texts, recs: score(images, texts, recs, mode),
                     summarize=lambda rows: summarize(rows, mode),
                     sampler={"steps": 2, "resolution": 32}, protocol="plug/1", engine=engine)
'''


@pytest.fixture
def plugin_bench(tmp_path: Path) -> str:
    """``FILE:plug``, a plug-in benchmark of the shapes world (params ``engine``, ``prompts``)."""
    path = tmp_path / "plug_bench.py"
    path.write_text(PLUGIN_BENCH)
    return f"{path}:plug"


@pytest.mark.parametrize(("param", "changed"), [("engine", "scorer-b"), ("prompts", "a blue square|a red circle")])
def test_another_scorer_or_prompt_list_refuses_to_mix_results(
    tiny_shapes_dir: Path, tmp_path: Path, plugin_bench: str, param: str, changed: str
) -> None:
    out = tmp_path / "res"
    run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m")
    rows = (out / "m" / "plug.jsonl").read_text()
    key = {"engine": "engine", "prompts": "prompts_sha256"}[param]
    with pytest.raises(OpdkitError, match=f"earlier results used other settings \\({key}\\); delete that directory"):
        run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m", bench_params={param: changed})
    assert (out / "m" / "plug.jsonl").read_text() == rows  # the old rows are kept, not rescored or relabelled
    assert run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m")["n_images"] == 2


def test_a_larger_limit_resumes_the_same_prompt_list(tiny_shapes_dir: Path, tmp_path: Path, plugin_bench: str) -> None:
    """The prompt hash covers the whole list, not the evaluated prefix: a larger --limit resumes."""
    out = tmp_path / "res"
    run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m", limit=1)
    assert run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m")["n_images"] == 2


def test_results_written_before_engine_and_prompts_were_recorded_are_resumed_as_before(
    tiny_shapes_dir: Path, tmp_path: Path, plugin_bench: str
) -> None:
    out = tmp_path / "res"
    run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m", limit=1)
    settings_path = out / "m" / "plug.settings.json"
    settings = json.loads(settings_path.read_text())
    recorded = {key: settings.pop(key) for key in ("engine", "prompts_sha256")}
    settings_path.write_text(json.dumps(settings))
    assert run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m")["n_images"] == 2
    assert {key: json.loads(settings_path.read_text())[key] for key in recorded} == recorded


def test_a_limit_that_keeps_every_prompt_is_no_limit(tiny_shapes_dir: Path, tmp_path: Path, plugin_bench: str) -> None:
    """Two prompts: --limit 2 or 5 evaluates them all, so the result is no subset (it pairs with a
    full eval and the leaderboard marks it as whole)."""
    for limit in (2, 5):
        summary = run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=tmp_path / str(limit), name="m", limit=limit)
        assert summary["limit"] is None and summary["n_prompts"] == 2
    assert run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=tmp_path / "1", name="m", limit=1)["limit"] == 1


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("raises", "benchmark 'plug': scoring raised ValueError: scorer blew up"),
        ("wrong-count", "benchmark 'plug': 'score' has 2 values for 1 images"),
        ("no-score", "benchmark 'plug' must return a dict with a 'score' tensor"),
        ("nan", "benchmark 'plug' returned a non-finite score"),
        ("summarize-raises", "benchmark 'plug': summarize raised KeyError: 'nope'; its 2 scored rows are kept in "),
        ("no-overall", "benchmark 'plug': summarize returned no finite 'overall' (the headline metric): None"),
        ("nan-overall", "benchmark 'plug': summarize returned no finite 'overall' (the headline metric): nan"),
        ("not-a-benchmark", "its builder returned dict, not a Benchmark"),
    ],
)
def test_a_failing_benchmark_plugin_is_one_line_and_keeps_earlier_results(
    tiny_shapes_dir: Path, tmp_path: Path, plugin_bench: str, mode: str, message: str
) -> None:
    out = tmp_path / "res"
    run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m", limit=1)
    rows, summary = (out / "m" / "plug.jsonl").read_text(), (out / "m" / "plug.json").read_text()
    with pytest.raises(OpdkitError) as info:
        run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m", bench_params={"mode": mode})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert (out / "m" / "plug.jsonl").read_text().startswith(rows)  # no row lost, none written half
    assert len(read_jsonl(out / "m" / "plug.jsonl")) in (1, 2)
    assert (out / "m" / "plug.json").read_text() == summary  # no summary of a failed scoring


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "", ".hidden"])
def test_a_benchmark_name_that_is_not_a_plain_file_name_is_refused(
    tiny_shapes_dir: Path, tmp_path: Path, plugin_bench: str, name: str
) -> None:
    out = tmp_path / "deep" / "res"
    with pytest.raises(OpdkitError, match=f"its name {re.escape(repr(name))} is not one plain file name") as info:
        run_eval(plugin_bench, str(tiny_shapes_dir), out_dir=out, name="m", bench_params={"name": name})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "deep" / "escaped").exists() and not list(out.rglob("*.json*"))


# A benchmark plug-in whose scores are set by its prompt records: prompt i scores VALUES[i] on
# every sample ("fixed"), that plus its image's mean level, which differs from sample to sample
# ("pixels"), or 0 ("zero"); of family GenEval, its overall is the mean over tags of each tag's mean.
PROMPT_SCORE_BENCH = '''\
import statistics

import torch

from opdkit.eval.benchmark import Benchmark

TAGS = ["a", "a", "a", "b", "b"]
VALUES = [0.1, 0.9, 0.4, 0.7, 0.2]


def summarize(rows, family):
    if family != "GenEval":
        return {"overall": statistics.fmean(r["score"] for r in rows)}
    tags = {}
    for r in rows:
        tags.setdefault(r["tag"], []).append(r["score"])
    return {"overall": statistics.fmean(statistics.fmean(xs) for xs in tags.values())}


def score(images, records, mode):
    fixed = torch.tensor([r["value"] for r in records], dtype=torch.float64)
    if mode == "zero":
        return {"score": fixed * 0}
    return {"score": fixed + images.double().mean(dim=(1, 2, 3)) if mode == "pixels" else fixed}


def by_prompt(family: str = "Quality", mode: str = "fixed"):
    records = [{"prompt": f"prompt {i}", "tag": t, "value": v} for i, (t, v) in enumerate(zip(TAGS, VALUES))]
    return Benchmark(name="by-prompt", world="shapes", prompts=records, samples_per_prompt=4,
                     score=lambda images, texts, recs: score(images, recs, mode),
                     summarize=lambda rows: summarize(rows, family), sampler={"steps": 2, "resolution": 32},
                     protocol="by-prompt/1", engine="values", family=family)
'''
PROMPT_VALUES = {"a": [0.1, 0.9, 0.4], "b": [0.7, 0.2]}


@pytest.fixture
def by_prompt_bench(tmp_path: Path) -> str:
    """``FILE:by_prompt``: 5 prompts x 4 samples, scored by prompt (params ``family``, ``mode``)."""
    path = tmp_path / "by_prompt_bench.py"
    path.write_text(PROMPT_SCORE_BENCH)
    return f"{path}:by_prompt"


def test_the_summary_stderr_is_over_prompts_not_images(tiny_shapes_dir: Path, tmp_path: Path, by_prompt_bench: str) -> None:
    """A prompt's 4 images score alike: 20 images are 5 draws, not 20, and the error says so."""
    import statistics

    summary = run_eval(by_prompt_bench, str(tiny_shapes_dir), out_dir=tmp_path, name="m")
    prompts = PROMPT_VALUES["a"] + PROMPT_VALUES["b"]
    images = [x for x in prompts for _ in range(4)]
    assert summary["n_images"] == 20 and summary["stderr_unit"] == "prompt"
    assert summary["stderr"] == pytest.approx(statistics.stdev(prompts) / 5**0.5)
    assert summary["stderr"] > 1.5 * statistics.stdev(images) / 20**0.5  # what the summary held before
    assert json.loads((tmp_path / "m" / "by-prompt.json").read_text())["stderr"] == summary["stderr"]


def test_a_geneval_summary_stderr_is_by_tag_and_what_compare_pairs(
    tiny_shapes_dir: Path, tmp_path: Path, by_prompt_bench: str
) -> None:
    """A GenEval-family overall weighs tags, not prompts: its error is sqrt(sum_t var_t / n_t) / T
    over per-prompt means, the paired SE compare gives against a model scoring 0 on every image."""
    import math
    import statistics

    from opdkit.eval.compare import compare

    params = {"family": "GenEval", "mode": "pixels"}
    summary = run_eval(by_prompt_bench, str(tiny_shapes_dir), out_dir=tmp_path, name="m", bench_params=params)
    tags: dict[str, dict[int, list[float]]] = {}
    for r in read_jsonl(tmp_path / "m" / "by-prompt.jsonl"):
        tags.setdefault(r["tag"], {}).setdefault(r["prompt_index"], []).append(r["score"])
    means = {t: [statistics.fmean(xs) for xs in per_prompt.values()] for t, per_prompt in tags.items()}
    assert {t: len(xs) for t, xs in means.items()} == {"a": 3, "b": 2}
    by_tag = math.sqrt(sum(statistics.variance(xs) / len(xs) for xs in means.values())) / 2
    assert summary["stderr"] == pytest.approx(by_tag, rel=1e-12)
    # not the error over prompts ignoring tags (tags of 3 and 2 prompts weigh alike in overall)
    assert summary["stderr"] != pytest.approx(statistics.stdev(means["a"] + means["b"]) / 5**0.5)
    run_eval(by_prompt_bench, str(tiny_shapes_dir), out_dir=tmp_path, name="zero", bench_params={**params, "mode": "zero"})
    (d,) = compare(tmp_path, "m", "zero")
    assert d.diff == pytest.approx(summary["metrics"]["overall"]) and d.stderr == pytest.approx(summary["stderr"], rel=1e-12)
