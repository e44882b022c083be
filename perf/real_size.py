"""One GRPO step and one OPD step at SD3.5-M's or FLUX.1-dev's real size, through the training engine (not a test).

``--family sd3`` (default) builds SD3.5-M's transformer from its published config with random
weights (about 2.5B parameters), SD3's 16-channel VAE, and two small CLIP text encoders whose
pooled size (2,048) and padded joint width (4,096) match SD3.5-M's. ``--family flux`` builds
FLUX.1-dev's transformer at its published config (19 double-stream and 38 single-stream blocks,
24 heads x 128, about 12B parameters, guidance embedding) through opdkit's FLUX adapter, FLUX's
16-channel VAE, and a small CLIP (pooled 768) and T5 (width 4,096). The text encoders run once per
prompt and are frozen: they do not change the cost of a step. Then, for each setting, one
training step of :class:`opdkit.methods.grpo.Grpo` and of :class:`opdkit.methods.opd.Opd` with
three LoRA teachers on the one shared base, driven exactly as the loop drives them (rollout with
CFG for SD3 / the guidance embedding for FLUX, update sweep,
:class:`opdkit.training.loop.Optimization`), and prints peak device memory and seconds per image.
Adapters (student and teachers) are rank 32 / alpha 64 on the family's own LoRA targets. Last,
the memory of K LoRA teachers against K full transformer copies.

Usage (a GPU; on a CPU, ``--layers 1 --resolution 64`` checks that it runs: there the defaults
shrink to 2 SDE steps, groups of 2, 16 T5 tokens and the fp32 setting, so the check takes minutes)::

    python perf/real_size.py                       # SD3.5-M, 512 px, 8 images per step, 10 SDE steps
    python perf/real_size.py --family flux         # FLUX.1-dev, 1024 px
    python perf/real_size.py --layers 1 --resolution 64 --device cpu
    python perf/real_size.py --family flux --layers 1 --resolution 64 --device cpu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

# SD3.5-M's transformer/config.json (stabilityai/stable-diffusion-3.5-medium), as published.
SD35M = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13)),
}  # fmt: skip
SD3_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
    "use_post_quant_conv": False,
}  # fmt: skip
# FLUX.1-dev's transformer/config.json (black-forest-labs/FLUX.1-dev), as published.
FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# FLUX.1-dev's scheduler_config.json: the token-count shift (docs/models.md).
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}  # fmt: skip
CORPUS = ("a photo of a red cube", "a sign that says hello", "two dogs left of a cat",
          " ".join("abcdefghijklmnopqrstuvwxyz"), " ".join("0123456789"))  # fmt: skip


def brightness() -> Any:
    """The reward of this measurement: mean brightness (cheap; the cost is the model's)."""
    return lambda images, prompts, records: {"score": images.mean(dim=(1, 2, 3))}


def round_robin() -> Any:
    """The router of this measurement: image i to teacher i mod K (every teacher works every step)."""
    return lambda records, names: [names[i % len(names)] for i in range(len(records))]


def build_model(
    layers: int, device: str, family: str = "sd3", single_layers: int | None = None, text_tokens: int = 512
) -> Any:
    """The family's real-size transformer with random weights (``layers`` blocks; FLUX: double-stream
    blocks, and ``single_layers`` single-stream ones, default 2 x ``layers`` as 19 / 38; ``text_tokens``
    T5 tokens per prompt, FluxPipeline's 512 by default)."""
    if family == "flux":
        return build_flux(layers, 2 * layers if single_layers is None else single_layers, device, text_tokens)
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from opdkit.models.flow_model import FlowModel
    from opdkit.models.tokenizers import clip_tokenizer_from_corpus

    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**{**SD35M, "num_layers": layers,
                                               "dual_attention_layers": tuple(range(min(13, layers)))})  # fmt: skip
        vae = AutoencoderKL(**SD3_VAE)
        encoders = [
            CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                projection_dim=1024, vocab_size=1000, max_position_embeddings=77,
            ))
            for _ in range(2)
        ]
    tokenizers = [clip_tokenizer_from_corpus(CORPUS, 77) for _ in encoders]
    for encoder, tokenizer in zip(encoders, tokenizers, strict=True):
        encoder.resize_token_embeddings(len(tokenizer))
    return FlowModel(transformer, encoders, tokenizers, vae, world="sd3", shift=3.0, encoder_kinds=["clip", "clip"])


def build_flux(layers: int, single_layers: int, device: str, text_tokens: int) -> Any:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from opdkit.models.flux import FluxModel
    from opdkit.models.tokenizers import clip_tokenizer_from_corpus, t5_tokenizer_from_corpus

    torch.manual_seed(0)
    clip_tok, t5_tok = clip_tokenizer_from_corpus(CORPUS, 77), t5_tokenizer_from_corpus(CORPUS)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": layers, "num_single_layers": single_layers})
        vae = AutoencoderKL(**FLUX_VAE)
        clip = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=len(clip_tok), max_position_embeddings=77,
        ))  # fmt: skip
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=128, num_layers=1, num_heads=2,
            is_encoder_decoder=False, use_cache=False,
        ))  # fmt: skip
    return FluxModel(transformer, [clip, t5], [clip_tok, t5_tok], vae, max_sequence_length=text_tokens,
                     scheduler_config=FLUX_SCHEDULER)  # fmt: skip


def context(model: Any, method: str, args: argparse.Namespace, teachers: list[Any]) -> Any:
    from accelerate import Accelerator

    from opdkit.recipe import GrpoTrainSpec, LoraSpec, OpdTrainSpec, PromptsSpec, RewardSpec, SamplerSpec
    from opdkit.training.loop import RunContext, autocast_dtype

    common = {"seed": 0, "lr": 1e-4, "batch_size": args.prompts, "group_size": args.group, "micro_batch": args.micro,
              "lora": LoraSpec(rank=32, alpha=64), "gradient_checkpointing": args.checkpointing,
              "precision": args.precision}  # fmt: skip
    train = GrpoTrainSpec(**common, kl_beta=0.04) if method == "grpo" else OpdTrainSpec(**common, loss_mode="direct")
    cfg = 1.0 if args.family == "flux" else 4.5  # FLUX.1-dev: guidance embedded, one forward
    sampler = SamplerSpec(steps=args.steps, cfg=cfg, resolution=args.resolution, train_window=(0, args.steps - 1))
    recipe = SimpleNamespace(
        train=train, sampler=sampler, prompts=PromptsSpec(), rewards=[RewardSpec(type=f"{__file__}:brightness")],
        teachers=teachers, router=SimpleNamespace(type=f"{__file__}:round_robin", params={}),
        regularizers=[], init=None,
    )  # fmt: skip
    loaded: Any = SimpleNamespace(recipe=recipe, path=Path("real_size"), where=lambda *loc: ".".join(map(str, loc)))
    accelerator = Accelerator(cpu=args.device == "cpu")
    ctx = RunContext(loaded, model, accelerator, rundir=None, resuming=False)  # type: ignore[arg-type]
    ctx.precision = autocast_dtype(args.precision, ctx.device)
    return ctx


def one_step(method_name: str, args: argparse.Namespace, model: Any, teachers: list[Any]) -> dict[str, float]:
    """Set the method up on ``model``, take a warm-up step and a timed one; peak memory of the timed."""
    from opdkit.methods.grpo import Grpo
    from opdkit.methods.opd import Opd
    from opdkit.training.loop import Optimization
    from opdkit.training.trainable import EMA

    ctx = context(model, method_name, args, teachers)
    method = Grpo() if method_name == "grpo" else Opd()
    records = [{"prompt": CORPUS[i % 3], "tag": "real"} for i in range(64)]
    setup = method.setup(ctx)
    method.records = records
    optimizer = torch.optim.AdamW(setup.params, lr=1e-4)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == torch.float16)
    optim = Optimization(setup.params, optimizer, scaler, EMA(setup.names, setup.params, 0.9, 8), 1.0, 1)
    method.step(1, ctx, optim)  # warm-up: allocator, kernels
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    result = method.step(2, ctx, optim)
    sync()
    seconds = time.perf_counter() - t0
    images = args.prompts * args.group
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else float("nan")
    return {"seconds_per_image": seconds / images, "peak_gib": peak, "loss": float(result.record["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    parser.add_argument("--layers", type=int, default=None, help="blocks (SD3: 24; FLUX: 19 double-stream)")
    parser.add_argument("--single-layers", type=int, default=None, help="FLUX single-stream blocks (default 2 x --layers)")
    parser.add_argument("--resolution", type=int, default=None, help="px (SD3: 512; FLUX: 1024)")
    parser.add_argument("--text-tokens", type=int, default=None, help="FLUX: T5 tokens per prompt (512; a CPU check: 16)")
    parser.add_argument("--steps", type=int, default=None, help="SDE steps (10; a CPU check: 2)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=None, help="images per prompt (4; a CPU check: 2)")
    parser.add_argument("--micro", type=int, default=None, help="images per forward (8, at most a step's images)")
    parser.add_argument("--settings", default=None, help="bf16,bf16+ckpt,fp32 (a CPU check: fp32)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    flux = args.family == "flux"
    args.layers = args.layers or (19 if flux else 24)
    args.resolution = args.resolution or (1024 if flux else 512)
    cpu = args.device == "cpu"  # a check that it runs, not a measurement: keep it to minutes
    args.steps = args.steps or (2 if cpu else 10)
    args.group = args.group or (2 if cpu else 4)
    args.text_tokens = args.text_tokens or (16 if cpu else 512)
    args.micro = args.micro or min(8, args.prompts * args.group)
    args.settings = args.settings or ("fp32" if cpu else "bf16,bf16+ckpt,fp32")

    from opdkit.recipe import TeacherSpec

    rows = []
    tmp = Path(tempfile.mkdtemp())
    for setting in args.settings.split(","):
        args.precision = setting.split("+")[0]
        args.checkpointing = "ckpt" in setting
        for method in ("grpo", "opd"):
            model = build_model(args.layers, args.device, args.family, args.single_layers, args.text_tokens)
            params = sum(p.numel() for p in model.transformer.parameters())
            teachers = []
            if method == "opd":  # three LoRA teachers, saved as adapter files and loaded by name
                for k in range(3):
                    model.add_lora(f"t{k}", rank=32, alpha=64)  # the family's own targets
                    with torch.no_grad():
                        for name, p in model.transformer.named_parameters():
                            if f"lora_B.t{k}." in name:
                                p.normal_(0, 1e-3)
                    model.save_lora(f"t{k}", tmp / f"t{k}.safetensors")
                    model.transformer.delete_adapters(f"t{k}")
                    teachers.append(TeacherSpec(name=f"t{k}", type="lora", path=str(tmp / f"t{k}.safetensors")))
            row = {"setting": setting, "method": method, "params_b": params / 1e9, **one_step(method, args, model, teachers)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{'setting':<10} {'method':<6} {'s/image':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['setting']:<10} {r['method']:<6} {r['seconds_per_image']:>8.3f} {r['peak_gib']:>9.1f}")
    # Weights of K teachers: K rank-32 adapters (fp32) on the one base, or K full copies (bf16).
    model = build_model(args.layers, "meta", args.family, args.single_layers, args.text_tokens)
    full = sum(p.numel() for p in model.transformer.parameters()) * 2
    model.add_lora("probe", rank=32, alpha=64)
    adapter = sum(p.numel() for n, p in model.transformer.named_parameters() if "lora_" in n) * 4
    for k in (1, 3, 8):
        print(f"{k} teachers: LoRA {k * adapter / 2**30:.3f} GiB on the shared base, full bf16 copies "
              f"{k * full / 2**30:.1f} GiB ({adapter / full:.2%} of a copy each)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
