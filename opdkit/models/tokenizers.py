"""Tokenizers trained offline from a small corpus, for tiny random models that need no download.

:func:`clip_tokenizer_from_corpus` makes a CLIP tokenizer whose vocabulary covers a given corpus
(the tiny random CLIP the GenEval detectors build for smoke runs, the tiny SD3 test pipelines);
:func:`t5_tokenizer_from_corpus` a T5 one and :func:`qwen_tokenizer_from_corpus` a Qwen2 one (the
tiny FLUX / Qwen-Image test pipelines, the real-size measurements' small text encoders).
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


def t5_tokenizer_from_corpus(corpus: tuple[str, ...] | list[str]) -> Any:
    """Train a Unigram with T5's metaspace pre-tokenization and wrap it as T5TokenizerFast.

    T5 expects ``<pad>``=0, ``</s>``=1, ``<unk>``=2; the trainer puts special tokens first in the
    order given, which gives exactly that layout.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # lazy alias of T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    unigram.train_from_iterator(list(corpus), trainer)
    vocab = [(str(piece), float(score)) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def qwen_tokenizer_from_corpus(corpus: tuple[str, ...] | list[str]) -> Any:
    """A byte-level BPE with Qwen's chat special tokens, wrapped as a Qwen2Tokenizer (pads right).

    Trained on the corpus plus the Qwen-Image prompt template, so the template costs a few dozen
    tokens (Qwen's own tokenizer: 34 for the prefix).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from opdkit.models.qwen_image import PROMPT_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*corpus, PROMPT_TEMPLATE], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)  # type: ignore[arg-type]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer
