"""Tokenizers trained offline from a small corpus, for tiny random models that need no download.

:func:`clip_tokenizer_from_corpus` makes a CLIP tokenizer whose vocabulary covers a given corpus
(the tiny random CLIP the GenEval detectors build for smoke runs, the tiny SD3 test pipelines).
The shapes model's word-level tokenizer is part of the shapes model
(:func:`opdkit.models.shapes.build_shapes_tokenizer`).
"""

from __future__ import annotations

import json
from typing import Any


def clip_tokenizer_from_corpus(corpus: tuple[str, ...] | list[str], max_length: int) -> Any:
    """Train a byte-level-compatible BPE (``</w>`` word suffix) and wrap it as a CLIPTokenizer.

    CLIP's tokenizer maps bytes to printable unicode before BPE; for printable ASCII that map is
    the identity, so a BPE trained on plain lower-case ASCII words is a valid CLIP vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=eos))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[bos, eos],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # The tokenizers BPE model wants (left, right) tuples, whatever the annotation says.
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_length)  # type: ignore[arg-type]

