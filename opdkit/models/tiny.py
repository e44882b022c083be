"""Builders of tiny SD3-architecture pipelines, saved in the diffusers pipeline layout.

Two builders, both offline (tokenizers are built locally, weights are random):

* :func:`build_tiny_sd3_pipeline` — a miniature of SD3.5 (two CLIP encoders, optional T5,
  optional VAE, FlowMatchEuler scheduler with shift 3.0) for fast tests of the ``sd3`` path. It is
  a real ``StableDiffusion3Pipeline`` directory: diffusers loads it too.
* :func:`build_shapes_pipeline` — the untrained architecture of the shapes-world model: an
  ``SD3Transformer2DModel`` in pixel space (no VAE), one tiny CLIP text encoder and a word-level
  tokenizer over the world's closed vocabulary. Pretraining fills in the weights later.

Both write an ``opdkit.json`` beside ``model_index.json`` holding what the diffusers layout has
no slot for (the world name and the T5/zero-padding sequence length); :func:`load_flow_model`
reads it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Written beside model_index.json; read by opdkit.models.flow_model.load_flow_model.
OPDKIT_CONFIG = "opdkit.json"

# A small GenEval-flavoured corpus for the tiny SD3 tokenizers. Every letter and digit also
# appears as a word of its own so that both "x" and "x</w>" exist in the BPE vocabulary and no
# character of an ASCII prompt maps to the unknown token.
_TINY_CORPUS: tuple[str, ...] = (
    "a photo of a red cube",
    "a photo of a blue sphere and a green cone",
    "a photo of two dogs on the left of a cat",
    "a photo of three yellow birds below a purple car",
    "a photo of four white cups to the right of a black bowl",
    "a sign that says hello world",
    "an orange triangle above a pink circle",
    "a brown square next to a gray star",
    "spring collection 2024 written on a poster",
    " ".join("abcdefghijklmnopqrstuvwxyz"),
    " ".join("0123456789"),
    ". , ! ? ' \" - : ;",
)


def _clip_tokenizer_from_corpus(corpus: tuple[str, ...] | list[str], max_length: int) -> Any:
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


def _t5_tokenizer_from_corpus(corpus: tuple[str, ...] | list[str]) -> Any:
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


def _write_opdkit_config(out_dir: Path, **values: Any) -> None:
    (out_dir / OPDKIT_CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def build_tiny_sd3_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    with_t5: bool = True,
    with_vae: bool = True,
    max_sequence_length: int = 16,
) -> Path:
    """Build a tiny random SD3 pipeline and save it (diffusers layout) to ``out_dir``.

    Sizes (DESIGN §1): transformer 1 layer, 4 heads x 8, joint_attention_dim 64, patch 2,
    sample_size 32; two CLIP text encoders (hidden 32, projection 32, 2 layers, 16 tokens);
    T5 encoder d_model 64 (1 layer); AutoencoderKL with one block (VAE scale factor 1, 4 latent
    channels, SD3.5's scaling/shift factors so the latent transform is exercised);
    FlowMatchEulerDiscreteScheduler(shift=3.0). ``with_vae=False`` makes the transformer work in
    pixel space (3 channels). Resolution for sampling is 32 (latent 4x32x32 or pixels 3x32x32).

    Args:
        out_dir: target directory (created).
        seed: seeds the random weights of every component (global RNG state is left untouched).
        with_t5: include ``text_encoder_3``/``tokenizer_3``; without it the prompt embedding ends
            with ``max_sequence_length`` zero tokens, as in the diffusers pipeline.
        with_vae: include ``vae``; without it the model works on pixels.
        max_sequence_length: T5 token count (or zero-token count without T5), stored in
            ``opdkit.json``.

    Returns:
        The output directory as a :class:`Path`.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip_len = 16
    clip_tok = _clip_tokenizer_from_corpus(_TINY_CORPUS, clip_len)
    t5_tok = _t5_tokenizer_from_corpus(_TINY_CORPUS) if with_t5 else None
    channels = 4 if with_vae else 3

    # fork_rng: building must not perturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=channels,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=channels,
            pos_embed_max_size=16,
        )

        def clip_encoder() -> CLIPTextModelWithProjection:
            config = CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=32,
                intermediate_size=37,
                projection_dim=32,
                num_hidden_layers=2,  # >= 2 so the penultimate hidden state is a real layer
                num_attention_heads=4,
                max_position_embeddings=clip_len,
                hidden_act="gelu",
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
            return CLIPTextModelWithProjection(config).eval()

        text_encoder = clip_encoder()
        text_encoder_2 = clip_encoder()
        text_encoder_3 = None
        if t5_tok is not None:
            t5_config = T5Config(
                vocab_size=len(t5_tok),
                d_model=64,
                d_kv=16,
                d_ff=64,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                is_encoder_decoder=False,
                use_cache=False,
            )
            text_encoder_3 = T5EncoderModel(t5_config).eval()
        vae = None
        if with_vae:
            vae = AutoencoderKL(
                block_out_channels=(4,),
                latent_channels=4,
                norm_num_groups=1,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=1.5305,
                shift_factor=0.0609,
            )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )
    _save_pipeline(pipe, out)
    _write_opdkit_config(out, world="sd3", max_sequence_length=max_sequence_length)
    return out


# ----------------------------------------------------------------------------------------------
# shapes world


@dataclass
class ShapesModelConfig:
    """Architecture of the shapes-world model (pixel space, one tiny CLIP text encoder).

    Attributes:
        resolution: image side in pixels (the transformer's ``sample_size``).
        patch_size: transformer patch side; tokens = (resolution / patch_size)^2.
        num_layers: joint transformer blocks.
        num_heads: attention heads; width = num_heads * head_dim.
        head_dim: dimension per head.
        qk_norm: ``"rms_norm"`` as in SD3.5, or None.
        text_hidden_size: CLIP hidden width (also the transformer's joint_attention_dim).
        text_layers: CLIP layers (>= 2: SD3 reads the penultimate hidden state).
        text_heads: CLIP attention heads.
        text_projection_dim: CLIP ``text_embeds`` size (the transformer's pooled_projection_dim).
        max_prompt_tokens: CLIP sequence length including start/end tokens.
        shift: SD3 schedule shift stored in the scheduler config.
    """

    resolution: int = 32
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    qk_norm: str | None = "rms_norm"
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_projection_dim: int = 64
    max_prompt_tokens: int = 24
    shift: float = 3.0

    @property
    def width(self) -> int:
        """Transformer width (= caption projection dim, which SD3 requires to match)."""
        return self.num_heads * self.head_dim


# Shapes tokenizer special tokens. The end token must not get id 2: transformers' CLIP treats
# eos_token_id == 2 as a legacy checkpoint and pools at argmax(input_ids) instead of at the end
# token.
SHAPES_PAD, SHAPES_UNK, SHAPES_BOS, SHAPES_EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
# Every character a quoted OCR target may use, each a token of its own.
SHAPES_GLYPHS: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_SHAPES_PUNCTUATION: tuple[str, ...] = ('"', ",", ".", "'", "-", ":", "!", "?")
# A non-space, non-quote character followed by an odd number of quotes up to the end of the
# text, i.e. a character inside a "..." span. Matched characters become single tokens; this
# needs balanced quotes (with an unbalanced one, text before it is split into characters).
_INSIDE_QUOTES = r'[^"\s](?=[^"]*"(?:[^"]*"[^"]*")*[^"]*$)'


def build_shapes_tokenizer(vocabulary: list[str], max_length: int) -> Any:
    """Word-level tokenizer over a closed vocabulary; text inside quotes is split per character.

    Words outside quotes are looked up whole (so the vocabulary should hold the lower-case
    words the prompt generator uses); ``a sign that says "K7"`` tokenizes as
    ``a sign that says " K 7 "`` so the model can learn each glyph. Sequences are framed as
    ``<|startoftext|> ... <|endoftext|>`` and padded with ``<|pad|>`` by the caller.

    Args:
        vocabulary: words of the world (any case; stored lower-case, duplicates dropped).
        max_length: ``model_max_length`` (CLIP sequence length including start/end tokens).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces: list[str] = [SHAPES_PAD, SHAPES_UNK, SHAPES_BOS, SHAPES_EOS]
    pieces += list(SHAPES_GLYPHS) + list(_SHAPES_PUNCTUATION)
    for word in vocabulary:
        for part in re.findall(r"\w+|[^\w\s]+", word.lower()):
            pieces.append(part)
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SHAPES_UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_INSIDE_QUOTES), behavior="isolated"), pre_tokenizers.Whitespace()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SHAPES_BOS} $A {SHAPES_EOS}",
        special_tokens=[(SHAPES_BOS, vocab[SHAPES_BOS]), (SHAPES_EOS, vocab[SHAPES_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SHAPES_BOS,
        eos_token=SHAPES_EOS,
        pad_token=SHAPES_PAD,
        unk_token=SHAPES_UNK,
        model_max_length=max_length,
    )


def make_shapes_modules(
    vocabulary: list[str], config: ShapesModelConfig | None = None, seed: int = 0
) -> tuple[Any, Any, Any]:
    """The shapes model's random (transformer, text_encoder, tokenizer), in memory.

    ``transformer`` is an SD3Transformer2DModel with 3 in/out channels (pixel space),
    ``text_encoder`` a CLIPTextModelWithProjection, ``tokenizer`` from
    :func:`build_shapes_tokenizer`. Global RNG state is left untouched.
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = config or ShapesModelConfig()
    if cfg.resolution % cfg.patch_size:
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.text_layers < 2:
        raise ValueError("text_layers must be >= 2 (SD3 uses the penultimate CLIP hidden state)")
    tokenizer = build_shapes_tokenizer(vocabulary, cfg.max_prompt_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=cfg.resolution,
            patch_size=cfg.patch_size,
            in_channels=3,
            out_channels=3,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.text_hidden_size,
            caption_projection_dim=cfg.width,
            pooled_projection_dim=cfg.text_projection_dim,
            pos_embed_max_size=cfg.resolution // cfg.patch_size,
            qk_norm=cfg.qk_norm,
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden_size,
            intermediate_size=4 * cfg.text_hidden_size,
            projection_dim=cfg.text_projection_dim,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModelWithProjection(text_config).eval()
    return transformer, text_encoder, tokenizer


def build_shapes_pipeline(
    out_dir: str | Path,
    vocabulary: list[str],
    config: ShapesModelConfig | None = None,
    seed: int = 0,
) -> Path:
    """Build the (untrained) shapes-world model and save it in the SD3 pipeline layout.

    Components: ``transformer`` (SD3Transformer2DModel, 3 in/out channels, pixel space),
    ``text_encoder`` (CLIPTextModelWithProjection) + ``tokenizer`` (word level, see
    :func:`build_shapes_tokenizer`), ``scheduler`` (FlowMatchEuler with ``config.shift``); no
    VAE, no second CLIP, no T5, and zero padding tokens (``max_sequence_length`` 0) so the
    prompt embedding is exactly the CLIP tokens. ``opdkit.json`` records ``world: shapes`` and
    the config.

    Returns:
        The output directory as a :class:`Path`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cfg = config or ShapesModelConfig()
    transformer, text_encoder, tokenizer = make_shapes_modules(vocabulary, cfg, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    _save_pipeline(pipe, out)
    _write_opdkit_config(out, world="shapes", max_sequence_length=0, shapes_model=asdict(cfg))
    return out


def _save_pipeline(pipe: Any, out: Path) -> None:
    """``save_pretrained`` (safetensors) without diffusers' "None cannot be saved" warnings."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(previous)
