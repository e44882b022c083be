"""LoRA merging on weight deltas (OPD cold start)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdkit.errors import OpdkitError
from opdkit.models.lora import LoraFile, read_lora, write_lora
from opdkit.models.merge import merge_files, merge_loras, ties_merge


def random_lora(seed: int, rank: int = 4, alpha: float = 8.0, modules: int = 3) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    factors = {f"blocks.{i}.attn.to_q": (torch.randn(rank, 12, generator=g), torch.randn(10, rank, generator=g)) for i in range(modules)}
    return LoraFile(factors, rank, alpha, ["to_q"])


def test_mean_merge_equals_mean_of_products_exactly() -> None:
    loras = [random_lora(0), random_lora(1, rank=2, alpha=2.0), random_lora(2)]
    merged = merge_loras(loras, "mean")
    assert merged.rank == 10
    for module in loras[0].factors:
        expected = sum(lora.delta(module) for lora in loras) / 3
        torch.testing.assert_close(merged.delta(module), expected, rtol=1e-10, atol=1e-10)
        # and it is not what averaging A and B separately gives
        naive = torch.stack([lo.factors[module][1] for lo in loras[::2]]).mean(0) @ torch.stack([lo.factors[module][0] for lo in loras[::2]]).mean(0)
        assert not torch.allclose(2.0 * naive.double(), expected, atol=1e-3)


def test_weighted_merge_and_svd_compression() -> None:
    loras = [random_lora(3), random_lora(4)]
    merged = merge_loras(loras, "weighted", weights=[0.75, 0.25])
    full_rank = merge_loras(loras, "weighted", weights=[0.75, 0.25], rank=8)  # 8 = 4 + 4: lossless
    small = merge_loras(loras, "weighted", weights=[0.75, 0.25], rank=2)
    for module in loras[0].factors:
        expected = 0.75 * loras[0].delta(module) + 0.25 * loras[1].delta(module)
        torch.testing.assert_close(merged.delta(module), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(full_rank.delta(module), expected, rtol=1e-8, atol=1e-8)
        # rank-2 truncation is the best rank-2 approximation: error = tail singular values
        s = torch.linalg.svdvals(expected)
        err = torch.linalg.matrix_norm(small.delta(module) - expected)
        torch.testing.assert_close(err, s[2:].norm(), rtol=1e-6, atol=1e-8)


def test_ties_trims_elects_sign_and_averages_agreeing_entries() -> None:
    d1 = torch.tensor([[4.0, -1.0], [2.0, 0.5]], dtype=torch.float64)
    d2 = torch.tensor([[2.0, 3.0], [-6.0, 0.1]], dtype=torch.float64)
    # density 0.5 keeps 2 of 4 entries each: d1 -> [[4, 0], [2, 0]], d2 -> [[0, 3], [-6, 0]]
    # signs of the sum: [[+, +], [-, 0]]; means over agreeing kept entries: [[4, 3], [-6, 0]]
    merged = ties_merge([d1, d2], [1.0, 1.0], density=0.5)
    torch.testing.assert_close(merged, torch.tensor([[4.0, 3.0], [-6.0, 0.0]], dtype=torch.float64))


def test_ties_of_an_adapter_with_itself_gives_it_back_at_any_weights() -> None:
    # The disjoint mean is weighted: dividing by the count of agreeing deltas instead shrank the
    # default 1/K weights' merge K-fold (two copies gave half the adapter, three a third).
    lora = random_lora(0)
    for copies, weights in ((2, None), (3, None), (2, [2.0, 1.0])):
        merged = merge_loras([lora] * copies, "ties", weights=weights, density=1.0, rank=lora.rank)
        for module in lora.factors:
            torch.testing.assert_close(merged.delta(module), lora.delta(module), rtol=1e-8, atol=1e-10)
    d1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d2 = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ties_merge([d1, d2], [3.0, 1.0], density=1.0), torch.tensor([[1.5, 0.0]], dtype=torch.float64))
    with pytest.raises(OpdkitError, match="ties weights must be positive"):
        merge_loras([lora, lora], "ties", weights=[1.0, 0.0])


def test_a_merge_keeps_its_inputs_base_and_refuses_two_bases() -> None:
    import dataclasses

    on_a = [dataclasses.replace(random_lora(i), base_fingerprint="base-a") for i in range(2)]
    for method in ("mean", "ties"):
        assert merge_loras(on_a, method).base_fingerprint == "base-a"  # refused on another base, as its inputs
    assert merge_loras([on_a[0], random_lora(2)]).base_fingerprint == "base-a"  # an input without one says nothing
    with pytest.raises(OpdkitError, match=r"trained on different base models \(base-a, base-b\)"):
        merge_loras([on_a[0], dataclasses.replace(random_lora(2), base_fingerprint="base-b")])


def test_files_round_trip_and_errors(tmp_path: Path) -> None:
    paths = [write_lora(random_lora(i), tmp_path / f"t{i}.safetensors") for i in range(2)]
    out = merge_files(paths, tmp_path / "merged.safetensors", method="ties", density=0.3)
    merged = read_lora(out)
    assert merged.rank == 4 and set(merged.factors) == set(random_lora(0).factors)
    with pytest.raises(OpdkitError, match="takes no weights"):
        merge_loras([random_lora(0)], "mean", weights=[1.0])
    with pytest.raises(OpdkitError, match="unknown"):
        merge_loras([random_lora(0)], "average")
    with pytest.raises(OpdkitError, match="no such adapter"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(OpdkitError, match="different modules"):
        merge_loras([random_lora(0, modules=2), random_lora(1, modules=3)])


def test_merged_file_loads_into_a_model_as_the_mean_delta(tmp_path: Path) -> None:
    from opdkit.models.loading import load_flow_model
    from opdkit.models.shapes import ShapesModelConfig, build_shapes_pipeline, shapes_vocabulary

    cfg = ShapesModelConfig(patch_size=4, num_layers=1, num_heads=2, head_dim=8, text_hidden_size=16, text_projection_dim=16)
    model = load_flow_model(build_shapes_pipeline(tmp_path / "m", shapes_vocabulary(), cfg), world="shapes")
    files = []
    for i in range(2):
        model.add_lora(f"t{i}", rank=2, alpha=4, target_modules=["to_q"])
        with torch.no_grad():
            for p in model.lora_parameters(f"t{i}"):
                p.normal_(generator=torch.Generator().manual_seed(i))
        files.append(model.save_lora(f"t{i}", tmp_path / f"t{i}.safetensors"))
    merged_path = merge_files(files, tmp_path / "merged.safetensors")
    model.load_lora(merged_path, "student")
    a, b = (read_lora(f) for f in files)
    module = next(iter(a.factors))
    layer = model.transformer.get_submodule(module)
    got = layer.scaling["student"] * (layer.lora_B["student"].weight.double() @ layer.lora_A["student"].weight.double())
    torch.testing.assert_close(got, (a.delta(module) + b.delta(module)) / 2, rtol=1e-5, atol=1e-6)
