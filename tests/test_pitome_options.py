"""PiToMe's ablation options: the adaptive margin (margin_quantile) and the random split."""

import numpy as np
import pytest
import torch

import pitome
from pitome.algorithms.base import MergeRequest
from pitome.algorithms.pitome import PiToMe, energy_scores, similarity_quantile


def _request(metric, r, layer=3, valid=None, generator=None):
    r = torch.as_tensor(r)
    return MergeRequest(metric=metric, r=r, r_max=int(r.max()), r_min=int(r.min()), num_protected=1, valid=valid,
                        layer=layer, num_layers=12, generator=generator)


def test_similarity_quantile_matches_numpy_on_valid_off_diagonal_pairs():
    torch.manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(2, 9, 5), dim=-1)
    sim = k @ k.transpose(1, 2)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    for q in (0.0, 0.3, 0.5, 0.9, 1.0):
        got = similarity_quantile(sim, q, valid)
        for b in range(2):
            n = int(valid[b].sum())
            s = sim[b, :n, :n].numpy()
            values = np.sort(s[~np.eye(n, dtype=bool)])
            assert got[b].item() == pytest.approx(values[int(np.floor(q * (len(values) - 1)))])


def test_quantile_margin_equals_fixed_margin_with_that_value():
    """margin_quantile=q gives the same plan as the fixed margin equal to that sample's quantile."""
    torch.manual_seed(1)
    metric = torch.randn(1, 33, 16)
    request = _request(metric, [8])
    k = torch.nn.functional.normalize(metric[:, 1:].float(), dim=-1)
    m = similarity_quantile(k @ k.transpose(1, 2), 0.7).item()
    adaptive = PiToMe(margin_quantile=0.7).plan(request)
    fixed = PiToMe(margin=m, margin_decay=0.0).plan(request)
    other = PiToMe(margin=0.95, margin_decay=0.0, energy="paper").plan(request)
    assert torch.equal(adaptive.assign, fixed.assign)
    assert not torch.equal(adaptive.assign, other.assign)


def test_energy_accepts_one_margin_per_sample():
    torch.manual_seed(2)
    k = torch.nn.functional.normalize(torch.randn(2, 10, 4), dim=-1)
    sim = k @ k.transpose(1, 2)
    margins = torch.tensor([0.2, 0.6]).view(-1, 1, 1)
    for kind in ("elu", "paper", "gaussian"):
        both = energy_scores(sim, margins, kind)
        for b, m in enumerate((0.2, 0.6)):
            assert torch.allclose(both[b], energy_scores(sim[b:b + 1], m, kind)[0])


def test_random_split_is_seeded_and_differs_from_alternate():
    torch.manual_seed(3)
    metric = torch.randn(2, 65, 16)
    plans = {}
    for name, gen_seed in (("a", 0), ("b", 0), ("c", 1)):
        gen = torch.Generator().manual_seed(gen_seed)
        plans[name] = PiToMe(split="random").plan(_request(metric, [16, 10], generator=gen)).assign
    alternate = PiToMe(split="alternate").plan(_request(metric, [16, 10])).assign
    assert torch.equal(plans["a"], plans["b"])
    assert not torch.equal(plans["a"], plans["c"])
    assert not torch.equal(plans["a"], alternate)


def test_random_split_merges_only_the_top_energy_candidates():
    """Whatever the split, exactly r tokens merge and all of them come from the 2r highest-energy tokens."""
    torch.manual_seed(4)
    metric = torch.randn(1, 41, 8)
    request = _request(metric, [7])
    assign = PiToMe(split="random").plan(request).assign[0]
    k = torch.nn.functional.normalize(metric[:, 1:], dim=-1)
    energy = energy_scores(k @ k.transpose(1, 2), PiToMe().layer_margin(3, 12))
    top = set((torch.argsort(energy[0], descending=True, stable=True)[:14] + 1).tolist())
    slots, counts = torch.unique(assign, return_counts=True)
    assert len(slots) == 41 - 7 and int(counts.max()) >= 2
    shared = {i for i in range(41) if int(counts[slots == assign[i]]) > 1}
    assert len(shared) - int((counts > 1).sum()) == 7  # r tokens merged away
    assert shared <= top


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True])
def test_bad_margin_quantile_raises(bad):
    with pytest.raises(ValueError, match="margin_quantile"):
        PiToMe(margin_quantile=bad)


def test_new_options_pass_through_patch(make_vit, images):
    model, x = make_vit(), images(2)
    with torch.no_grad():
        for options in (dict(margin_quantile=0.8), dict(split="random"), dict(margin_quantile=0.5, energy="gaussian")):
            pitome.patch(model, ratio=0.8, seed=0, **options)
            out = model(x)
            assert torch.isfinite(out).all()
            assert pitome.info(model).tokens_per_layer[-1] < pitome.info(model).tokens_per_layer[0]
    with pytest.raises(ValueError, match="split"):
        pitome.patch(model, ratio=0.8, split="shuffle")


@pytest.mark.parametrize("kind", ["elu", "paper", "gaussian"])
def test_energy_fast_path_equals_the_plain_formula_chunked_or_not(kind, monkeypatch):
    """The in-place energy (three row sums, row chunks for long sequences) equals the plain, differentiable formula,
    with padding columns and a per-sample margin, and leaves its input untouched."""
    import pitome.algorithms.pitome as module

    torch.manual_seed(4)
    k = torch.nn.functional.normalize(torch.randn(2, 40, 8), dim=-1)
    sim = k @ k.transpose(1, 2)
    valid = torch.rand(2, 40) > 0.25
    margins = (0.3, torch.tensor([0.1, 0.7]).view(-1, 1, 1))
    for margin in margins:
        plain = energy_scores(sim.clone().requires_grad_(), margin, kind, 1.5, valid).detach()
        before = sim.clone()
        fast = energy_scores(sim, margin, kind, 1.5, valid)
        assert torch.equal(sim, before)
        torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)
        monkeypatch.setattr(module, "ENERGY_CHUNK_TOKENS", 16)
        monkeypatch.setattr(module, "ENERGY_CHUNK_ELEMENTS", 2 * 40 * 7)  # 7 rows per chunk
        torch.testing.assert_close(energy_scores(sim, margin, kind, 1.5, valid), plain, atol=1e-6, rtol=1e-6)
        monkeypatch.undo()
