"""opdkit: post-training toolkit for text-to-image flow-matching models (Flow-GRPO, Flow-OPD).

Kept import-light on purpose: ``import opdkit`` and ``opdkit --help`` must not import torch.
"""

__version__ = "0.1.0"
