"""OCR (flow_grpo): 1,018 prompts asking for quoted text in the image, scored by an OCR engine.

flow_grpo's metric (:mod:`opdkit.scoring.ocr`): the text inside the prompt's first pair of double
quotes is the target; spaces are removed and case folded on both sides; a target found inside
the recognised text scores 1, otherwise 1 - (edit distance capped at the target length) /
length. One image per prompt, as flow_grpo's evaluation. The engine is an ``ocr_engine`` plug-in
(:mod:`opdkit.scoring.ocr_engines`); the default, rapidocr, runs PP-OCRv4 offline. The scorer is
the ``ocr`` reward's.

The prompts are not shipped: pass ``--param prompts=PATH`` (flow_grpo's ``dataset/ocr/test.txt``)
or ``--param download=true`` (sha256-pinned, cached).
"""

from __future__ import annotations

from typing import Any

from opdkit.eval.benchmark import Benchmark
from opdkit.registry import benchmarks

PROTOCOL_VERSION = "1"


@benchmarks.register("ocr")
def ocr_bench(
    prompts: str | None = None,
    download: bool = False,
    samples_per_prompt: int = 1,
    engine: str = "rapidocr",
    engine_threads: int | None = None,
    resolution: int = 512,
    steps: int = 40,
    cfg: float = 4.5,
) -> Benchmark:
    """flow_grpo OCR test set (1,018 prompts), 1 - capped edit distance / length, rapidocr PP-OCRv4 engine.

    Args:
        prompts: path to flow_grpo's ``dataset/ocr/test.txt`` (else the cache, see ``download``).
        download: fetch the prompts into the cache (``$OPDKIT_CACHE``), verified by sha256.
        samples_per_prompt: images per prompt (1, as flow_grpo evaluates).
        engine: an ``ocr_engine`` plug-in: ``rapidocr`` (default), another registered one or
            ``module.path:function``.
        engine_threads: onnxruntime threads for rapidocr (default ``$OMP_NUM_THREADS`` or all).
        resolution, steps, cfg: sampler defaults (SD3.5-M: 512 px, 40 steps, CFG 4.5).
    """
    from opdkit.data.sources import load_ocr_prompts
    from opdkit.scoring.ocr_scorer import ocr_scorer

    records, located = load_ocr_prompts(prompts, download)
    scorer = ocr_scorer(engine, engine_threads)

    def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
        n = len(rows)
        return {
            "overall": sum(float(r["score"]) for r in rows) / n if n else float("nan"),
            "exact": sum(float(r.get("exact", 0.0)) for r in rows) / n if n else float("nan"),
        }

    prompt_set = "" if located.official else f"+prompts-sha256:{located.sha256[:12]}"
    return Benchmark(
        name="ocr",
        world="sd3",
        prompts=records,
        samples_per_prompt=samples_per_prompt,
        score=scorer,
        summarize=summarize_rows,
        sampler={"steps": steps, "cfg": cfg, "resolution": resolution, "shift": None},
        protocol=f"flow_grpo-ocr/{PROTOCOL_VERSION}{prompt_set}",
        engine=scorer.engine,
        family="OCR",
    )
