"""Optional backends: the upstream ``hpsv2`` and ``image-reward`` packages, used only when importable.

Neither package is a dependency of opdkit (on the core stack both are broken: hpsv2 1.2.0 pins
pytest/protobuf at run time, needs torchvision and misses its tokenizer file; image-reward 1.5
needs timm 0.6.13 and an undeclared ``clip`` package and fails on transformers 5). They exist as
cross-checks for environments that do have them: ``backend: package`` in a reward's or
benchmark's params. Each returns a scorer with the same signature and keys as the built-in one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.scoring.preference.images import to_pil
from opdkit.scoring.scorer import Scores


def _import(module: str, dist: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # a broken install fails in many ways; say which, in one line
        raise OpdkitError(
            f"backend 'package' needs the {dist!r} package ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "use backend 'opdkit' (the default) instead"
        ) from None


class Hpsv2PackageScorer:
    """``hpsv2.score`` per image: ``{"cosine": (B,)}``."""

    def __init__(self, checkpoint: Path, version: str) -> None:
        self.hpsv2 = _import("hpsv2", "hpsv2")
        self.checkpoint = str(checkpoint)
        self.version = version
        self.engine = f"hpsv2 package ({version})"

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]] | None = None) -> Scores:
        values = [
            float(self.hpsv2.score([image], prompt, cp=self.checkpoint, hps_version=self.version)[0])
            for image, prompt in zip(to_pil(images), prompts, strict=True)
        ]
        return {"cosine": torch.tensor(values, dtype=torch.float32)}


def hpsv2_package_scorer(checkpoint: Path, version: str = "v2.1") -> Hpsv2PackageScorer:
    """The ``hpsv2`` package's scorer on a local checkpoint file."""
    return Hpsv2PackageScorer(checkpoint, version)


class ImageRewardPackageScorer:
    """``ImageReward.load(...).score`` per image: ``{"imagereward": (B,)}``."""

    def __init__(self, checkpoint: Path, med_config: str | None, device: str) -> None:
        module = _import("ImageReward", "image-reward")
        if med_config is None:  # the package fetches its med_config.json from the hub itself
            self.model = module.load(str(checkpoint), device=device)
        else:  # build the package's model on a local med_config.json, load the weights as it does
            cls = _import("ImageReward.ImageReward", "image-reward").ImageReward
            self.model = cls(med_config=med_config, device=device).to(device)
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state, strict=False)  # upstream loads non-strictly too
            self.model.eval()
        self.engine = "image-reward package (ImageReward-v1.0)"

    def __call__(self, images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]] | None = None) -> Scores:
        values = []
        with torch.no_grad():
            for image, prompt in zip(to_pil(images), prompts, strict=True):
                out = self.model.score(prompt, [image])
                values.append(float(out[0] if isinstance(out, list) else out))
        return {"imagereward": torch.tensor(values, dtype=torch.float32)}


def imagereward_package_scorer(checkpoint: Path, med_config: str | None, device: str) -> ImageRewardPackageScorer:
    """The ``image-reward`` package's model on a local ``ImageReward.pt``."""
    if checkpoint.is_dir():
        raise OpdkitError("imagereward: backend 'package' needs the original ImageReward.pt, not a converted directory")
    return ImageRewardPackageScorer(checkpoint, med_config, device)
