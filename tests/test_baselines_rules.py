"""Each baseline's defining rule on small hand-made inputs: which tokens it keeps or merges, and the values.

Tokens are unit vectors at chosen angles, so every cosine similarity is known by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from pitome.algorithms import MergeRequest, create_algorithm
from pitome.algorithms.dct import dct_matrix, reduction_matrix
from pitome.plan import MergePlan


def angles(*degrees: float, head: int = 1) -> torch.Tensor:
    """(1, head + T, 2): protected tokens first (pointing along -x), then unit vectors at the given angles."""
    rad = torch.tensor([180.0] * head + list(degrees)) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1).unsqueeze(0)


def request(metric: torch.Tensor, r: int, head: int = 1, **extra) -> MergeRequest:
    batch = metric.shape[0]
    return MergeRequest(metric=metric, r=torch.full((batch,), r), r_max=r, r_min=r, num_protected=head, **extra)


def groups(plan: MergePlan, b: int = 0, head: int = 1) -> list[list[int]]:
    """Members of each output slot after the protected ones, as mergeable-token indices (dropped ones left out)."""
    out = []
    for slot in range(head, plan.num_out):
        out.append([i - head for i in range(plan.num_in) if int(plan.assign[b, i]) == slot])
    return out


def dropped(plan: MergePlan, b: int = 0, head: int = 1) -> list[int]:
    return [i - head for i in range(plan.num_in) if int(plan.assign[b, i]) < 0]


# --- kth ---------------------------------------------------------------------------------------------------------

def test_kth_every_kth_token_is_a_destination():
    # no protected token (the split counts them): k = 3: B = tokens 2 and 5; A = 0, 1, 3, 4.
    # Best edges: 1 -> 2 (3 deg), 0 -> 5 (5 deg), 4 -> 2 (20), 3 -> 2 (40)
    metric = angles(85, 3, 0, 40, 20, 90, head=0)
    plan = create_algorithm("kth", k=3).plan(request(metric, 2, head=0))
    # unmerged A by position, then B by position
    assert groups(plan, head=0) == [[3], [4], [1, 2], [0, 5]]
    x = torch.arange(6.0).view(1, 6, 1)
    out, size = plan.merge(x, torch.ones(1, 6))
    assert out.flatten().tolist() == [3.0, 4.0, (1.0 + 2.0) / 2, (0.0 + 5.0) / 2]
    assert size.flatten().tolist() == [1, 1, 2, 2]
    # with a class token in front, the split shifts by one: B = tokens 1 and 4 (sequence indices 2 and 5)
    shifted = create_algorithm("kth", k=3).plan(request(angles(85, 3, 0, 40, 20, 90), 2))
    # A = 0 (85), 2 (0), 3 (40), 5 (90); best edges 2 -> 1 (3 deg), 3 -> 4 (20 deg)
    assert groups(shifted) == [[0], [5], [1, 2], [3, 4]]


def test_kth_can_remove_all_of_a_and_k2_is_tome():
    kth = create_algorithm("kth", k=3)
    assert kth.max_removable(9) == 6 and kth.max_removable(2) == 0
    assert kth.max_removable(torch.tensor([9, 2])).tolist() == [6, 0]
    metric = torch.randn(2, 13, 8, generator=torch.Generator().manual_seed(0))
    req = request(metric, 5)
    assert torch.equal(create_algorithm("kth", k=2).plan(req).assign, create_algorithm("tome").plan(req).assign)


# --- tofu --------------------------------------------------------------------------------------------------------

def test_tofu_matches_like_tome_and_prunes_or_merges_by_layer():
    metric = torch.randn(2, 17, 8, generator=torch.Generator().manual_seed(1))
    tome = create_algorithm("tome").plan(request(metric, 5))
    tofu = create_algorithm("tofu")
    early = tofu.plan(request(metric, 5, layer=5, num_layers=12))  # prune for l < 12 // 2
    late = tofu.plan(request(metric, 5, layer=6, num_layers=12))
    assert late.norm == "max" and early.norm is None
    assert torch.equal(late.assign, tome.assign)
    # pruning: the A tokens ToMe would merge are dropped; everything else keeps ToMe's slot
    # ToMe's A tokens (even sequence positions) never receive merges: in a shared slot they are the ones that left
    shared = torch.stack([torch.bincount(row, minlength=tome.num_out)[row] > 1 for row in tome.assign])
    is_a = torch.tensor([i >= 1 and i % 2 == 0 for i in range(17)])  # A: even sequence indices (class token too)
    merged_away = shared & is_a
    assert int(merged_away.sum()) == 2 * 5
    assert torch.equal(early.assign < 0, merged_away)
    assert torch.equal(early.assign[~merged_away], tome.assign[~merged_away])
    assert early.num_out == late.num_out == 17 - 5


def test_tofu_layer_switch_options():
    tofu = create_algorithm("tofu", merge_from=2)
    assert [tofu.prunes(layer, 12) for layer in range(4)] == [True, True, False, False]
    assert all(create_algorithm("tofu", mode="prune").prunes(layer, 12) for layer in range(12))
    assert not any(create_algorithm("tofu", mode="mlerp").prunes(layer, 12) for layer in range(12))
    assert [create_algorithm("tofu").prunes(layer, 4) for layer in range(4)] == [True, True, False, False]


def test_tofu_mlerp_rescales_to_the_largest_member_norm():
    # A token 0 at 10 deg merges into B token 1 at 0 deg; token 2 (A, 90 deg) stays, B token 3 at 130 deg
    metric = angles(10, 0, 90, 130, head=2)  # class + distillation token: mergeable token 0 is in A
    plan = create_algorithm("tofu", mode="mlerp").plan(request(metric, 1, head=2))
    assert groups(plan, head=2) == [[2], [0, 1], [3]]
    x = torch.tensor([[[9.0, 9.0], [9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [0.0, 3.0]]])
    out, size = plan.merge(x, torch.ones(1, 6))
    mean = (x[0, 2] + x[0, 3]) / 2
    torch.testing.assert_close(out[0, 3], mean * 2.0 / mean.norm())  # largest member norm is 2
    assert torch.equal(out[0, [0, 1, 2, 4]], x[0, [0, 1, 4, 5]])  # single-member slots are untouched
    assert size.flatten().tolist() == [1, 1, 1, 2, 1]
    pruned = create_algorithm("tofu", mode="prune").plan(request(metric, 1, head=2))
    assert dropped(pruned, head=2) == [0] and groups(pruned, head=2) == [[2], [1], [3]]
    out, size = pruned.merge(x, torch.ones(1, 6))
    assert torch.equal(out[0], x[0, [0, 1, 4, 3, 5]]) and size.sum() == 5


# --- dct ---------------------------------------------------------------------------------------------------------

def test_dct_matches_scipy_transform_truncate_inverse():
    fft = pytest.importorskip("scipy.fft")
    g = torch.Generator().manual_seed(2)
    head, tokens, r = 1, 10, 4
    x = torch.randn(1, head + tokens, 3, generator=g, dtype=torch.float64)
    plan = create_algorithm("dct").plan(request(x.float(), r, head=head))
    out, size = plan.merge(x.float(), torch.ones(1, head + tokens))
    coeffs = fft.dct(x[0, head:].numpy(), type=2, norm="ortho", axis=0)[: tokens - r]
    expected = fft.idct(coeffs, type=2, norm="ortho", axis=0)
    assert out.shape == (1, head + tokens - r, 3)
    torch.testing.assert_close(out[0, head:], torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, :head], x[0, :head].float())
    torch.testing.assert_close(size.sum(), torch.tensor(float(head + tokens)))
    assert size[0, 0] == 1


def test_dct_norms_and_constant_sequences():
    assert torch.allclose(dct_matrix(7) @ dct_matrix(7).T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    const = torch.ones(8, 1)
    ortho = reduction_matrix(8, 2, "ortho") @ const
    mean = reduction_matrix(8, 2, "mean") @ const
    torch.testing.assert_close(ortho, torch.full((2, 1), 2.0))  # sqrt(8 / 2)
    torch.testing.assert_close(mean, torch.ones(2, 1))
    assert torch.equal(reduction_matrix(5, 5), torch.eye(5))


def test_dct_unmerge_restores_low_frequency_sequences_and_keeps_dtype():
    head, tokens, r = 1, 8, 3
    basis = dct_matrix(tokens)[: tokens - r].T.float()  # (T, T - r): a sequence made of low frequencies only
    low = basis @ torch.randn(tokens - r, 4, generator=torch.Generator().manual_seed(3))
    x = torch.cat([torch.zeros(1, 4), low]).unsqueeze(0)
    plan = create_algorithm("dct").plan(request(x, r, head=head))
    out, _ = plan.merge(x, torch.ones(1, head + tokens))
    torch.testing.assert_close(plan.unmerge(out), x, rtol=1e-4, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        half, _ = plan.merge(x.to(dtype), torch.ones(1, head + tokens))
        assert half.dtype == dtype
    # source map: each input goes where it contributes most; protected tokens stay in place
    assert plan.assign[0, 0] == 0 and plan.assign[0, 1:].min() >= 1 and plan.assign[0, 1:].max() < tokens - r + 1


# --- diffrate ----------------------------------------------------------------------------------------------------

def test_diffrate_prunes_least_attended_and_merges_next_into_most_similar_kept():
    # class attention: kept = 0 (0.3), 2 (0.2), 4 (0.15); merged = 1 (0.05), 5 (0.02); pruned = 3 (0.01)
    metric = angles(0, 5, 60, 170, 120, 58)
    attention = torch.tensor([[0.27, 0.3, 0.05, 0.2, 0.01, 0.15, 0.02]])
    plan = create_algorithm("diffrate", prune_fraction=1 / 3).plan(request(metric, 3, attention=attention))
    assert dropped(plan) == [3]
    assert groups(plan) == [[0, 1], [2, 5], [4]]  # by attention: 0, 2, 4
    x = torch.arange(7.0).view(1, 7, 1)
    out, size = plan.merge(x, torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0]]))
    assert out.flatten().tolist() == [0.0, (1.0 + 3 * 2.0) / 4, (3.0 + 6.0) / 2, 5.0]
    # default: everything merged, nothing pruned
    merged_only = create_algorithm("diffrate").plan(request(metric, 3, attention=attention))
    assert dropped(merged_only) == [] and groups(merged_only) == [[0, 1], [2, 5], [3, 4]]


def test_diffrate_budget_split_rounds_half_up():
    diffrate = create_algorithm("diffrate", prune_fraction=0.5)
    assert diffrate.split_budget(torch.tensor([0, 1, 2, 3, 5])).tolist() == [0, 1, 1, 2, 3]
    assert create_algorithm("diffrate", prune_fraction=1.0).split_budget(torch.tensor([4])).tolist() == [4]


# --- mctf --------------------------------------------------------------------------------------------------------

def _mctf(**options):
    return create_algorithm("mctf", **options)


def test_mctf_with_similarity_only_is_tome():
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(2, 15, 6, generator=g)
    attention = torch.rand(2, 15, generator=g)
    req = request(metric, 4, attention=attention)
    plan = _mctf(tau_info=None, tau_size=None, bidirectional=False, attention_weighted=False).plan(req)
    assert torch.equal(plan.assign, create_algorithm("tome").plan(req).assign)


def test_mctf_informativeness_fuses_the_less_attended_token_first():
    # A tokens 0 and 2 are equally similar to B token 1 (+-10 deg); only attention tells them apart
    metric = angles(10, 0, -10, 90, head=2)  # class + distillation token: mergeable 0 is in A
    attention = torch.tensor([[0.5, 0.5, 0.3, 0.1, 0.05, 0.05]])
    plan = _mctf(tau_size=None).plan(request(metric, 1, head=2, attention=attention))
    assert groups(plan, head=2) == [[0], [1, 2], [3]]
    attention = torch.tensor([[0.5, 0.5, 0.05, 0.1, 0.3, 0.05]])
    plan = _mctf(tau_size=None).plan(request(metric, 1, head=2, attention=attention))
    assert groups(plan, head=2) == [[2], [0, 1], [3]]


def test_mctf_size_criterion_spares_large_tokens():
    metric = angles(10, 0, -10, 90, head=2)  # class + distillation token: mergeable 0 is in A
    attention = torch.full((1, 6), 0.2)
    size = torch.tensor([[5.0, 1.0, 1.0, 1.0]])
    plan = _mctf().plan(request(metric, 1, head=2, attention=attention, size=size))
    assert groups(plan, head=2) == [[0], [1, 2], [3]]  # token 0 is big: token 2 goes instead
    plan = _mctf(tau_size=None).plan(request(metric, 1, head=2, attention=attention, size=size))
    assert groups(plan, head=2) == [[2], [0, 1], [3]]  # without the size criterion the tie goes to the lower position


def test_mctf_bidirectional_second_pass_and_attention_weighted_fusion():
    # A = 0, 2, 4; B = 1, 3, 5. Pass 1 (1 edge): 0 -> 1 (1 deg). Pass 2 (1 edge): B -> remaining A {2, 4}:
    # 5 -> 4 (2 deg) beats 3 -> 2 (30 deg) and 1 -> 2 (~60 deg)
    metric = angles(0, 1, 60, 90, 150, 152, head=2)
    attention = torch.tensor([[0.1, 0.1, 0.2, 0.1, 0.1, 0.1, 0.3, 0.1]])
    plan = _mctf(tau_info=None, tau_size=None).plan(request(metric, 2, head=2, attention=attention))
    assert groups(plan, head=2) == [[2], [4, 5], [0, 1], [3]]
    x = torch.arange(8.0).view(1, 8, 1) - 1.0  # mergeable token i has value i + 1
    out, _ = plan.merge(x, torch.ones(1, 8))
    torch.testing.assert_close(out[0, 3, 0], torch.tensor((0.3 * 5 + 0.1 * 6) / 0.4))
    torch.testing.assert_close(out[0, 4, 0], torch.tensor((0.2 * 1 + 0.1 * 2) / 0.3))


def test_mctf_second_pass_carries_earlier_merges_along():
    # pass 1: 0 -> 1 (1 deg); pass 2: B token 1 is closest to the remaining A token 2 (3 deg), so 0 follows it
    metric = angles(0, 1, 4, 90, head=2)
    attention = torch.full((1, 6), 0.2)
    plan = _mctf(tau_info=None, tau_size=None).plan(request(metric, 2, head=2, attention=attention))
    assert groups(plan, head=2) == [[0, 1, 2], [3]]


# --- crossget ----------------------------------------------------------------------------------------------------

def test_crossget_complete_graph_no_chains_and_mutual_pairs():
    # ranks by best similarity: 0, 1 (2 deg apart), 2, 3 (3 deg), 4. A token may only merge into a later one:
    # 0 -> 1 (2 deg) and 2 -> 3 (3 deg) are the two best edges; 1 cannot also leave (its partner ranks first)
    metric = angles(0, 2, 50, 53, 120)
    plan = create_algorithm("crossget").plan(request(metric, 2))
    assert groups(plan) == [[0, 1], [2, 3], [4]]
    # r = 3: sources by best later match are 0 (2 deg), 2 (3 deg), 1 (48 deg, to 2). Sources never receive, so
    # each goes to its most similar later non-source: 0 -> 3 (53 deg), 2 -> 3, 1 -> 3 (51 deg)
    plan = create_algorithm("crossget").plan(request(metric, 3))
    assert groups(plan) == [[0, 1, 2, 3], [4]]


def test_crossget_sources_and_destinations_are_disjoint_on_random_inputs():
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(3, 33, 8, generator=g)
    for r in (1, 8, 16):
        plan = create_algorithm("crossget").plan(request(metric, r))
        assert plan.num_out == 33 - r
        assert plan.assign.min() >= 0 and plan.assign.max() < plan.num_out
        for b in range(3):
            assert all(grp for grp in groups(plan, b))  # a chain would leave a slot empty
            assert sum(len(grp) - 1 for grp in groups(plan, b)) == r


# --- random ------------------------------------------------------------------------------------------------------

def test_random_is_seeded_and_ignores_similarity():
    g = torch.Generator().manual_seed(6)
    metric = torch.randn(1, 21, 4, generator=g)
    algo = create_algorithm("random")
    a = algo.plan(request(metric, 6))
    b = algo.plan(request(-metric, 6))  # similarity plays no part
    assert torch.equal(a.assign, b.assign)
    other_layer = algo.plan(request(metric, 6, layer=1))
    assert not torch.equal(a.assign, other_layer.assign)
    seeded = algo.plan(request(metric, 6, generator=torch.Generator().manual_seed(7)))
    again = algo.plan(request(metric, 6, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(seeded.assign, again.assign)
    assert not torch.equal(create_algorithm("random", seed=1).plan(request(metric, 6)).assign, a.assign)
    for plan in (a, other_layer, seeded):
        sizes = torch.bincount(plan.assign[0], minlength=plan.num_out)
        assert plan.num_out == 21 - 6 and sizes.min() >= 1 and sizes.sum() == 21


def test_random_similar_matching_uses_best_match_on_random_split():
    tokens, r = 20, 4
    metric = torch.randn(1, 1 + tokens, 4, generator=torch.Generator().manual_seed(8))
    plan = create_algorithm("random", match="similar").plan(request(metric, r))
    # the documented split: one draw per position from a generator seeded with seed + layer; A = first half
    u = torch.rand(tokens, 2, generator=torch.Generator().manual_seed(0))[:, 0]
    order = torch.argsort(u, stable=True).tolist()
    set_a, set_b = order[: tokens // 2], order[tokens // 2 :]
    unit = metric[0, 1:] / metric[0, 1:].norm(dim=-1, keepdim=True)
    sim = unit @ unit.T
    best = {a: max(set_b, key=lambda j: float(sim[a, j])) for a in set_a}
    merged = sorted(set_a, key=lambda a: -float(sim[a, best[a]]))[:r]
    expected = sorted([sorted([b] + [a for a in merged if best[a] == b]) for b in set_b]
                      + [[a] for a in set_a if a not in merged])
    assert sorted(groups(plan)) == expected


# --- evit --------------------------------------------------------------------------------------------------------

def test_evit_keeps_attentive_tokens_and_fuses_the_rest_by_attention():
    metric = angles(0, 10, 20, 30, 40, 50)
    attention = torch.tensor([[0.4, 0.05, 0.3, 0.01, 0.1, 0.02, 0.12]])
    # r = 2: keep T - r - 1 = 3 (tokens 1, 5, 3 by attention); fuse 0, 4, 2 (0.05, 0.02, 0.01) into one
    plan = create_algorithm("evit").plan(request(metric, 2, attention=attention))
    assert groups(plan) == [[1], [5], [3], [0, 2, 4]]
    x = torch.arange(7.0).view(1, 7, 1)
    out, size = plan.merge(x, torch.ones(1, 7))
    expected = (0.05 * 1 + 0.01 * 3 + 0.02 * 5) / 0.08
    torch.testing.assert_close(out[0, -1, 0], torch.tensor(expected))
    assert size.flatten().tolist() == [1, 1, 1, 1, 3]
    no_fuse = create_algorithm("evit", fuse=False).plan(request(metric, 2, attention=attention))
    assert dropped(no_fuse) == [2, 4] and groups(no_fuse) == [[1], [5], [3], [0]]
