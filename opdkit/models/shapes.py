"""The shapes-world model: its architecture, tokenizer and builder, and its model plug-ins.

The shapes model is an ``SD3Transformer2DModel`` in pixel space with one tiny CLIP text encoder
and a word-level tokenizer over the world's closed vocabulary, saved in the diffusers pipeline
layout and loaded through the same loader as SD3.5-M
(:func:`opdkit.models.loading.load_flow_model`). :func:`build_shapes_pipeline` writes an
untrained one from a :class:`ShapesModelConfig` (pretraining fills in the weights); the plug-ins
``shapes``/``shapes-base`` load the committed pretrained base (or a pipeline at a path) and
``shapes_new`` builds a fresh one from its config.

This module is imported with the ``models`` registry, so torch, diffusers and transformers are
imported inside the functions that need them.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opdkit.errors import OpdkitError
from opdkit.registry import models

if TYPE_CHECKING:
    from opdkit.models.flow_model import FlowModel

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHAPES_BASE = "shapes-base"


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
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    pieces: list[str] = [SHAPES_PAD, SHAPES_UNK, SHAPES_BOS, SHAPES_EOS]
    pieces += list(SHAPES_GLYPHS) + list(_SHAPES_PUNCTUATION)
    for word in vocabulary:
        for part in re.findall(r"\w+|[^\w\s]+", word.lower()):
            pieces.append(part)
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token=SHAPES_UNK))
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
    import torch
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

    from opdkit.models.saving import save_pipeline, write_opdkit_config

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
    save_pipeline(pipe, out)
    write_opdkit_config(out, {"world": "shapes", "max_sequence_length": 0, "shapes_model": asdict(cfg)})
    return out


def shapes_vocabulary() -> list[str]:
    """Every word the shapes prompt generator can write outside quotes (sorted, lower-case)."""
    from opdkit.shapes.prompts import ALL_TAGS, TRAIN_TEMPLATES, enumerate_prompts

    words: set[str] = set()
    for template in TRAIN_TEMPLATES:
        words.update(w.lower() for w in re.findall(r"\w+", template))
    for tag in ALL_TAGS:
        for record in enumerate_prompts(tag):
            outside = re.sub(r'"[^"]*"', " ", record["prompt"])
            words.update(w.lower() for w in re.findall(r"\w+", outside))
    return sorted(words)


def checkpoint_path(name: str) -> Path:
    """Directory of a committed checkpoint (e.g. ``shapes-base``)."""
    return CHECKPOINTS_DIR / name


@models.register("shapes")
def shapes(path: str | None = None, dtype: str = "float32", device: str = "cpu") -> FlowModel:
    """The shapes-world model: the committed pretrained base, or a shapes pipeline at ``path``."""
    from opdkit.models.loading import load_flow_model, parse_dtype, pipeline_sources

    where = Path(path).expanduser() if path is not None else checkpoint_path(SHAPES_BASE)
    if not (where / "model_index.json").is_file():
        hint = " (run `opdkit train shapes/pretrain` to make it)" if path is None else ""
        raise OpdkitError(f"shapes model: no pipeline at {str(where)!r}{hint}")
    model = load_flow_model(where, dtype=parse_dtype(dtype), device=device, world="shapes")
    model.sources = pipeline_sources(where)
    return model


models.add(SHAPES_BASE, shapes)


@models.register("shapes_new")
def shapes_new(
    seed: int = 0,
    resolution: int = 32,
    patch_size: int = 2,
    num_layers: int = 4,
    num_heads: int = 4,
    head_dim: int = 32,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_projection_dim: int = 64,
    max_prompt_tokens: int = 24,
    shift: float = 3.0,
) -> FlowModel:
    """A fresh, untrained shapes-world model (for ``method: pretrain``), built from its config."""
    from opdkit.models.loading import load_flow_model

    config = ShapesModelConfig(
        resolution=resolution,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        text_hidden_size=text_hidden_size,
        text_layers=text_layers,
        text_heads=text_heads,
        text_projection_dim=text_projection_dim,
        max_prompt_tokens=max_prompt_tokens,
        shift=shift,
    )
    # Build, save and load back through the one loader, so a fresh model and a committed one
    # are the same kind of object.
    with tempfile.TemporaryDirectory(prefix="opdkit-shapes-") as tmp:
        build_shapes_pipeline(tmp, shapes_vocabulary(), config, seed=seed)
        return load_flow_model(tmp, world="shapes")
