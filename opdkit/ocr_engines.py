"""OCR engine plug-ins, and the scorer shared by the ``ocr`` benchmark and the ``ocr`` reward.

An engine is made by a builder with keyword parameters and reads one image into text:
``read(image (H, W, 3) uint8 RGB) -> str`` (every recognised line, in reading order, joined with
``""``, as flow_grpo does). :class:`OcrScorer` applies flow_grpo's metric
(:func:`opdkit.scoring.ocr.ocr_reward`) to what the engine read.

Built-in engine ``rapidocr`` (the default): ``rapidocr-onnxruntime``, whose wheel carries the
PP-OCRv4 detection and recognition models as ONNX (no torch, runs offline). flow_grpo reads with
PaddleOCR's PP-OCR (``PaddleOCR(use_angle_cls=False, lang="en")``, ``ocr(img, cls=False)``), so
the defaults mirror that: no angle classifier, detector input limited to 960 px on the LONG side
(PaddleOCR's default; rapidocr's own default upsizes the SHORT side to 736 px, which is slower
and differs), and recognised lines below 0.5 confidence dropped (PaddleOCR's ``drop_score``).
One difference stays: rapidocr ships the Chinese+English PP-OCRv4 recogniser, flow_grpo uses the
English one. Install with ``pip install -e ".[ocr]"``.

Other engines: any ``module.path:function`` builder returning such a ``read`` callable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from opdkit.errors import OpdkitError
from opdkit.scoring.ocr import ocr_reward, ocr_target

__all__ = ["ENGINES", "OcrEngine", "OcrScorer", "build_ocr_engine", "build_rapidocr"]

OcrEngine = Callable[[np.ndarray], str]
"""``image (H, W, 3) uint8 RGB -> recognised text`` (lines joined with ``""``)."""

RAPIDOCR_MISSING = 'OCR engine "rapidocr" needs the ocr extra: pip install -e ".[ocr]" (rapidocr-onnxruntime)'


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


ENGINES: dict[str, Callable[..., OcrEngine]] = {"rapidocr": build_rapidocr}
"""Built-in OCR engine builders by name."""


def build_ocr_engine(name: str = "rapidocr", **params: Any) -> OcrEngine:
    """An OCR engine by built-in name or ``module.path:function``."""
    if name in ENGINES:
        return ENGINES[name](**params)
    if ":" in name:
        from opdkit.registry import load_object

        return load_object(name, "OCR engine")(**params)
    raise OpdkitError(f"unknown OCR engine {name!r} (known: {', '.join(sorted(ENGINES))}, or module.path:function)")


def check_engine(name: str) -> None:
    """Fail early (before any image is generated) when a built-in engine's package is missing."""
    if name == "rapidocr":
        import importlib.util

        if importlib.util.find_spec("rapidocr_onnxruntime") is None:
            raise OpdkitError(RAPIDOCR_MISSING)


class OcrScorer:
    """flow_grpo's OCR metric on what an engine reads; the engine is built on first use.

    Args:
        engine: engine name (``rapidocr``) or ``module.path:function``.
        engine_params: keyword arguments of the engine builder.
    """

    def __init__(self, engine: str = "rapidocr", engine_params: Mapping[str, Any] | None = None) -> None:
        check_engine(engine)
        self.engine_name = engine
        self.engine_params = dict(engine_params or {})
        self._read: OcrEngine | None = None

    @property
    def engine(self) -> str:
        """Engine name for result files."""
        return "rapidocr (PP-OCRv4 onnx)" if self.engine_name == "rapidocr" else self.engine_name

    def read(self, image: np.ndarray) -> str:
        """The text the engine reads in one ``(H, W, 3)`` uint8 RGB image."""
        if self._read is None:
            self._read = build_ocr_engine(self.engine_name, **self.engine_params)
        return self._read(image)

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Score a batch: ``{"score": reward in [0, 1], "exact": 1.0 if the whole target was read}``.

        The target is ``record["text"]``, else the quoted text of ``record["prompt"]``.
        """
        if len(images) != len(records):
            raise ValueError(f"got {len(images)} images for {len(records)} records")
        out: list[dict[str, Any]] = []
        for image, record in zip(images, records, strict=True):
            target = str(record["text"]) if "text" in record else ocr_target(str(record["prompt"]))
            score = ocr_reward(self.read(image), target)
            out.append({"score": float(score), "exact": float(score == 1.0)})
        return out
