"""The training engine's parts (opdkit.training): rollouts, exact ratio, log-prob, KL scalings,
advantages, losses, rewards, EMA (CPU fp32)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from opdkit.errors import OpdkitError
from opdkit.recipe import LoraSpec, RewardSpec
from opdkit.training.loop import autocast_dtype, average_gradients, scheduled_lr, summarize
from opdkit.training.losses import clipped_policy_loss, gaussian_kl, group_advantages, sampled_kl
from opdkit.training.rewards import WeightedReward
from opdkit.training.rollout import Rollout, rollout, shared_noise_seeds, step_prompts, transition
from opdkit.training.trainable import EMA, parameters_sha256, setup_trainable

TINY_SHAPES = {
    "patch_size": 4,
    "num_layers": 1,
    "num_heads": 2,
    "head_dim": 8,
    "text_hidden_size": 32,
    "text_heads": 2,
    "text_projection_dim": 32,
}
RECORDS = [{"prompt": "a photo of a red cube", "tag": "x"}, {"prompt": "a photo of a blue sphere", "tag": "x"}]


@pytest.fixture(scope="module")
def tiny() -> Any:
    """A tiny random shapes-world model with a trained-looking (non-zero) LoRA adapter."""
    from opdkit.registry import models

    model = models.build("shapes_new", TINY_SHAPES)
    torch.manual_seed(0)
    trainable = setup_trainable(model, LoraSpec(rank=4, alpha=8))
    with torch.no_grad():
        for p in trainable.params:  # B starts at zero: make the adapter matter
            p.add_(0.05 * torch.randn_like(p))
    model.trainable = trainable
    return model


def _rollout(model: Any, micro_batch: int | None = 2, cfg: float = 3.0, window: tuple[int, int] | None = None) -> Rollout:
    records = [r for r in RECORDS for _ in range(2)]  # 2 prompts x group of 2
    return rollout(
        model, records, [11, 12, 13, 14], steps=4, cfg=cfg, noise_level=0.7, resolution=32,
        window=window, micro_batch=micro_batch,
    )  # fmt: skip


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_ratio_is_exactly_one_before_the_first_update(tiny: Any, cfg: float) -> None:
    batch = _rollout(tiny, cfg=cfg)
    assert batch.states.shape == (5, 4, 3, 32, 32) and batch.images.shape == (4, 3, 32, 32)
    assert len(batch.chunks()) == 2
    tiny.transformer.train()
    for rows in batch.chunks():
        for t in batch.trained_steps:
            with torch.enable_grad():
                new = transition(tiny, batch, t, rows)
            assert new.log_prob.requires_grad
            ratio = torch.exp(new.log_prob.detach() - batch.log_probs[t, rows])
            assert float((ratio - 1.0).abs().max()) == 0.0
    tiny.transformer.eval()


def test_rollout_window_and_seeds(tiny: Any) -> None:
    batch = _rollout(tiny, window=(1, 3))
    assert batch.trained_steps == [1, 2]
    assert bool((batch.log_probs[[0, 3]] == 0).all()) and bool((batch.log_probs[[1, 2]] != 0).all())
    # An image depends on its prompt and seed only: one micro-batch of 4 gives the same samples.
    whole = _rollout(tiny, micro_batch=None, window=(1, 3))
    torch.testing.assert_close(whole.states, batch.states, atol=1e-5, rtol=1e-5)


def test_shared_initial_noise_per_group(tiny: Any) -> None:
    records = [r for r in RECORDS for _ in range(2)]  # 2 prompts x group of 2
    seeds = [11, 12, 13, 14]
    noise_seeds = shared_noise_seeds(seeds, group_size=2)
    assert noise_seeds[0] == noise_seeds[1] != noise_seeds[2] == noise_seeds[3]
    assert not set(noise_seeds) & set(seeds)  # not an image's own seed: its SDE noise stays independent
    batch = rollout(
        tiny, records, seeds, steps=4, cfg=3.0, noise_level=0.7, resolution=32, micro_batch=2, noise_seeds=noise_seeds
    )
    start = batch.states[0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and not torch.equal(start[0], start[2])
    assert not torch.equal(batch.states[1, 0], batch.states[1, 1])  # the SDE steps still branch the group
    assert not torch.equal(_rollout(tiny).states[0, 0], start[0])  # the start no longer comes from the seed
    tiny.transformer.train()
    for rows in batch.chunks():  # the stored log-probs are still re-scored exactly
        new = transition(tiny, batch, 1, rows)
        assert float((new.log_prob.detach() - batch.log_probs[1, rows]).abs().max()) == 0.0
    tiny.transformer.eval()


def test_logprob_equals_torch_normal(tiny: Any) -> None:
    batch = _rollout(tiny)
    rows = slice(0, 4)
    t = 1
    new = transition(tiny, batch, t, slice(0, 2))
    sigma, sigma_next = float(batch.sigmas[t]), float(batch.sigmas[t + 1])
    s_t = 0.7 * math.sqrt(sigma / (1.0 - sigma))
    std = s_t * math.sqrt(sigma - sigma_next)
    dist = torch.distributions.Normal(new.mean.double(), std)
    expected = dist.log_prob(batch.states[t + 1, 0:2].double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(new.log_prob.double(), expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(new.std, torch.full((2,), std, dtype=torch.float32))
    assert batch.log_probs[t, rows].shape == (4,)


def test_kl_is_zero_when_policy_equals_reference() -> None:
    from opdkit.registry import models

    model = models.build("shapes_new", TINY_SHAPES)
    torch.manual_seed(0)
    lora = setup_trainable(model, LoraSpec(rank=4, alpha=8))  # fresh adapter: B == 0
    batch = _rollout(model)
    for t in batch.trained_steps:
        rows = slice(0, 2)
        new = transition(model, batch, t, rows)
        with torch.no_grad(), lora.reference(model):
            ref = transition(model, batch, t, rows)
        dt = batch.sigmas[t + 1] - batch.sigmas[t]
        for scaling in ("flow_grpo", "exact"):
            kl = gaussian_kl(new.mean, ref.mean, new.std, dt, scaling)
            assert kl.shape == (2,) and float(kl.detach().abs().max()) == 0.0
    # Full fine-tuning: the reference is a frozen copy, equal at the start.
    full_model = models.build("shapes_new", TINY_SHAPES)
    full = setup_trainable(full_model, None)
    assert full.frozen is not None and not any(p.requires_grad for p in full.frozen.parameters())
    assert all(p.requires_grad for p in full.params)
    new = transition(full_model, batch, 0, slice(0, 2))
    with torch.no_grad(), full.reference(full_model):
        assert full_model.transformer is full.frozen
        ref = transition(full_model, batch, 0, slice(0, 2))
    assert full_model.transformer is not full.frozen
    for scaling in ("flow_grpo", "exact"):
        assert float(gaussian_kl(new.mean, ref.mean, new.std, -0.1, scaling).detach().abs().max()) == 0.0


def test_kl_scalings_against_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=gen)
    mean_ref = mean + 0.1 * torch.randn(3, 2, 4, 4, generator=gen)
    s_t, dt = 0.8, -0.125
    std = torch.full((3,), s_t * math.sqrt(-dt))
    exact = gaussian_kl(mean, mean_ref, std, dt, "exact")
    p = torch.distributions.Normal(mean.double(), float(std[0]))
    q = torch.distributions.Normal(mean_ref.double(), float(std[0]))
    expected = torch.distributions.kl_divergence(p, q).sum(dim=(1, 2, 3))
    torch.testing.assert_close(exact.double(), expected, atol=1e-6, rtol=1e-5)
    flow_grpo = gaussian_kl(mean, mean_ref, std, dt, "flow_grpo")
    torch.testing.assert_close(flow_grpo, ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * s_t**2))
    torch.testing.assert_close(exact, flow_grpo * 32 / (-dt))  # D = 2 * 4 * 4
    with pytest.raises(ValueError, match="scaling"):
        gaussian_kl(mean, mean_ref, std, dt, "nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("scaling", ["flow_grpo", "exact"])
def test_sampled_kl_advantage_carries_the_kl_gradient_and_the_analytic_one_does_not(scaling: str) -> None:
    # A Gaussian step pi = N(mu, std^2) from one state; teacher N(mu_t, std^2). Many draws x'.
    from opdkit.sampling import gaussian_log_prob

    gen = torch.Generator().manual_seed(0)
    n, s_t, dt = 200_000, 0.9, -0.1
    std = torch.full((n,), s_t * math.sqrt(-dt))
    mu_teacher = torch.randn(1, 2, 2, 2, generator=gen).expand(n, 2, 2, 2)
    mu = torch.nn.Parameter(torch.randn(1, 2, 2, 2, generator=gen))
    draws = (mu.detach() + std.view(-1, 1, 1, 1) * torch.randn(n, 2, 2, 2, generator=gen)).detach()
    log_prob_old = gaussian_log_prob(draws, mu.detach().expand_as(draws), std.view(-1, 1, 1, 1))

    true_grad = torch.autograd.grad(gaussian_kl(mu.expand(n, 2, 2, 2), mu_teacher, std, dt, scaling).mean(), mu)[0]

    def policy_gradient(advantage: torch.Tensor) -> torch.Tensor:
        log_prob = gaussian_log_prob(draws, mu.expand_as(draws), std.view(-1, 1, 1, 1))
        ratio = torch.exp(log_prob - log_prob_old)  # 1, as on the first inner step
        return torch.autograd.grad(-(advantage * ratio).mean(), mu)[0]

    estimate = sampled_kl(log_prob_old, draws, mu_teacher, std, dt, scaling)
    analytic = gaussian_kl(mu.detach().expand(n, 2, 2, 2), mu_teacher, std, dt, scaling)
    torch.testing.assert_close(estimate.mean(), analytic.mean(), rtol=0.02, atol=0)  # unbiased
    # Advantage -k: the policy-gradient loss -A * rho descends the KL.
    with_sampled = policy_gradient(-estimate)
    with_analytic = policy_gradient(-analytic)
    assert torch.nn.functional.cosine_similarity(with_sampled.flatten(), true_grad.flatten(), dim=0) > 0.99
    # log-probs are averaged over the D = 8 dims (flow_grpo's convention), which scales every
    # policy gradient by 1 / D; Adam does not see a constant scale.
    d = draws[0].numel()
    assert float((with_sampled * d - true_grad).norm()) < 0.1 * float(true_grad.norm())  # Monte Carlo error
    assert float(with_analytic.norm()) < 0.05 * float(true_grad.norm())  # state-only: no signal


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.0, 0.5, 4.0])
    for std in ("group", "batch"):
        adv = group_advantages(rewards, 3, std=std)
        assert adv.shape == (9,)
        torch.testing.assert_close(adv.view(3, 3).mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
        assert torch.equal(adv[3:6], torch.zeros(3))  # no spread, no signal
    group = group_advantages(rewards, 3, std="group")
    torch.testing.assert_close(group[:3], (rewards[:3] - 2.0) / (rewards[:3].std(unbiased=False) + 1e-4))
    batch = group_advantages(rewards, 3, std="batch", clip=100.0)
    torch.testing.assert_close(batch[:3], (rewards[:3] - 2.0) / (rewards.std(unbiased=False) + 1e-4))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), 4, std="group", clip=1.5)
    assert float(clipped.max()) == 1.5 and float(clipped.min()) >= -1.5
    single = group_advantages(torch.tensor([1.0, 3.0]), 1, std="batch")
    torch.testing.assert_close(single, torch.tensor([-1.0, 1.0]) / (1.0 + 1e-4))
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(rewards, 4)


def test_a_group_whose_images_scored_alike_gets_exactly_zero_advantage() -> None:
    # Eight equal scores whose float32 mean is not the score itself (eight 1/3s, an OCR score of
    # one wrong glyph in three): without the exact zero, the group std's eps made it a ~3e-4 advantage.
    from opdkit.training.losses import flat_groups, kept_sample_weights

    alike = torch.full((8,), 1 / 3)
    assert float((alike - alike.mean()).abs().max()) > 0  # the residue this test is about
    rewards = torch.cat([alike, torch.linspace(0.0, 1.0, 8)])
    assert flat_groups(rewards, 8).tolist() == [True, False]
    for std in ("group", "batch"):
        adv = group_advantages(rewards, 8, std=std)
        assert torch.equal(adv[:8], torch.zeros(8)) and bool((adv[8:] != 0).all())
        assert torch.equal(kept_sample_weights(adv)[:8], torch.zeros(8))  # drop_zero_advantage drops it
    assert torch.equal(group_advantages(alike, 1), torch.zeros(8))  # groups of one: the batch is the group


def test_clipped_policy_loss() -> None:
    old = torch.zeros(4)
    log_prob = torch.tensor([0.0, 0.1, -0.1, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, ratio = clipped_policy_loss(log_prob, old, adv, clip_range=0.05)
    torch.testing.assert_close(ratio, torch.exp(log_prob.detach()))
    e = math.exp(0.1)
    # Positive advantage above 1 + eps and negative advantage below 1 - eps: clipped, no gradient.
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.05, 0.95, e]))
    loss.sum().backward()
    assert log_prob.grad is not None
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0, 0.0, 0.0, e]))


def test_weighted_reward_sum_and_subscores() -> None:
    def build(name: str, params: dict[str, Any]) -> Any:
        scale = params.get("scale", 1.0)

        def fn(images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            value = images.mean(dim=(1, 2, 3)) * scale
            return {"score": value, "double": 2 * value} if name == "a" else {"score": value}

        return fn

    specs = [RewardSpec(type="a", weight=3.0), RewardSpec(type="b", weight=1.0, params={"scale": -2.0}, name="neg")]
    reward = WeightedReward(specs, build=build)
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = reward(images, ["p"] * 5, [{}] * 5)
    m = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.total, 3.0 * m + 1.0 * (-2.0 * m))
    assert sorted(out.parts) == ["a", "a/double", "neg"]
    torch.testing.assert_close(out.parts["a/double"], 2 * m)
    with pytest.raises(OpdkitError, match="unique"):
        WeightedReward([RewardSpec(type="a"), RewardSpec(type="a")], build=build)

    def broken(name: str, params: dict[str, Any]) -> Any:
        return lambda images, prompts, records: {"value": images.mean()}

    with pytest.raises(OpdkitError, match="'score'"):
        WeightedReward([RewardSpec(type="x")], build=broken)(images, ["p"] * 5, [{}] * 5)


def test_reward_tags_score_only_their_prompts() -> None:
    calls: list[int] = []

    def build(name: str, params: dict[str, Any]) -> Any:
        def fn(images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            assert name != "ocr" or all(r["tag"] == "ocr" for r in records)  # never sees other prompts
            calls.append(len(records))
            return {"score": torch.ones(len(records)) * (2.0 if name == "ocr" else 1.0)}

        return fn

    specs = [RewardSpec(type="ocr", weight=1.0, tags=["ocr"]), RewardSpec(type="all", weight=0.5)]
    records = [{"tag": "ocr"}, {"tag": "colors"}, {"tag": "ocr"}]
    out = WeightedReward(specs, build=build)(torch.zeros(3, 3, 4, 4), ["p"] * 3, records)
    assert calls == [2, 3]
    torch.testing.assert_close(out.total, torch.tensor([2.5, 0.5, 2.5]))
    assert torch.isnan(out.parts["ocr"][1]) and summarize(out.parts["ocr"])["mean"] == 2.0
    none = WeightedReward(specs, build=build)(torch.zeros(1, 3, 4, 4), ["p"], [{"tag": "colors"}])
    assert summarize(none.parts["ocr"])["mean"] is None


def test_balanced_tags() -> None:
    records = [{"prompt": f"o{i}", "tag": "ocr"} for i in range(90)] + [{"prompt": f"c{i}", "tag": "colors"} for i in range(3)]
    records += [{"prompt": f"p{i}", "tag": "position"} for i in range(7)]
    drawn = step_prompts(records, seed=0, step=1, batch_size=6, group_size=1, balance_tags=True)
    tags = [records[i]["tag"] for i in drawn.indices]
    assert sorted(tags) == ["colors", "colors", "ocr", "ocr", "position", "position"]
    assert len(set(drawn.indices)) == 6
    plain = step_prompts(records, seed=0, step=1, batch_size=6, group_size=1)
    assert len(set(plain.indices)) == 6


def test_weighted_reward_with_builtin_plugins() -> None:
    reward = WeightedReward([RewardSpec(type="shapes_quality", weight=2.0), RewardSpec(type="shapes_ocr")])
    images = torch.ones(2, 3, 32, 32)
    records = [{"prompt": 'a sign that says "K7"', "tag": "ocr", "text": "K7"}] * 2
    out = reward(images, [r["prompt"] for r in records], records)
    torch.testing.assert_close(out.total, 2.0 * out.parts["shapes_quality"] + out.parts["shapes_ocr"])


def test_ema_schedule_and_swap() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA(["w"], [p], decay=0.5, every=2)
    with torch.no_grad():
        p.fill_(4.0)
    assert not ema.update([p], 1)  # not a multiple of every
    assert ema.update([p], 2)
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 2.0))
    with ema.applied([p]):
        torch.testing.assert_close(p.detach(), torch.full((3,), 2.0))
    torch.testing.assert_close(p.detach(), torch.full((3,), 4.0))
    again = EMA(["w"], [p], decay=0.5, every=2)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow[0], ema.shadow[0])


def test_step_prompts_split_whole_groups_across_ranks() -> None:
    records = [{"prompt": f"p{i}"} for i in range(20)]
    one = step_prompts(records, seed=3, step=7, batch_size=4, group_size=3)
    assert len(set(one.indices)) == 4 and len(one.records) == 12 and len(one.seeds) == 12
    assert [r["prompt"] for r in one.records[:3]] == [f"p{one.indices[0]}"] * 3
    again = step_prompts(records, seed=3, step=7, batch_size=4, group_size=3)
    assert again.indices == one.indices and again.seeds == one.seeds
    other = step_prompts(records, seed=3, step=8, batch_size=4, group_size=3)
    assert other.seeds != one.seeds
    ranks = [step_prompts(records, seed=3, step=7, batch_size=4, group_size=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].indices + ranks[1].indices == one.indices
    assert ranks[0].seeds + ranks[1].seeds == one.seeds
    with pytest.raises(OpdkitError, match="divisible"):
        step_prompts(records, seed=3, step=7, batch_size=3, group_size=3, world_size=2)
    few = step_prompts(records[:2], seed=0, step=1, batch_size=5, group_size=1)
    assert len(few.indices) == 5 and set(few.indices) <= {0, 1}


def test_setup_trainable_lora_targets_and_alpha() -> None:
    from opdkit.registry import models

    model = models.build("shapes_new", TINY_SHAPES)
    trainable = setup_trainable(model, LoraSpec(rank=2, alpha=4, targets=["to_q"]))
    assert trainable.lora and trainable.params and all("to_q" in n for n in trainable.names)
    trained = {id(p) for p in trainable.params}
    assert not any(p.requires_grad for p in model.transformer.parameters() if id(p) not in trained)
    assert not any(p.requires_grad for e in model.text_encoders for p in e.parameters())
    with pytest.raises(OpdkitError, match="matched no module"):
        setup_trainable(models.build("shapes_new", TINY_SHAPES), LoraSpec(targets=["no_such_layer"]))
    with pytest.raises(OpdkitError, match="whole number"):
        setup_trainable(models.build("shapes_new", TINY_SHAPES), LoraSpec(alpha=2.5))
    half = models.build("shapes_new", TINY_SHAPES)
    half.transformer.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="full fine-tuning of a bfloat16 transformer"):
        setup_trainable(half, None)


def test_precision_falls_back_to_fp32_on_cpu() -> None:
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    with pytest.warns(UserWarning, match="fp32"):
        assert autocast_dtype("bf16", torch.device("cpu")) is None


def test_average_gradients_single_process_is_identity_and_checksum() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    average_gradients([p], 1)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))
    q = torch.nn.Parameter(torch.ones(2))
    assert parameters_sha256([p]) == parameters_sha256([q])
    with torch.no_grad():
        q.add_(1e-7)
    assert parameters_sha256([p]) != parameters_sha256([q])


def test_scheduled_lr_warmup_then_constant_or_cosine() -> None:
    from opdkit.recipe import TrainSpec

    constant = TrainSpec(seed=0, lr=1e-3, warmup_steps=2, max_steps=6)
    assert [scheduled_lr(constant, s) for s in range(1, 7)] == pytest.approx([5e-4] + [1e-3] * 5)
    cosine = TrainSpec(seed=0, lr=1e-3, warmup_steps=2, max_steps=6, lr_decay="cosine")
    expected = [5e-4, 1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert [scheduled_lr(cosine, s) for s in range(1, 7)] == pytest.approx(expected, abs=1e-12)


def test_lr_decay_steps_stops_early_on_the_longer_schedule() -> None:
    """``lr_decay_steps`` > ``max_steps``: the run's lr is the first steps of the longer cosine."""
    from opdkit.recipe import TrainSpec

    full = TrainSpec(seed=0, lr=1e-3, warmup_steps=2, max_steps=10, lr_decay="cosine")
    early = TrainSpec(seed=0, lr=1e-3, warmup_steps=2, max_steps=7, lr_decay="cosine", lr_decay_steps=10)
    assert [scheduled_lr(early, s) for s in range(1, 8)] == [scheduled_lr(full, s) for s in range(1, 8)]
    assert scheduled_lr(early, 7) > 0.0


@pytest.mark.parametrize("scaling", ["flow_grpo", "exact"])
def test_sampled_kl_advantage_has_the_gradient_that_direct_and_mar_carry(scaling: str) -> None:
    """At D = 1,024 dims the policy gradient of OPD's sampled advantage, through the PPO ratio at
    its first step, is grad(KL) itself: the gradient of minimising the KL directly (loss_mode
    direct) and of MAR, at the same weight (Monte Carlo, within 5%)."""
    from opdkit.sampling import gaussian_log_prob
    from opdkit.training.losses import sampled_kl_advantage

    gen = torch.Generator().manual_seed(0)
    n, s_t, dt, shape = 20_000, 0.9, -0.1, (4, 16, 16)
    std = torch.full((n,), s_t * math.sqrt(-dt))
    mu = torch.nn.Parameter(torch.randn(1, *shape, generator=gen))
    mu_teacher = (mu.detach() + 0.05 * torch.randn(1, *shape, generator=gen)).expand(n, *shape)
    draws = (mu.detach() + std.view(-1, 1, 1, 1) * torch.randn(n, *shape, generator=gen)).detach()
    log_prob_old = gaussian_log_prob(draws, mu.detach().expand_as(draws), std.view(-1, 1, 1, 1))

    direct = torch.autograd.grad(gaussian_kl(mu.expand(n, *shape), mu_teacher, std, dt, scaling).mean(), mu)[0]
    estimate = sampled_kl(log_prob_old, draws, mu_teacher, std, dt, scaling)
    # exact: the estimate sums the D dims (about 16 here), so the default clip of 5 would bind
    advantage = sampled_kl_advantage(estimate, draws, pool=1, clip=5.0 if scaling == "flow_grpo" else math.inf)
    log_prob = gaussian_log_prob(draws, mu.expand_as(draws), std.view(-1, 1, 1, 1))
    loss, ratio = clipped_policy_loss(log_prob, log_prob_old, advantage, clip_range=1e-4)
    assert torch.equal(ratio, torch.ones(n))
    through_ratio = torch.autograd.grad(loss.mean(), mu)[0]
    along = float((through_ratio * direct).sum() / direct.pow(2).sum())  # its component along grad(KL)
    assert 0.95 < along < 1.05, along


def test_kept_sample_weights_average_over_the_nonzero_advantages() -> None:
    from opdkit.training.losses import kept_sample_weights

    weights = kept_sample_weights(torch.tensor([0.0, 1.5, -0.5, 0.0]))
    assert torch.equal(weights, torch.tensor([0.0, 2.0, 2.0, 0.0]))
    loss = torch.tensor([7.0, 1.0, 3.0, 9.0])
    assert float((weights * loss).mean()) == 2.0  # the mean over the two kept samples
    assert torch.equal(kept_sample_weights(torch.zeros(3)), torch.zeros(3))


def test_dropped_samples_leave_the_same_update_however_micro_batch_splits_it() -> None:
    # One update of 8 samples (a flat group of 4, then a group that learns), summed the way
    # sweep_updates sums it: the mean of each micro-batch's weighted loss, over the update's
    # micro-batches. It must be the mean over the 4 kept samples at every micro_batch.
    from types import SimpleNamespace

    from opdkit.methods.grpo import Grpo

    advantages = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, -0.5])
    loss = torch.arange(1.0, 9.0)
    for micro_batch in (8, 4, 2):
        chunks = [slice(i, i + micro_batch) for i in range(0, 8, micro_batch)]
        grpo = SimpleNamespace(
            batch=SimpleNamespace(chunks=lambda chunks=chunks: chunks),
            ctx=SimpleNamespace(train=SimpleNamespace(grad_accum=len(chunks))), advantages=advantages,
        )  # fmt: skip
        update = sum(float((Grpo._kept_weights(grpo, c, rows) * loss[rows]).mean()) for c, rows in enumerate(chunks)) / len(chunks)
        assert update == float(loss[4:].mean()), micro_batch  # was half of it when a micro-batch held only the flat group


def test_detach_uncond_keeps_the_values_and_drops_the_unconditional_gradient() -> None:
    from opdkit.registry import models
    from opdkit.sampling import guided_velocity

    model = models.build("shapes_new", {"patch_size": 4, "num_layers": 1, "num_heads": 2, "head_dim": 8, "seed": 0})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cond, uncond = model.encode_prompts(["a red circle", "a blue square"]), model.uncond(2)
    weight = next(p for p in model.transformer.parameters() if p.ndim == 2)
    grads = {}
    for detach in (False, True):
        v = guided_velocity(model, x, 0.5, cond, uncond, 3.0, detach_uncond=detach)
        grads[detach] = (torch.autograd.grad(v.pow(2).mean(), weight)[0], v.detach())
    assert torch.equal(grads[False][1], grads[True][1])  # the same guided velocity
    assert not torch.allclose(grads[False][0], grads[True][0])  # but another gradient


def test_ema_warmup_lowers_the_first_decays() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA(["p"], [p], decay=0.9, every=1, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.9
    assert EMA(["p"], [p], decay=0.9, every=1).decay_at(1) == 0.9  # off by default
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p], 1)
    assert float(ema.shadow[0]) == pytest.approx(1.0 - 2 / 11)


def test_absurd_rewards_stop_the_run_unless_the_reward_declares_its_range() -> None:
    def builder(name: str, params: dict[str, Any]) -> Any:
        def reward(images: torch.Tensor, prompts: list[str], records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return {"score": torch.full((images.shape[0],), 1e7)}

        if params.get("declared"):
            reward.score_range = (0.0, 1e9)  # type: ignore[attr-defined]
        return reward

    images, prompts, records = torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}]
    with pytest.raises(OpdkitError, match=r"rewards\.0: reward 'big' returned 1e\+07\.\.1e\+07, outside"):
        WeightedReward([RewardSpec(type="big")], build=builder)(images, prompts, records)
    declared = WeightedReward([RewardSpec(type="big", params={"declared": True})], build=builder)(images, prompts, records)
    assert torch.equal(declared.total, torch.full((2,), 1e7))


def test_tensors_sha256_reads_the_tensors_not_the_metadata(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    from opdkit.checkpoint import tensors_sha256

    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    save_file(weights, tmp_path / "one.safetensors", metadata={"x": "1", "y": "2"})
    save_file(weights, tmp_path / "two.safetensors", metadata={"y": "2", "x": "1", "note": "rewritten"})
    save_file({**weights, "b": torch.zeros(4, dtype=torch.float16)}, tmp_path / "other.safetensors")
    assert tensors_sha256(tmp_path / "one.safetensors") == tensors_sha256(tmp_path / "two.safetensors")
    assert tensors_sha256(tmp_path / "one.safetensors") != tensors_sha256(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(OpdkitError, match=r"junk.safetensors: not a readable safetensors file"):
        tensors_sha256(tmp_path / "junk.safetensors")


def test_a_checkpoint_of_another_shape_is_refused_not_broadcast(tmp_path: Any) -> None:
    """copy_ broadcasts: a (1, n) tensor would overwrite every row of an (m, n) weight. Loading a
    checkpoint checks each shape first and names the file, the tensor and both shapes."""
    from safetensors.torch import save_file

    from opdkit.checkpoint import load_module_state, load_training_state, save_training_state

    module = torch.nn.Linear(4, 3)
    before = module.weight.detach().clone()
    with pytest.raises(OpdkitError, match=r"^x\.safetensors: weight has shape \(1, 4\), the model expects \(3, 4\)$"):
        load_module_state(module, {"weight": torch.ones(1, 4)}, "x.safetensors")
    assert torch.equal(module.weight.detach(), before)
    with pytest.raises(OpdkitError, match=r"x\.safetensors: 1 tensors are not in the model \(first: extra\)"):
        load_module_state(module, {"extra": torch.ones(1)}, "x.safetensors")
    with pytest.raises(OpdkitError, match=r"x\.safetensors: lacks 1 of the 2 tensors of the model \(first: bias\)"):
        load_module_state(module, {"weight": torch.ones(3, 4)}, "x.safetensors", complete=True)
    # a resumed run's checkpoint goes through the same check
    save_training_state(tmp_path / "step", {"policy": module}, None, {"step": 1})
    save_file({"weight": torch.ones(1, 4), "bias": torch.ones(3)}, tmp_path / "step" / "policy.safetensors")
    with pytest.raises(OpdkitError, match=r"step/policy\.safetensors: weight has shape \(1, 4\), the model expects \(3, 4\)"):
        load_training_state(tmp_path / "step", {"policy": module}, None)
    assert torch.equal(module.weight.detach(), before)


def test_tensors_sha256_is_remembered_only_while_the_file_is_untouched(tmp_path: Any, monkeypatch: Any) -> None:
    """A teacher is hashed once per process, and hashed again once its file was written, even in
    place with its old modification time put back (``cp -p``)."""
    import os

    from safetensors.torch import save_file

    import opdkit.checkpoint
    from opdkit.checkpoint import tensors_sha256

    reads: list[Any] = []
    real = opdkit.checkpoint._hash_tensors
    monkeypatch.setattr(opdkit.checkpoint, "_hash_tensors", lambda path: reads.append(path) or real(path))
    file, other = tmp_path / "teacher.safetensors", tmp_path / "other.safetensors"
    save_file({"w": torch.ones(8)}, file)
    save_file({"w": torch.zeros(8)}, other)
    first = tensors_sha256(file)
    assert (tensors_sha256(file), len(reads)) == (first, 1)
    before = file.stat()
    file.write_bytes(other.read_bytes())  # same size, same inode
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert tensors_sha256(file) == tensors_sha256(other) != first
    assert len(reads) == 3  # the rewritten file once more, and the other file


def test_a_resumed_run_judges_its_teachers_by_their_weights(tmp_path: Any) -> None:
    from opdkit.rundir import RunDir

    def recipe(path: str) -> dict[str, Any]:
        return {"method": "opd", "teachers": [{"name": "ocr", "type": "lora", "path": path}], "train": {"lr": 1e-3}}

    rundir = RunDir(tmp_path / "run")
    entry = rundir.check_start(recipe("a/ocr"), "base0", resume=False, overwrite=False, teachers=lambda: {"ocr": "w1"})
    rundir.prepare("", False, recipe=recipe("a/ocr"), entry=entry)
    assert rundir.read_info()["teacher_weights"] == {"ocr": "w1"}

    def resume(path: str, weights: str) -> dict[str, Any]:
        return rundir.check_start(recipe(path), "base0", resume=True, overwrite=False, teachers=lambda: {"ocr": weights})

    assert resume("b/ocr", "w1")["changed"] == {"teachers.0.path": ["a/ocr", "b/ocr"]}  # moved: the same teacher
    with pytest.raises(OpdkitError, match=r"teachers.0.weights: 'w1' -> 'w2'"):
        resume("a/ocr", "w2")  # retrained at its old path: another teacher
    with pytest.raises(OpdkitError, match=r"teachers.0.path: 'a/ocr' -> 'b/ocr'; teachers.0.weights"):
        resume("b/ocr", "w2")


def test_resume_refuses_another_max_steps_where_a_cosine_lr_ends_there(tmp_path: Any) -> None:
    from opdkit.rundir import RunDir, recipe_fingerprint

    def recipe(max_steps: int, **train: Any) -> dict[str, Any]:
        return {"method": "grpo", "train": {"lr": 1e-3, "max_steps": max_steps, **train}}

    def resume(folder: str, started: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
        rundir = RunDir(tmp_path / folder)
        rundir.prepare("", False, recipe=started, entry=rundir.check_start(started, "b", resume=False, overwrite=False))
        return rundir.check_start(now, "b", resume=True, overwrite=False)

    # a constant lr, or a cosine ending at lr_decay_steps: more steps extend the same schedule
    assert resume("constant", recipe(100), recipe(200))["changed"] == {"train.max_steps": [100, 200]}
    ending = {"lr_decay": "cosine", "lr_decay_steps": 300}
    assert resume("decay_steps", recipe(100, **ending), recipe(200, **ending))["changed"] == {"train.max_steps": [100, 200]}
    # a cosine ending at max_steps: step 101 of a 200-step run is not step 101 of the 100-step one
    cosine = {"lr_decay": "cosine"}
    with pytest.raises(OpdkitError, match=r"cosine lr ends at its train.max_steps.*resume with train.max_steps 100"):
        resume("cosine", recipe(100, **cosine), recipe(200, **cosine))
    assert recipe_fingerprint(recipe(100)) == recipe_fingerprint(recipe(200))
    assert recipe_fingerprint(recipe(100, **cosine)) != recipe_fingerprint(recipe(200, **cosine))


def test_an_fp16_step_the_scaler_skips_moves_neither_the_weights_nor_the_ema() -> None:
    from opdkit.training.loop import Optimization
    from opdkit.training.trainable import EMA

    p = torch.nn.Parameter(torch.ones(3))
    ema = EMA(["p"], [p], decay=0.5, every=1)
    optim = Optimization([p], torch.optim.AdamW([p], lr=0.1), torch.amp.GradScaler("cpu", enabled=True), ema, None, world=1)
    optim.backward((p * torch.tensor([1.0, float("inf"), 1.0])).sum())  # an fp16 overflow
    optim.step()
    assert torch.equal(p.detach(), torch.ones(3)) and optim.steps == 0 and torch.equal(ema.shadow[0], torch.ones(3))
    assert optim.scaler.get_scale() < 65536.0
    optim.backward(p.sum())
    optim.step()
    assert optim.steps == 1 and not torch.equal(p.detach(), torch.ones(3)) and not torch.equal(ema.shadow[0], torch.ones(3))
