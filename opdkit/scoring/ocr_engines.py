"""The ``ocr_engine`` plug-in kind: an image read into text; built-in ``rapidocr``.

An engine is made by a builder (registered with ``@ocr_engines.register(name)`` in
:mod:`opdkit.registry`, or named as ``module.path:function`` / ``./file.py:function``) and reads
one image::

    read(image (H, W, 3) uint8 RGB) -> str   # every recognised line, in reading order, joined with ""

(joined with ``""`` as flow_grpo does). :mod:`opdkit.scoring.ocr_scorer` applies flow_grpo's metric
(:mod:`opdkit.scoring.ocr`) to what an engine read; engines live apart from it so that one can be
swapped without touching the metric.

Built-in ``rapidocr`` (the default): ``rapidocr-onnxruntime``, whose wheel carries the PP-OCRv4
detection and recognition models as ONNX (no torch, runs offline). flow_grpo reads with
PaddleOCR's PP-OCR (``PaddleOCR(use_angle_cls=False, lang="en")``, ``ocr(img, cls=False)``), so
the defaults mirror that: no angle classifier, detector input limited to 960 px on the LONG side
(PaddleOCR's default; rapidocr's own default upsizes the SHORT side to 736 px, which is slower
and differs), and recognised lines below 0.5 confidence dropped (PaddleOCR's ``drop_score``).
One difference stays: rapidocr ships the Chinese+English PP-OCRv4 recogniser, flow_grpo uses the
English one. Install with ``pip install -e ".[ocr]"``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import numpy as np

from opdkit.errors import OpdkitError
from opdkit.registry import ocr_engines

__all__ = ["RAPIDOCR_MISSING", "OcrEngine", "build_rapidocr", "check_engine"]

OcrEngine = Callable[[np.ndarray], str]
"""``image (H, W, 3) uint8 RGB -> recognised text`` (lines joined with ``""``)."""

RAPIDOCR_MISSING = 'OCR engine "rapidocr" needs the ocr extra: pip install -e ".[ocr]" (rapidocr-onnxruntime)'


@ocr_engines.register("rapidocr")
def build_rapidocr(
    threads: int | None = None,
    use_cls: bool = False,
    det_limit_side_len: int = 960,
    det_limit_type: str = "max",
    text_score: float = 0.5,
) -> OcrEngine:
    """PP-OCRv4 through ``rapidocr-onnxruntime`` (offline: the models are inside its wheel).

    Args:
        threads: onnxruntime intra-op threads; default ``$OMP_NUM_THREADS`` if set, else all cores.
        use_cls: run the text-angle classifier (flow_grpo does not).
        det_limit_side_len, det_limit_type: detector input size rule (PaddleOCR's defaults:
            long side at most 960 px).
        text_score: drop recognised lines below this confidence (PaddleOCR's ``drop_score``).

    Raises:
        OpdkitError: ``rapidocr-onnxruntime`` is not installed (one line naming the extra).
    """
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        raise OpdkitError(RAPIDOCR_MISSING) from None
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else -1
    engine = RapidOCR(
        use_cls=use_cls,
        det_limit_side_len=det_limit_side_len,
        det_limit_type=det_limit_type,
        text_score=text_score,
        intra_op_num_threads=threads,
        inter_op_num_threads=1,
    )

    def read(image: np.ndarray) -> str:
        # rapidocr takes an ndarray as BGR (the cv2 convention)
        result, _ = engine(np.ascontiguousarray(np.asarray(image)[..., ::-1]))
        # rows are [box, text, confidence], top-to-bottom; flow_grpo keeps confidence > 0
        return "".join(str(row[1]) for row in (result or []) if float(row[2]) > 0)

    return read


def check_engine(name: str) -> None:
    """Fail early (before any image is generated) when a built-in engine's package is missing."""
    if name == "rapidocr" and importlib.util.find_spec("rapidocr_onnxruntime") is None:
        raise OpdkitError(RAPIDOCR_MISSING)
