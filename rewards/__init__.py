"""Reward plug-ins (installed as ``opdkit.rewards``).

A reward builder's keyword arguments are its YAML ``params``; it returns a scorer
(:data:`opdkit.scoring.scorer.Scorer`, the signature benchmarks share)
``(images (B, 3, H, W) float in [0, 1], prompts: list[str], metadata: list[dict]) -> dict[str, Tensor (B,)]``
whose ``"score"`` entry is the reward and whose other entries are logged sub-scores.
Submodules keep heavy imports inside their builders.
"""

from opdkit.rewards import geneval as geneval
from opdkit.rewards import ocr as ocr
from opdkit.rewards import preference as preference
from opdkit.rewards import shapes as shapes
