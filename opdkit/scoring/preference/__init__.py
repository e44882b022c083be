"""Preference and quality models: PickScore, CLIPScore, LAION Aesthetic, HPSv2.1, ImageReward.

Every model runs on transformers classes in the core environment (no ``open_clip``, ``timm``,
``torchvision``, ``hpsv2`` or ``image-reward`` needed):

* PickScore, CLIPScore, Aesthetic: ``CLIPModel`` loaded from a local directory or a hub id;
  Aesthetic adds the LAION predictor's MLP head, read from its released ``.pth`` once.
* HPSv2.1: the official open_clip ViT-H-14 checkpoint converted to ``CLIPModel`` weights.
* ImageReward: the official checkpoint converted to transformers' BLIP vision and text models
  plus its MLP head and fixed output normalisation.

Converted weights are written once as safetensors under ``$OPDKIT_CACHE/preference`` (default
``~/.cache/opdkit/preference``) and reused. Modules:

* :mod:`opdkit.scoring.preference.images` — image preprocessing (PIL path as in CLIPProcessor, tensor path as in HPSv2);
* :mod:`opdkit.scoring.preference.convert` — upstream key/shape lists and the three converters;
* :mod:`opdkit.scoring.preference.builders` — the scorers' builders, whose parameters the reward and
  benchmark plug-ins take (no torch at import);
* :mod:`opdkit.scoring.preference.scorers` — the scorers the reward and benchmark plug-ins wrap;
* :mod:`opdkit.scoring.preference.modules` — the heads and the ImageReward model on transformers' classes;
* :mod:`opdkit.scoring.preference.backends` — the optional ``hpsv2`` / ``image-reward`` package backends.

Weights (local, hub, conversion cache) are located by :mod:`opdkit.scoring.weights`, shared with
GenEval's models.

This ``__init__`` imports nothing heavy: the plug-in modules import the submodules inside their
builders.
"""

from __future__ import annotations

# Default weights (hub ids; a local path works everywhere a hub id does).
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
LAION_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor; HPSv2's tokenizer
OPENAI_VIT_L14 = "openai/clip-vit-large-patch14"  # CLIPScore and the Aesthetic predictor's backbone
HPS_CHECKPOINTS = {"v2.0": "xswu/HPSv2:HPS_v2_compressed.pt", "v2.1": "xswu/HPSv2:HPS_v2.1_compressed.pt"}
IMAGEREWARD_CHECKPOINT = "THUDM/ImageReward:ImageReward.pt"
BERT_BASE_UNCASED = "google-bert/bert-base-uncased"  # ImageReward's tokenizer (BLIP adds [DEC], [ENC])
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)

# Scales of the training rewards (the benchmarks report the raw values, see docs/preference.md).
PICKSCORE_REWARD_SCALE = 1.0 / 26.0  # flow_grpo: PickScore / 26 (~0.8-0.9 for SD3.5-M)
CLIPSCORE_SCALE = 1.0 / 100.0  # logits_per_image / 100 = cosine for CLIP's logit scale 100

# ImageReward-v1.0's fixed output normalisation (THUDM/ImageReward, ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
