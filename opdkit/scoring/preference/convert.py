"""Converters from the upstream checkpoints to transformers weights (over 500 lines: each layout is listed key by key).

One module because the three converters share the key checks, the meta-device targets and the
conversion cache.

Each converter documents the exact upstream key/shape list it accepts (``*_key_shapes``), checks
the checkpoint against it, maps every key, and checks the result against the state dict of the
target module (built on the ``meta`` device, so no memory is spent). Any unexpected, missing or
mis-shaped key stops the conversion with one line listing the keys, e.g.
``HPSv2 checkpoint /x.pt: 2 unexpected keys: a, b; 1 missing key: c``.

1. HPSv2 / HPSv2.1 (``HPS_v2.1_compressed.pt``, ``{"state_dict": ...}``): open_clip ViT-H-14 ->
   ``CLIPModel``. open_clip layout (``W`` vision width, ``T`` text width, ``E`` embed dim, ``P``
   patch, ``G`` grid = image / P, ``M``/``N`` MLP widths, ``C`` context length, ``V`` vocab)::

       visual.conv1.weight (W, 3, P, P)          -> vision_model.embeddings.patch_embedding.weight
       visual.class_embedding (W,)                -> vision_model.embeddings.class_embedding
       visual.positional_embedding (G*G+1, W)     -> vision_model.embeddings.position_embedding.weight
       visual.ln_pre.{weight,bias} (W,)           -> vision_model.pre_layrnorm.*
       visual.transformer.resblocks.i.ln_1.* (W,) -> vision_model.encoder.layers.i.layer_norm1.*
       ....attn.in_proj_weight (3W, W)            -> ....self_attn.{q,k,v}_proj.weight (rows split in thirds, q k v)
       ....attn.in_proj_bias (3W,)                -> ....self_attn.{q,k,v}_proj.bias
       ....attn.out_proj.{weight (W, W), bias}    -> ....self_attn.out_proj.*
       ....ln_2.* (W,)                            -> ....layer_norm2.*
       ....mlp.c_fc.{weight (M, W), bias (M,)}    -> ....mlp.fc1.*
       ....mlp.c_proj.{weight (W, M), bias (W,)}  -> ....mlp.fc2.*
       visual.ln_post.{weight,bias} (W,)          -> vision_model.post_layernorm.*
       visual.proj (W, E)                         -> visual_projection.weight (E, W) = proj transposed
       token_embedding.weight (V, T)              -> text_model.embeddings.token_embedding.weight
       positional_embedding (C, T)                -> text_model.embeddings.position_embedding.weight
       transformer.resblocks.i.*                  -> text_model.encoder.layers.i.* (as above, widths T, N)
       ln_final.{weight,bias} (T,)                -> text_model.final_layer_norm.*
       text_projection (T, E)                     -> text_projection.weight (E, T) = transposed
       logit_scale ()                             -> logit_scale

   open_clip's ViT-H-14 uses exact GELU (transformers ``gelu``), LayerNorm eps 1e-5, pools the
   class token after ``ln_post`` and the text at the end-of-text token (the largest id), which is
   what ``CLIPModel`` does with ``eos_token_id`` set to that id.

2. ImageReward-v1.0 (``ImageReward.pt``, a bare state dict): BLIP ViT-L/16 + BERT-base with
   cross-attention + MLP -> :class:`opdkit.scoring.preference.modules.ImageRewardModel`::

       blip.visual_encoder.cls_token (1, 1, W)            -> vision.embeddings.class_embedding
       blip.visual_encoder.pos_embed (1, G*G+1, W)         -> vision.embeddings.position_embedding
       blip.visual_encoder.patch_embed.proj.{weight (W, 3, P, P), bias} -> vision.embeddings.patch_embedding.*
       blip.visual_encoder.blocks.i.norm1.*                -> vision.encoder.layers.i.layer_norm1.*
       ....attn.qkv.{weight (3W, W), bias}                 -> ....self_attn.qkv.* (same fused layout)
       ....attn.proj.*                                     -> ....self_attn.projection.*
       ....norm2.*, mlp.fc1.*, mlp.fc2.*                   -> ....layer_norm2.*, mlp.fc1.*, mlp.fc2.*
       blip.visual_encoder.norm.*                          -> vision.post_layernorm.*
       blip.text_encoder.embeddings.{word_embeddings, position_embeddings, LayerNorm}.* -> text.embeddings.*
       blip.text_encoder.encoder.layer.i.{attention, crossattention, intermediate, output}.* -> text.encoder.layer.i.*
           (crossattention.self.{key,value}.weight are (T, W): they read the image tokens)
       mlp.layers.{0,2,4,6,7}.{weight,bias}                -> head.layers.*

   Dropped on purpose (present in the file, unused by the score): ``blip.vision_proj.*``,
   ``blip.text_proj.*`` (BLIP's contrastive projections) and the buffer
   ``blip.text_encoder.embeddings.position_ids``.

3. LAION Aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``, a bare state dict):
   ``layers.{0,2,4,6,7}.{weight,bias}`` with shapes (1024, 768), (128, 1024), (64, 128), (16, 64),
   (1, 16) -> :class:`opdkit.scoring.preference.modules.PreferenceHead`, key for key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import OpdkitError
from opdkit.scoring.preference import IMAGEREWARD_MEAN, IMAGEREWARD_STD
from opdkit.scoring.preference.modules import HEAD_WIDTHS

Shapes = dict[str, tuple[int, ...]]
# At most this many keys are spelled out per kind of problem (the count is always exact).
MAX_LISTED = 30


# ----------------------------------------------------------------------------------------------
# checking


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s" if not word.endswith("h") else f"{n} {word}es"


def check_keys(
    state: dict[str, torch.Tensor],
    expected: Shapes,
    what: str,
    ignored: Iterable[str] = (),
) -> None:
    """Raise one :class:`OpdkitError` line listing unexpected, missing and mis-shaped keys.

    Args:
        state: the tensors found.
        expected: every required key and its shape.
        what: names the file in the message.
        ignored: keys that may be present and are dropped (never reported).
    """
    skip = set(ignored)
    unexpected = sorted(k for k in state if k not in expected and k not in skip)
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    )
    problems = []
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')}: {_listing(unexpected)}")
    if missing:
        problems.append(f"{_plural(len(missing), 'missing key')}: {_listing(missing)}")
    if wrong:
        problems.append(f"{_plural(len(wrong), 'shape mismatch')}: {_listing(wrong)}")
    if problems:
        raise OpdkitError(f"{what}: " + "; ".join(problems))


def target_shapes(module: torch.nn.Module) -> Shapes:
    """Persistent state-dict keys and shapes of a module (built on ``meta``: no memory)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# 1. HPSv2: open_clip ViT-H-14 -> CLIPModel


@dataclass(frozen=True)
class OpenClipArch:
    """Hyper-parameters of an open_clip ViT CLIP; the defaults are ViT-H-14 (HPSv2 / HPSv2.1).

    Heads are not recoverable from tensor shapes, so the architecture is stated, and every
    checkpoint tensor is checked against it.
    """

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16  # head width 80
    vision_mlp: int = 5120
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_mlp: int = 4096
    hidden_act: str = "gelu"  # exact GELU; "quick_gelu" for OpenAI's own checkpoints
    bos_token_id: int = 49406  # <|startoftext|>
    eos_token_id: int = 49407  # <|endoftext|>: open_clip pools the text here (argmax of the ids)

    def clip_config(self) -> Any:
        """The matching transformers ``CLIPConfig``."""
        from transformers import CLIPConfig

        common = {"hidden_act": self.hidden_act, "layer_norm_eps": 1e-5, "projection_dim": self.embed_dim}
        return CLIPConfig(
            text_config={
                "vocab_size": self.vocab_size,
                "hidden_size": self.text_width,
                "intermediate_size": self.text_mlp,
                "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_heads,
                "max_position_embeddings": self.context_length,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.eos_token_id,
                **common,
            },
            vision_config={
                "hidden_size": self.vision_width,
                "intermediate_size": self.vision_mlp,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                **common,
            },
            projection_dim=self.embed_dim,
        )


VIT_H_14 = OpenClipArch()


def _resblock_shapes(prefix: str, width: int, mlp: int) -> Shapes:
    return {
        f"{prefix}.ln_1.weight": (width,),
        f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.attn.in_proj_weight": (3 * width, width),
        f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width),
        f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,),
        f"{prefix}.ln_2.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (mlp, width),
        f"{prefix}.mlp.c_fc.bias": (mlp,),
        f"{prefix}.mlp.c_proj.weight": (width, mlp),
        f"{prefix}.mlp.c_proj.bias": (width,),
    }


def open_clip_key_shapes(arch: OpenClipArch = VIT_H_14) -> Shapes:
    """Every tensor of an open_clip ViT CLIP state dict (what ``model.state_dict()`` holds)."""
    w, t, e = arch.vision_width, arch.text_width, arch.embed_dim
    grid = arch.image_size // arch.patch_size
    shapes: Shapes = {
        "visual.conv1.weight": (w, 3, arch.patch_size, arch.patch_size),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,),
        "visual.ln_post.bias": (w,),
        "visual.proj": (w, e),
        "token_embedding.weight": (arch.vocab_size, t),
        "positional_embedding": (arch.context_length, t),
        "ln_final.weight": (t,),
        "ln_final.bias": (t,),
        "text_projection": (t, e),
        "logit_scale": (),
    }
    for i in range(arch.vision_layers):
        shapes.update(_resblock_shapes(f"visual.transformer.resblocks.{i}", w, arch.vision_mlp))
    for i in range(arch.text_layers):
        shapes.update(_resblock_shapes(f"transformer.resblocks.{i}", t, arch.text_mlp))
    return shapes


def _map_resblock(src: dict[str, torch.Tensor], upstream: str, ours: str, out: dict[str, torch.Tensor]) -> None:
    # nn.MultiheadAttention stacks the q, k and v projections row-wise in that order.
    q, k, v = src[f"{upstream}.attn.in_proj_weight"].chunk(3, dim=0)
    qb, kb, vb = src[f"{upstream}.attn.in_proj_bias"].chunk(3, dim=0)
    for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
        out[f"{ours}.self_attn.{name}.weight"] = weight
        out[f"{ours}.self_attn.{name}.bias"] = bias
    pairs = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for up, we in pairs.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{we}.{p}"] = src[f"{upstream}.{up}.{p}"]


def convert_open_clip_state(
    state: dict[str, torch.Tensor], arch: OpenClipArch = VIT_H_14, what: str = "open_clip checkpoint"
) -> dict[str, torch.Tensor]:
    """open_clip ViT CLIP tensors -> ``CLIPModel`` state dict (checked on both sides)."""
    check_keys(state, open_clip_key_shapes(arch), what)
    out: dict[str, torch.Tensor] = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        # open_clip multiplies x @ proj; nn.Linear computes x @ weight.T
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"],
    }
    for i in range(arch.vision_layers):
        _map_resblock(state, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", out)
    for i in range(arch.text_layers):
        _map_resblock(state, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", out)
    out = {k: v.contiguous() for k, v in out.items()}

    from transformers import CLIPModel

    with torch.device("meta"):
        target = target_shapes(CLIPModel(arch.clip_config()))
    check_keys(out, target, f"{what} (converted to CLIPModel)")
    return out


def write_clip_dir(out_dir: Path, state: dict[str, torch.Tensor], config: Any) -> None:
    """A ``CLIPModel.from_pretrained``-loadable directory: ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# 2. ImageReward: BLIP (ViT + BERT with cross-attention) + MLP -> ImageRewardModel


@dataclass(frozen=True)
class ImageRewardArch:
    """Hyper-parameters of ImageReward's BLIP; the defaults are ImageReward-v1.0 (ViT-L/16 + BERT-base)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vocab_size: int = 30524  # bert-base-uncased (30522) + BLIP's [DEC] and [ENC]
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    max_positions: int = 512
    pad_token_id: int = 0

    def blip_configs(self) -> tuple[Any, Any]:
        """transformers ``(BlipVisionConfig, BlipTextConfig)`` matching BLIP's ViT and med.py BERT."""
        from transformers import BlipTextConfig, BlipVisionConfig

        vision = BlipVisionConfig(
            hidden_size=self.vision_width,
            intermediate_size=self.vision_mlp,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act="gelu",
            layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
        )
        text = BlipTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            encoder_hidden_size=self.vision_width,
            intermediate_size=self.text_mlp,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.max_positions,
            hidden_act="gelu",
            layer_norm_eps=1e-12,  # med_config.json
            pad_token_id=self.pad_token_id,
            # BLIP's text encoder never reads these; transformers' defaults name BERT ids that a
            # smaller vocabulary would not hold.
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
            is_decoder=True,  # builds the cross-attention blocks (see ImageRewardModel)
        )
        return vision, text


IMAGEREWARD_V1 = ImageRewardArch()
# In ImageReward.pt but not used by the score: BLIP's contrastive projections and a buffer.
IMAGEREWARD_DROPPED = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)


def _head_shapes(prefix: str, in_dim: int) -> Shapes:
    dims = (in_dim, *HEAD_WIDTHS, 1)
    shapes: Shapes = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), pairwise(dims), strict=True):
        shapes[f"{prefix}{index}.weight"] = (d_out, d_in)
        shapes[f"{prefix}{index}.bias"] = (d_out,)
    return shapes


def imagereward_key_shapes(arch: ImageRewardArch = IMAGEREWARD_V1) -> Shapes:
    """Every tensor ``ImageReward.pt`` must hold (the dropped extras of IMAGEREWARD_DROPPED aside)."""
    w, t = arch.vision_width, arch.text_width
    grid = arch.image_size // arch.patch_size
    v = "blip.visual_encoder"
    shapes: Shapes = {
        f"{v}.cls_token": (1, 1, w),
        f"{v}.pos_embed": (1, grid * grid + 1, w),
        f"{v}.patch_embed.proj.weight": (w, 3, arch.patch_size, arch.patch_size),
        f"{v}.patch_embed.proj.bias": (w,),
        f"{v}.norm.weight": (w,),
        f"{v}.norm.bias": (w,),
    }
    for i in range(arch.vision_layers):
        b = f"{v}.blocks.{i}"
        shapes.update({
            f"{b}.norm1.weight": (w,), f"{b}.norm1.bias": (w,),
            f"{b}.attn.qkv.weight": (3 * w, w), f"{b}.attn.qkv.bias": (3 * w,),
            f"{b}.attn.proj.weight": (w, w), f"{b}.attn.proj.bias": (w,),
            f"{b}.norm2.weight": (w,), f"{b}.norm2.bias": (w,),
            f"{b}.mlp.fc1.weight": (arch.vision_mlp, w), f"{b}.mlp.fc1.bias": (arch.vision_mlp,),
            f"{b}.mlp.fc2.weight": (w, arch.vision_mlp), f"{b}.mlp.fc2.bias": (w,),
        })  # fmt: skip
    e = "blip.text_encoder.embeddings"
    shapes.update({
        f"{e}.word_embeddings.weight": (arch.vocab_size, t),
        f"{e}.position_embeddings.weight": (arch.max_positions, t),
        f"{e}.LayerNorm.weight": (t,), f"{e}.LayerNorm.bias": (t,),
    })  # fmt: skip
    for i in range(arch.text_layers):
        b = f"blip.text_encoder.encoder.layer.{i}"
        for block, kv_in in (("attention", t), ("crossattention", w)):
            shapes.update({
                f"{b}.{block}.self.query.weight": (t, t), f"{b}.{block}.self.query.bias": (t,),
                f"{b}.{block}.self.key.weight": (t, kv_in), f"{b}.{block}.self.key.bias": (t,),
                f"{b}.{block}.self.value.weight": (t, kv_in), f"{b}.{block}.self.value.bias": (t,),
                f"{b}.{block}.output.dense.weight": (t, t), f"{b}.{block}.output.dense.bias": (t,),
                f"{b}.{block}.output.LayerNorm.weight": (t,), f"{b}.{block}.output.LayerNorm.bias": (t,),
            })  # fmt: skip
        shapes.update({
            f"{b}.intermediate.dense.weight": (arch.text_mlp, t), f"{b}.intermediate.dense.bias": (arch.text_mlp,),
            f"{b}.output.dense.weight": (t, arch.text_mlp), f"{b}.output.dense.bias": (t,),
            f"{b}.output.LayerNorm.weight": (t,), f"{b}.output.LayerNorm.bias": (t,),
        })  # fmt: skip
    shapes.update(_head_shapes("mlp.layers.", t))
    return shapes


def convert_imagereward_state(
    state: dict[str, torch.Tensor], arch: ImageRewardArch = IMAGEREWARD_V1, what: str = "ImageReward checkpoint"
) -> dict[str, torch.Tensor]:
    """``ImageReward.pt`` tensors -> :class:`ImageRewardModel` state dict (checked on both sides)."""
    check_keys(state, imagereward_key_shapes(arch), what, ignored=IMAGEREWARD_DROPPED)
    v = "blip.visual_encoder"
    out: dict[str, torch.Tensor] = {
        "vision.embeddings.class_embedding": state[f"{v}.cls_token"],
        "vision.embeddings.position_embedding": state[f"{v}.pos_embed"],
        "vision.embeddings.patch_embedding.weight": state[f"{v}.patch_embed.proj.weight"],
        "vision.embeddings.patch_embedding.bias": state[f"{v}.patch_embed.proj.bias"],
        "vision.post_layernorm.weight": state[f"{v}.norm.weight"],
        "vision.post_layernorm.bias": state[f"{v}.norm.bias"],
    }
    block_names = {
        "norm1": "layer_norm1",
        "attn.qkv": "self_attn.qkv",  # same fused (3W, W) layout, q k v row blocks
        "attn.proj": "self_attn.projection",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(arch.vision_layers):
        for up, we in block_names.items():
            for p in ("weight", "bias"):
                out[f"vision.encoder.layers.{i}.{we}.{p}"] = state[f"{v}.blocks.{i}.{up}.{p}"]
    # BLIP's med.py BERT and transformers' BlipTextModel share module names key for key.
    for key, value in state.items():
        if key.startswith("blip.text_encoder.") and key not in IMAGEREWARD_DROPPED:
            out["text." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp.") :]] = value
    out = {k: v.contiguous() for k, v in out.items()}

    from opdkit.scoring.preference.modules import ImageRewardModel

    vision_config, text_config = arch.blip_configs()
    with torch.device("meta"):
        target = target_shapes(ImageRewardModel(vision_config, text_config, IMAGEREWARD_MEAN, IMAGEREWARD_STD))
    check_keys(out, target, f"{what} (converted to ImageRewardModel)")
    return out


def write_imagereward_dir(out_dir: Path, state: dict[str, torch.Tensor], arch: ImageRewardArch) -> None:
    """``config.json`` (our format: the BLIP configs, the normalisation) + ``model.safetensors``."""
    import json

    from safetensors.torch import save_file

    vision, text = arch.blip_configs()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "format": IMAGEREWARD_FORMAT,
        "arch": asdict(arch),
        "vision_config": vision.to_dict(),
        "text_config": text.to_dict(),
        "mean": IMAGEREWARD_MEAN,
        "std": IMAGEREWARD_STD,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


IMAGEREWARD_FORMAT = "opdkit-imagereward/1"


# ----------------------------------------------------------------------------------------------
# 3. LAION Aesthetic predictor v2 head


def aesthetic_key_shapes(in_dim: int = 768) -> Shapes:
    """The released ``sac+logos+ava1-l14-linearMSE.pth``: the MLP on CLIP ViT-L/14 image embeddings."""
    return _head_shapes("layers.", in_dim)


def convert_aesthetic_state(
    state: dict[str, torch.Tensor], in_dim: int = 768, what: str = "Aesthetic predictor"
) -> dict[str, torch.Tensor]:
    """Check the head's tensors (the layout already matches :class:`PreferenceHead`)."""
    check_keys(state, aesthetic_key_shapes(in_dim), what)
    return {k: v.contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# cached conversions (what the plug-ins call)


def _record(kind: str, source: Path, **extra: Any) -> dict[str, Any]:
    from opdkit.data.cache import sha256_file

    return {"kind": kind, "source": str(source.resolve()), "source_sha256": sha256_file(source), **extra}


def convert_hps_checkpoint(source: Path, arch: OpenClipArch = VIT_H_14) -> Path:
    """``HPS_v2*.pt`` -> a cached ``CLIPModel`` directory (converted on first use only)."""
    from opdkit.scoring.weights import (
        conversion_dir,
        is_converted,
        read_upstream_checkpoint,
        write_converted,
    )

    target = conversion_dir("hpsv2", source)
    if is_converted(target):
        return target
    what = f"HPSv2 checkpoint {str(source)!r}"

    def write(tmp: Path) -> dict[str, Any]:
        state = convert_open_clip_state(read_upstream_checkpoint(source, "HPSv2 checkpoint"), arch, what)
        write_clip_dir(tmp, state, arch.clip_config())
        return _record("hpsv2", source, arch=asdict(arch))

    return write_converted(target, write)


def convert_imagereward_checkpoint(source: Path, arch: ImageRewardArch = IMAGEREWARD_V1) -> Path:
    """``ImageReward.pt`` -> a cached :class:`ImageRewardModel` directory (converted on first use only)."""
    from opdkit.scoring.weights import (
        conversion_dir,
        is_converted,
        read_upstream_checkpoint,
        write_converted,
    )

    target = conversion_dir("imagereward", source)
    if is_converted(target):
        return target
    what = f"ImageReward checkpoint {str(source)!r}"

    def write(tmp: Path) -> dict[str, Any]:
        state = convert_imagereward_state(read_upstream_checkpoint(source, "ImageReward checkpoint"), arch, what)
        write_imagereward_dir(tmp, state, arch)
        return _record("imagereward", source, arch=asdict(arch))

    return write_converted(target, write)


def convert_aesthetic_head(source: Path, in_dim: int = 768) -> Path:
    """``sac+logos+ava1-l14-linearMSE.pth`` -> a cached directory holding ``head.safetensors``."""
    from safetensors.torch import save_file

    from opdkit.scoring.weights import (
        conversion_dir,
        is_converted,
        read_upstream_checkpoint,
        write_converted,
    )

    target = conversion_dir("aesthetic", source)
    if is_converted(target):
        return target
    what = f"Aesthetic predictor {str(source)!r}"

    def write(tmp: Path) -> dict[str, Any]:
        state = convert_aesthetic_state(read_upstream_checkpoint(source, "Aesthetic predictor"), in_dim, what)
        save_file(state, str(tmp / "head.safetensors"), metadata={"format": "pt"})
        return _record("aesthetic", source, in_dim=in_dim)

    return write_converted(target, write)
