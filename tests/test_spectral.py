"""Spectral distance (spec §3): Lemma 1 with the size-weighted coarse Laplacian, SD = 0 without merging,
PiToMe below ToMe on clustered tokens satisfying A1-A3, and the recorder on a patched model."""

from __future__ import annotations

import json

import pytest
import torch

import pitome
from pitome.spectral import (MergeRecorder, clustered_tokens, coarse_spectrum, coarsen, cumulative_distances,
                             layer_distances, lift, membership, merge_until, spectral_distance, spectrum,
                             synthetic_distances, token_graph)


def _random_partition(tokens: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    """Every group non-empty, the rest assigned at random, shuffled."""
    labels = torch.cat([torch.arange(groups), torch.randint(0, groups, (tokens - groups,), generator=gen)])
    return labels[torch.randperm(tokens, generator=gen)]


@pytest.mark.parametrize("kind", ["distance", "similarity"])
@pytest.mark.parametrize("seed", range(5))
def test_lemma1_lifted_spectrum_is_coarse_spectrum_plus_ones(kind: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(8, 60, (1,), generator=gen))
    groups = int(torch.randint(2, tokens, (1,), generator=gen))
    w = token_graph(torch.randn(tokens, 16, generator=gen), kind)
    labels = _random_partition(tokens, groups, gen)
    w_c, sizes = coarsen(w, labels)
    lifted = spectrum(lift(w_c, labels))
    expected = torch.sort(torch.cat([coarse_spectrum(w_c, sizes),
                                     torch.ones(tokens - groups, dtype=torch.float64)])).values
    assert torch.allclose(lifted, expected, atol=1e-10)


def test_plain_coarse_laplacian_does_not_satisfy_lemma1() -> None:
    """The caveat of the spec: without size weighting the coarse spectrum differs (so we size-weight)."""
    gen = torch.Generator().manual_seed(0)
    w = token_graph(torch.randn(30, 8, generator=gen))
    labels = _random_partition(30, 7, gen)
    w_c, _ = coarsen(w, labels)
    lifted = spectrum(lift(w_c, labels))
    plain = torch.sort(torch.cat([spectrum(w_c), torch.ones(23, dtype=torch.float64)])).values
    assert (lifted - plain).abs().max() > 1e-4


def test_graph_and_membership_basics() -> None:
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    w = token_graph(k)
    assert w.dtype == torch.float64 and torch.all(w.diagonal() == 0)
    assert w[0, 1] == pytest.approx(1.0) and w[0, 2] == pytest.approx(0.0)
    assert token_graph(-k, "similarity")[0, 1] == 0.0  # max(cos, 0)
    s = membership(torch.tensor([1, -1, 1, 0]))
    assert s.shape == (1, 2, 4) and s[0, :, 1].sum() == 0 and s[0, 1].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("kind", ["distance", "similarity"])
def test_sd_zero_without_merging_and_positive_with(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 12, generator=gen)
    w = token_graph(x, kind)
    identity = torch.arange(40).expand(2, 40)
    assert torch.all(spectral_distance(w, identity) == 0)
    relabelled = torch.randperm(40, generator=gen).expand(2, 40)  # singletons under other names: still no merge
    assert torch.allclose(spectral_distance(w, relabelled), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    merged = identity.clone()
    merged[:, 1] = 0
    assert torch.all(spectral_distance(w, merged) > 1e-6)


def test_sd_small_for_near_duplicates_large_for_opposites() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 16, generator=gen)
    x[1] = x[0] + 1e-4 * torch.randn(16, generator=gen)
    x[3] = -x[2]
    w = token_graph(x)
    twins = torch.arange(20)
    twins[1] = 0
    opposites = torch.arange(20)
    opposites[3] = 2
    assert spectral_distance(w, twins) < 1e-3 < spectral_distance(w, opposites)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="graph"):
        token_graph(torch.randn(3, 2), "cosine")
    with pytest.raises(ValueError, match="do not match"):
        spectral_distance(token_graph(torch.randn(5, 2)), torch.arange(4))
    with pytest.raises(ValueError, match="sizes"):
        clustered_tokens([3, 0])


def test_synthetic_clusters_satisfy_assumptions() -> None:
    sizes = (12, 8, 5, 3, 1)
    x, labels = clustered_tokens(sizes, dim=256, noise=1e-3, seed=0)
    k = x / x.norm(dim=-1, keepdim=True)
    cos = k @ k.T
    same = labels[:, None] == labels[None, :]
    assert cos[same].min() > 0.999          # A1: tight clusters
    assert cos[~same].max() < 0.5           # A2: a margin of 0.5 separates them
    assert torch.bincount(labels).tolist() == list(sizes)  # A3: non-increasing sizes


def test_merge_until_equal_budgets_reach_target() -> None:
    x, _ = clustered_tokens((10, 6, 3, 1), dim=64, seed=1)
    counts = {}
    for name in ("pitome", "tome"):
        steps = merge_until(pitome.create_algorithm(name), x, ratio=0.7, target=4)
        counts[name] = [n for n, _ in steps]
        assert counts[name][-1] == 4 and int(steps[-1][1].max()) == 3
    assert counts["pitome"] == counts["tome"]


def test_pitome_below_tome_on_clusters_satisfying_a1_a3() -> None:
    """Theorem 1 on seeded synthetic clusters: PiToMe recovers the clusters (SD ~1e-6) in every seed, so its SD is
    never above ToMe's; ToMe also recovers them in some seeds (seeds 3 and 8 here: a tie at ~1e-6), and in the
    others ends clearly higher (8 of 10 seeds)."""
    algorithms = {"pitome": pitome.create_algorithm("pitome", margin=0.5, margin_decay=0.0),
                  "tome": pitome.create_algorithm("tome")}
    result = synthetic_distances(algorithms, noise=1e-3, ratio=0.7, seeds=range(10), every_step=False)
    final = {name: [run[-1] for run in runs] for name, runs in result.items()}
    assert max(final["pitome"]) < 1e-5  # exact recovery in every seed (within-cluster noise only)
    for p, t in zip(final["pitome"], final["tome"]):
        assert p <= t + 1e-9  # never above ToMe
    clearly_lower = sum(t - p > 1e-4 for p, t in zip(final["pitome"], final["tome"]))
    assert clearly_lower >= 7, final
    assert sum(final["tome"]) / 10 > 1e-2


# --- on a patched model --------------------------------------------------------------------------------------

def test_recorder_and_distances_on_a_patched_vit(make_vit, images) -> None:
    model, x = make_vit(), images(batch=2)
    pitome.patch(model, algorithm="pitome", ratio=1.0)
    with MergeRecorder() as ref, torch.no_grad():
        model(x)
    assert len(ref.records) == 4 and all(r.plan is None for r in ref.records)
    assert all(torch.all(v == 0) for v in layer_distances(ref.records).values())
    pitome.patch(model, algorithm="pitome", ratio=0.8, trace_source=True)
    with MergeRecorder() as rec, torch.no_grad():
        model(x)
    info = pitome.info(model)
    assert [r.layer for r in rec.records] == [0, 1, 2, 3]
    assert [r.metric.shape[1] for r in rec.records] == info.tokens_per_layer[:4]
    assert all(r.num_protected == 1 and r.plan is not None for r in rec.records)
    per_layer = layer_distances(rec.records)
    cumulative = cumulative_distances(ref.records, info.source_history)
    assert all(v.shape == (2,) and torch.all(v > 0) for v in per_layer.values())
    # block 0: same graph (nothing merged before), same partition -> same number
    assert torch.allclose(per_layer[0], cumulative[0])
    pitome.unpatch(model)
    with pytest.raises(ValueError, match="ratio=1"):
        cumulative_distances(rec.records, info.source_history)


def test_recorder_is_off_outside_its_context(make_vit, images) -> None:
    model, x = make_vit(), images(batch=1)
    pitome.patch(model, algorithm="tome", ratio=0.8)
    with MergeRecorder() as rec, torch.no_grad():
        model(x)
    with torch.no_grad():
        model(x)
    assert len(rec.records) == 4


def test_cli_synthetic_writes_table(tmp_path) -> None:
    from pitome.cli import main

    code = main(["spectrum", "--synthetic", "--cluster-sizes", "12,8,5,3,2,1", "--dim", "128", "--seeds", "2",
                 "--algorithms", "pitome,tome", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    folder = next(tmp_path.iterdir())
    data = json.loads((folder / "spectrum_synthetic.json").read_text())
    assert set(data["results"]["0.001"]) == {"pitome", "tome"}
    assert "pitome vs tome: lower / tie / higher" in (folder / "spectrum_synthetic.md").read_text()


@pytest.mark.slow
def test_model_distances_equal_budgets(make_vit, images) -> None:
    from pitome.loading import LoadedModel
    from pitome.spectral_cli import format_model_tables, model_distances

    subject = LoadedModel("tiny", "tiny", make_vit(), "image", "timm", "random", "test model", image_size=(64, 64))
    batches = [(["a", "b"], images(batch=2)), (["c"], images(batch=1, seed=5))]
    result = model_distances(subject, ["pitome", "tome", "random"], 0.8, batches)
    assert not pitome.is_patched(subject.module)
    tokens = result["tokens"]
    assert tokens["pitome"] == tokens["tome"] == tokens["random"]
    for key in ("per_layer", "cumulative"):
        for name in ("pitome", "tome", "random"):
            assert sorted(result[key][name]) == [0, 1, 2, 3]
            assert all(len(v) == 3 and min(v) > 0 for v in result[key][name].values())
    table = format_model_tables(result, ["pitome", "tome", "random"], num_protected=1)
    assert "| 0 | 64 → 52 |" in table and "| sum |" in table


@pytest.mark.slow
def test_cli_model_mode_writes_table_and_plot(tmp_path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("skimage")
    from pitome.cli import main

    code = main(["spectrum", "--model", "timm:vit_tiny_patch16_224", "--weights", "random", "--images", "astronaut",
                 "--algorithms", "pitome,tome", "--ratios", "0.8", "--option", "layers=[0,1]", "--out", str(tmp_path),
                 "--device", "cpu"])
    assert code == 0  # 0 means equal token counts for every algorithm at every block
    folder = next(tmp_path.iterdir())
    data = json.loads((folder / "spectrum.json").read_text())
    assert set(data["per_layer"]) == {"pitome", "tome"} and data["inputs"] == ["astronaut"]
    assert sorted(data["per_layer"]["pitome"]) == ["0", "1"]
    assert (folder / "spectrum.png").stat().st_size > 1000
