"""The small torch modules the preference models add to transformers' classes.

* :func:`preference_head` — the MLP shared by the LAION Aesthetic predictor v2 and ImageReward:
  Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
  Linear(64, 16), Linear(16, 1). No activations between the linear layers (upstream comments them
  out), so in eval mode it is one affine map; the layout is kept anyway so the released state
  dicts load key for key (``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``).
* :class:`ImageRewardModel` — ImageReward-v1.0 on transformers' ``BlipVisionModel`` and
  ``BlipTextModel`` (BERT with a cross-attention block in every layer) plus the head and the fixed
  normalisation ``(r - mean) / std``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Hidden widths of the head after its input (upstream: 768-1024-128-64-16-1).
HEAD_WIDTHS = (1024, 128, 64, 16)


class PreferenceHead(nn.Module):
    """The Aesthetic/ImageReward MLP: ``(B, d)`` -> ``(B, 1)``; parameters under ``layers.N``."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        w1, w2, w3, w4 = HEAD_WIDTHS
        # Dropout slots keep the upstream indices 0, 2, 4, 6, 7 of the linear layers.
        self.layers = nn.Sequential(
            nn.Linear(in_dim, w1),
            nn.Dropout(0.2),
            nn.Linear(w1, w2),
            nn.Dropout(0.2),
            nn.Linear(w2, w3),
            nn.Dropout(0.1),
            nn.Linear(w3, w4),
            nn.Linear(w4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def preference_head(in_dim: int) -> PreferenceHead:
    """A fresh (randomly initialised) head for ``in_dim``-dimensional inputs."""
    return PreferenceHead(in_dim)


class ImageRewardModel(nn.Module):
    """ImageReward-v1.0: BLIP ViT + BERT with image cross-attention + MLP head, normalised.

    ``forward(pixel_values (B, 3, S, S), input_ids (B, L), attention_mask (B, L)) -> (B,)``:
    the text encoder reads the prompt with bidirectional self-attention and cross-attends to all
    image tokens; the hidden state at position 0 ([CLS]) goes through the head; the result is
    ``(head - mean) / std``.
    """

    def __init__(self, vision_config: Any, text_config: Any, mean: float, std: float) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        # is_decoder=True only makes transformers build the cross-attention blocks; forward runs
        # the encoder with bidirectional self-attention (is_decoder=False, the default).
        text_config.is_decoder = True
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = PreferenceHead(text_config.hidden_size)
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        raw = self.head(hidden[:, 0].float()).squeeze(-1)
        return (raw - self.mean) / self.std
