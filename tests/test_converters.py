"""Converters: upstream layouts (from the documented key/shape lists) -> transformers weights.

Each test builds a random checkpoint in the upstream layout, saves it with ``torch.save`` (the
upstream format), converts it through the cached converter (which reads it back with
``weights_only=True``), then checks that every key is mapped with its shape and that the
converted model computes exactly what an independent plain-torch forward on the UPSTREAM tensors
computes. The real-size layouts (ViT-H-14, ImageReward-v1.0) are converted on the ``meta``
device, which checks every key and shape of the real models without allocating them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opdkit.errors import OpdkitError
from opdkit.scoring.preference import IMAGEREWARD_MEAN, IMAGEREWARD_STD
from opdkit.scoring.preference.convert import (
    IMAGEREWARD_DROPPED,
    IMAGEREWARD_V1,
    VIT_H_14,
    ImageRewardArch,
    OpenClipArch,
    aesthetic_key_shapes,
    convert_aesthetic_head,
    convert_hps_checkpoint,
    convert_imagereward_checkpoint,
    convert_imagereward_state,
    convert_open_clip_state,
    imagereward_key_shapes,
    open_clip_key_shapes,
)

TINY_CLIP = OpenClipArch(
    embed_dim=16, image_size=32, patch_size=8, vision_width=24, vision_layers=2, vision_heads=2, vision_mlp=48,
    context_length=12, vocab_size=64, text_width=16, text_layers=2, text_heads=2, text_mlp=32,
    bos_token_id=62, eos_token_id=63,
)  # fmt: skip
TINY_BLIP = ImageRewardArch(
    image_size=32, patch_size=16, vision_width=24, vision_layers=2, vision_heads=2, vision_mlp=48,
    vocab_size=60, text_width=16, text_layers=2, text_heads=2, text_mlp=32, max_positions=40,
)  # fmt: skip


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path / "cache"))


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    for k in state:  # LayerNorm gains near 1, as trained ones are
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight", "norm1.weight",
                       "norm2.weight", "norm.weight", "LayerNorm.weight")):  # fmt: skip
            state[k] = 1.0 + state[k]
    return state


# ----------------------------------------------------------------------------------------------
# plain-torch reference forwards on the upstream tensors


def ref_mha(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor, heads: int,
            mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Multi-head self-attention from a fused (3W, W) q/k/v projection (open_clip and BLIP's ViT)."""
    b, n, w = x.shape
    q, k, v = (x @ w_qkv.t() + b_qkv).split(w, dim=-1)
    q, k, v = (t.view(b, n, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(w // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    return out @ w_o.t() + b_o


def ref_open_clip_block(s: dict[str, torch.Tensor], p: str, x: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), s[f"{p}.ln_1.weight"], s[f"{p}.ln_1.bias"], 1e-5)
    x = x + ref_mha(h, s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"], s[f"{p}.attn.out_proj.weight"],
                    s[f"{p}.attn.out_proj.bias"], heads, mask)  # fmt: skip
    h = F.layer_norm(x, (w,), s[f"{p}.ln_2.weight"], s[f"{p}.ln_2.bias"], 1e-5)
    h = F.gelu(h @ s[f"{p}.mlp.c_fc.weight"].t() + s[f"{p}.mlp.c_fc.bias"])
    return x + h @ s[f"{p}.mlp.c_proj.weight"].t() + s[f"{p}.mlp.c_proj.bias"]


def ref_open_clip_image(s: dict[str, torch.Tensor], arch: OpenClipArch, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip VisionTransformer.forward: (B, 3, S, S) -> (B, E)."""
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=arch.patch_size).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (arch.vision_width,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], 1e-5)
    for i in range(arch.vision_layers):
        x = ref_open_clip_block(s, f"visual.transformer.resblocks.{i}", x, arch.vision_heads)
    x = F.layer_norm(x[:, 0], (arch.vision_width,), s["visual.ln_post.weight"], s["visual.ln_post.bias"], 1e-5)
    return x @ s["visual.proj"]


def ref_open_clip_text(s: dict[str, torch.Tensor], arch: OpenClipArch, ids: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text: causal transformer, pooled at argmax(ids) (the end-of-text id)."""
    n = ids.shape[1]
    x = s["token_embedding.weight"][ids] + s["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(arch.text_layers):
        x = ref_open_clip_block(s, f"transformer.resblocks.{i}", x, arch.text_heads, causal)
    x = F.layer_norm(x, (arch.text_width,), s["ln_final.weight"], s["ln_final.bias"], 1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ s["text_projection"]


def ref_blip_vit(s: dict[str, torch.Tensor], arch: ImageRewardArch, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer.forward: (B, 3, S, S) -> (B, 1 + G*G, W) after the final norm."""
    v, w = "blip.visual_encoder", arch.vision_width
    x = F.conv2d(pixels, s[f"{v}.patch_embed.proj.weight"], s[f"{v}.patch_embed.proj.bias"], stride=arch.patch_size)
    x = torch.cat([s[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + s[f"{v}.pos_embed"]
    for i in range(arch.vision_layers):
        p = f"{v}.blocks.{i}"
        h = F.layer_norm(x, (w,), s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"], 1e-6)
        x = x + ref_mha(h, s[f"{p}.attn.qkv.weight"], s[f"{p}.attn.qkv.bias"], s[f"{p}.attn.proj.weight"],
                        s[f"{p}.attn.proj.bias"], arch.vision_heads)  # fmt: skip
        h = F.layer_norm(x, (w,), s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"], 1e-6)
        x = x + F.gelu(h @ s[f"{p}.mlp.fc1.weight"].t() + s[f"{p}.mlp.fc1.bias"]) @ s[f"{p}.mlp.fc2.weight"].t()
        x = x + s[f"{p}.mlp.fc2.bias"]
    return F.layer_norm(x, (w,), s[f"{v}.norm.weight"], s[f"{v}.norm.bias"], 1e-6)


def ref_bert_attention(s: dict[str, torch.Tensor], p: str, x: torch.Tensor, kv: torch.Tensor, heads: int,
                       mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """med.py BertAttention: separate q/k/v, softmax, output dense + residual + LayerNorm."""
    b, n, t = x.shape
    q = x @ s[f"{p}.self.query.weight"].t() + s[f"{p}.self.query.bias"]
    k = kv @ s[f"{p}.self.key.weight"].t() + s[f"{p}.self.key.bias"]
    v = kv @ s[f"{p}.self.value.weight"].t() + s[f"{p}.self.value.bias"]
    q, k, v = (z.view(b, z.shape[1], heads, t // heads).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(t // heads)
    if mask is not None:
        scores = scores + mask
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, t)
    out = ctx @ s[f"{p}.output.dense.weight"].t() + s[f"{p}.output.dense.bias"]
    return F.layer_norm(out + x, (t,), s[f"{p}.output.LayerNorm.weight"], s[f"{p}.output.LayerNorm.bias"], 1e-12)


def ref_imagereward(s: dict[str, torch.Tensor], arch: ImageRewardArch, pixels: torch.Tensor, ids: torch.Tensor,
                    attention: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """ImageReward.score: BLIP ViT -> BERT (bidirectional self-attn + cross-attn) -> [CLS] -> MLP -> normalise."""
    image = ref_blip_vit(s, arch, pixels)
    e, t = "blip.text_encoder.embeddings", arch.text_width
    x = s[f"{e}.word_embeddings.weight"][ids] + s[f"{e}.position_embeddings.weight"][: ids.shape[1]]
    x = F.layer_norm(x, (t,), s[f"{e}.LayerNorm.weight"], s[f"{e}.LayerNorm.bias"], 1e-12)
    pad_mask = (1.0 - attention[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(arch.text_layers):
        p = f"blip.text_encoder.encoder.layer.{i}"
        x = ref_bert_attention(s, f"{p}.attention", x, x, arch.text_heads, pad_mask)
        x = ref_bert_attention(s, f"{p}.crossattention", x, image, arch.text_heads, None)
        h = F.gelu(x @ s[f"{p}.intermediate.dense.weight"].t() + s[f"{p}.intermediate.dense.bias"])
        h = h @ s[f"{p}.output.dense.weight"].t() + s[f"{p}.output.dense.bias"]
        x = F.layer_norm(h + x, (t,), s[f"{p}.output.LayerNorm.weight"], s[f"{p}.output.LayerNorm.bias"], 1e-12)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # Linear layers of the head; the Dropouts between them are identities
        r = r @ s[f"mlp.layers.{index}.weight"].t() + s[f"mlp.layers.{index}.bias"]
    return (r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


# ----------------------------------------------------------------------------------------------
# HPSv2: open_clip -> CLIPModel


def test_hps_conversion_maps_every_key_and_matches_open_clip(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPModel

    upstream = random_state(open_clip_key_shapes(TINY_CLIP), seed=0)
    upstream["logit_scale"] = torch.tensor(math.log(100.0))
    source = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in upstream.items()}}, source)  # DDP-prefixed, as some saves are

    directory = convert_hps_checkpoint(source, TINY_CLIP)
    converted = load_file(str(directory / "model.safetensors"))
    model = CLIPModel.from_pretrained(directory).eval()
    ours = model.state_dict()
    # every converted tensor is a parameter of CLIPModel with its shape, and every parameter is covered
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in converted)
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in upstream.values())
    # the fused in_proj rows are q, k, v in that order; projections are transposed
    w = TINY_CLIP.vision_width
    fused = upstream["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(converted["vision_model.encoder.layers.1.self_attn.k_proj.weight"], fused[w : 2 * w])
    assert torch.equal(converted["text_projection.weight"], upstream["text_projection"].t())

    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(0, 60, (3, TINY_CLIP.context_length), generator=g)
    ids[:, 0] = TINY_CLIP.bos_token_id
    for row, end in enumerate((4, 7, 11)):  # end-of-text at different places, padding after it
        ids[row, end] = TINY_CLIP.eos_token_id
        ids[row, end + 1 :] = 0
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output)
        ref_image = ref_open_clip_image(upstream, TINY_CLIP, pixels)
        ref_text = ref_open_clip_text(upstream, TINY_CLIP, ids)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=1e-5)
    cos = F.cosine_similarity(image, text)
    torch.testing.assert_close(cos, F.cosine_similarity(ref_image, ref_text), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor(100.0))


def test_real_vit_h14_layout_converts_key_for_key_on_meta() -> None:
    shapes = open_clip_key_shapes(VIT_H_14)
    assert len(shapes) == 14 + 12 * (32 + 24)
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(986.1e6, rel=1e-3)  # ViT-H-14: 986M
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in shapes.items()}
    converted = convert_open_clip_state(state, VIT_H_14)  # checks the result against CLIPModel(ViT-H-14) too
    assert converted["vision_model.encoder.layers.31.self_attn.v_proj.weight"].shape == (1280, 1280)
    assert converted["visual_projection.weight"].shape == (1024, 1280)


def test_unexpected_and_missing_keys_stop_with_the_list(tmp_path: Path) -> None:
    state = random_state(open_clip_key_shapes(TINY_CLIP), seed=0)
    del state["ln_final.bias"]
    state["visual.attn_pool.query"] = torch.zeros(2)
    state["text.extra"] = torch.zeros(1)
    state["visual.proj"] = torch.zeros(3, 3)
    source = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, source)
    with pytest.raises(OpdkitError) as err:
        convert_hps_checkpoint(source, TINY_CLIP)
    message = str(err.value)
    assert "\n" not in message
    assert "2 unexpected keys: text.extra, visual.attn_pool.query" in message
    assert "1 missing key: ln_final.bias" in message
    assert "1 shape mismatch: visual.proj (3, 3) != (24, 16)" in message
    assert not list((tmp_path / "cache" / "preference").glob("hpsv2-*"))  # nothing half-written is kept


def test_a_tiny_checkpoint_given_as_vit_h14_lists_its_problems(tmp_path: Path) -> None:
    source = tmp_path / "tiny.pt"
    torch.save({"state_dict": random_state(open_clip_key_shapes(TINY_CLIP), seed=0)}, source)
    with pytest.raises(OpdkitError, match=r"missing keys: .*shape mismatches: ") as err:
        convert_hps_checkpoint(source)  # default architecture: ViT-H-14
    assert "\n" not in str(err.value) and "more)" in str(err.value)  # long lists are cut, counts stay exact


def test_checkpoint_with_python_objects_is_refused_not_unpickled(tmp_path: Path) -> None:
    source = tmp_path / "with_args.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, source)
    with pytest.raises(OpdkitError, match="weights_only=True") as err:
        convert_hps_checkpoint(source, TINY_CLIP)
    assert "\n" not in str(err.value)


def test_conversion_is_cached_and_redone_when_the_source_changes(tmp_path: Path) -> None:
    import os

    source = tmp_path / "hps.pt"
    torch.save({"state_dict": random_state(open_clip_key_shapes(TINY_CLIP), seed=0)}, source)
    first = convert_hps_checkpoint(source, TINY_CLIP)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert convert_hps_checkpoint(source, TINY_CLIP) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    record = (first / "opdkit_conversion.json").read_text()
    from opdkit.data.cache import sha256_file

    assert sha256_file(source) in record
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    assert convert_hps_checkpoint(source, TINY_CLIP) != first


# ----------------------------------------------------------------------------------------------
# ImageReward: BLIP + MLP -> transformers BLIP + ImageRewardModel


def test_imagereward_conversion_maps_every_key_and_matches_blip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from opdkit.scoring.preference.scorers import load_imagereward_dir

    upstream = random_state(imagereward_key_shapes(TINY_BLIP), seed=2)
    dropped = {
        "blip.vision_proj.weight": torch.zeros(8, TINY_BLIP.vision_width),
        "blip.vision_proj.bias": torch.zeros(8),
        "blip.text_proj.weight": torch.zeros(8, TINY_BLIP.text_width),
        "blip.text_proj.bias": torch.zeros(8),
        "blip.text_encoder.embeddings.position_ids": torch.arange(TINY_BLIP.max_positions)[None],
    }
    assert set(dropped) == set(IMAGEREWARD_DROPPED)
    source = tmp_path / "ImageReward.pt"
    torch.save({**upstream, **dropped}, source)  # ImageReward.pt is a bare state dict

    directory = convert_imagereward_checkpoint(source, TINY_BLIP)
    converted = load_file(str(directory / "model.safetensors"))
    model = load_imagereward_dir(directory).eval()
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in converted)
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in upstream.values())

    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(5, 60, (2, 35), generator=g)
    attention = torch.ones_like(ids)
    attention[0, 9:] = 0  # a padded prompt
    ids[0, 9:] = 0
    with torch.no_grad():
        ours_score = model(pixels, ids, attention)
        ref_score = ref_imagereward(upstream, TINY_BLIP, pixels, ids, attention)
    assert ours_score.shape == (2,)
    torch.testing.assert_close(ours_score, ref_score, atol=1e-5, rtol=1e-5)


def test_real_imagereward_layout_converts_key_for_key_on_meta() -> None:
    shapes = imagereward_key_shapes(IMAGEREWARD_V1)
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in shapes.items()}
    converted = convert_imagereward_state(state, IMAGEREWARD_V1)
    assert converted["text.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)
    assert converted["vision.embeddings.position_embedding"].shape == (1, 197, 1024)
    assert converted["head.layers.0.weight"].shape == (1024, 768)


def test_imagereward_unknown_key_stops(tmp_path: Path) -> None:
    state = random_state(imagereward_key_shapes(TINY_BLIP), seed=0)
    state["blip.text_decoder.cls.bias"] = torch.zeros(3)
    source = tmp_path / "ir.pt"
    torch.save(state, source)
    with pytest.raises(OpdkitError, match=r"^ImageReward checkpoint '.*ir\.pt': 1 unexpected key: blip\.text_decoder\.cls\.bias$"):
        convert_imagereward_checkpoint(source, TINY_BLIP)


# ----------------------------------------------------------------------------------------------
# LAION Aesthetic predictor head


def test_aesthetic_head_conversion_matches_the_linear_chain(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from opdkit.scoring.preference.modules import preference_head

    shapes = aesthetic_key_shapes(768)
    assert shapes["layers.0.weight"] == (1024, 768) and shapes["layers.7.weight"] == (1, 16)
    upstream = random_state(aesthetic_key_shapes(12), seed=4)
    source = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(upstream, source)
    head = preference_head(12).eval()
    head.load_state_dict(load_file(str(convert_aesthetic_head(source, in_dim=12) / "head.safetensors")))
    x = torch.randn(5, 12)
    ref = x
    for index in (0, 2, 4, 6, 7):  # no activations between the layers (upstream comments them out)
        ref = ref @ upstream[f"layers.{index}.weight"].t() + upstream[f"layers.{index}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(head(x), ref, atol=1e-5, rtol=1e-5)

    bad = tmp_path / "wrong_width.pth"
    torch.save(random_state(aesthetic_key_shapes(768), seed=0), bad)
    with pytest.raises(OpdkitError, match=r"1 shape mismatch: layers\.0\.weight \(1024, 768\) != \(1024, 12\)"):
        convert_aesthetic_head(bad, in_dim=12)
