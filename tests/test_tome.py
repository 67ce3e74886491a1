"""ToMe bipartite soft matching against a plain NumPy reference written from the ToMe paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pitome
from pitome.algorithms import MergeRequest, create_algorithm
from pitome.plan import MergePlan

GAP = 2e-5
CORE = ("pitome", "pitome_text", "pitome_bsm", "tome")


def reference_tome(metric: np.ndarray, r: int, head: int) -> list[list[int]] | None:
    """One ToMe step written from the paper (Bolya et al., ICLR 2023, Sec. 3), for one sequence of N tokens.

    A / B alternate over ALL tokens (token 0, the class token, is in A; a distillation token, token 1, in B);
    the ``head`` protected tokens take part in no edge. Each A token's edge goes to its most similar B token;
    the r most similar edges merge. Output: protected tokens (kept in front), the unmerged A tokens (by position
    when there is a class token, else in edge-score order), then every B token with what merged into it.
    Returns the groups of token indices in output order, or None when a near-tie makes the answer fragile.
    """
    k = metric / np.linalg.norm(metric, axis=1, keepdims=True)
    n = len(k)
    a_set = [i for i in range(0, n, 2) if i >= head]
    b_set = [i for i in range(1, n, 2) if i >= head]
    scores = k[a_set] @ k[b_set].T
    best = scores.max(axis=1)
    top2 = np.sort(scores, axis=1)[:, -2:]
    if len(best) > 1 and np.min(np.diff(np.sort(best))) <= GAP:
        return None
    if len(b_set) > 1 and np.min(top2[:, 1] - top2[:, 0]) <= GAP:
        return None
    edge_order = [int(i) for i in np.argsort(-best, kind="stable")]
    merged = set(edge_order[:r])
    dst = {a_set[i]: b_set[int(np.argmax(scores[i]))] for i in merged}
    unmerged = [i for i in edge_order if i not in merged]
    if head > 0:
        unmerged.sort()
    groups = [[i] for i in range(head)] + [[a_set[i]] for i in unmerged]
    groups += [sorted([b] + [a for a, d in dst.items() if d == b]) for b in b_set]
    return groups


def plan_groups(plan: MergePlan, b: int) -> list[list[int]]:
    slots: dict[int, list[int]] = {}
    for i, s in enumerate(plan.assign[b].tolist()):
        slots.setdefault(s, []).append(i)
    return [slots[s] for s in sorted(slots)]


def _request(metric: torch.Tensor, r: torch.Tensor, head: int) -> MergeRequest:
    return MergeRequest(metric=metric, r=r, r_max=int(r.max()), r_min=int(r.min()), num_protected=head)


@pytest.mark.parametrize("head,tokens", [(0, 16), (1, 25), (2, 30), (5, 17), (1, 24), (0, 15)])
def test_tome_plan_matches_reference(head, tokens):
    batch = 3
    r = torch.tensor([1, tokens // 4, tokens // 2])
    algo = create_algorithm("tome")
    checked = 0
    for seed in range(60):
        metric = torch.randn(batch, head + tokens, 8, generator=torch.Generator().manual_seed(seed))
        refs = [reference_tome(metric[b].double().numpy(), int(r[b]), head) for b in range(batch)]
        if any(ref is None for ref in refs):
            continue
        plan = algo.plan(_request(metric, r, head))
        for b in range(batch):
            assert plan_groups(plan, b) == refs[b], f"seed {seed} sample {b}"
        checked += 1
        if checked == 3:
            break
    assert checked == 3


@pytest.mark.parametrize("head", [0, 1, 2])  # no class token; class token; class + distillation token
def test_tome_over_several_blocks_matches_reference(head):
    """Three ToMe steps in a row, each on the previous step's merged features (size-weighted averages): the
    output order matters from the second step on (it decides the next A / B split)."""
    tokens, r, steps = 40, 7, 3
    algo = create_algorithm("tome")
    checked = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, head + tokens, 8, generator=gen, dtype=torch.float64)
        ref_x, ref_size = x[0].numpy().copy(), np.ones(head + tokens)
        size = torch.ones(1, head + tokens, dtype=torch.float32)
        ok = True
        for _ in range(steps):
            groups = reference_tome(ref_x, r, head)
            if groups is None:
                ok = False
                break
            plan = algo.plan(_request(x.float(), torch.tensor([r]), head))
            assert plan_groups(plan, 0) == groups, f"seed {seed}"
            weights = [ref_size[g] for g in groups]
            ref_x = np.stack([(ref_x[g] * w[:, None]).sum(0) / w.sum() for g, w in zip(groups, weights)])
            ref_size = np.array([w.sum() for w in weights])
            x, size = plan.merge(x, size)
            assert np.abs(x[0].numpy() - ref_x).max() <= 1e-5
            assert np.array_equal(size[0].double().numpy(), ref_size)
        checked += ok
    assert checked >= 3


def test_tome_split_includes_the_class_token():
    """With a class token, the first patch token is in B: it can receive a merge, never merge away."""
    metric = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(0))
    metric[0, 2] = metric[0, 1] + 1e-3  # token 2 (A) is nearly identical to token 1 (B)
    plan = create_algorithm("tome").plan(_request(metric, torch.tensor([1]), 1))
    # A = {2, 4, 6, 8} (unmerged ones by position), then B = {1, 3, 5, 7}: token 2 merged into token 1
    assert plan_groups(plan, 0) == [[0], [4], [6], [8], [1, 2], [3], [5], [7]]


def test_tome_has_no_options_and_caps_at_half():
    with pytest.raises(ValueError, match="margin"):
        create_algorithm("tome", margin=0.5)
    algo = create_algorithm("tome")
    assert algo.max_removable(17) == 8 and algo.max_removable(16) == 8


def test_protected_tokens_never_merge_even_when_identical():
    """Class / register tokens equal to every patch must still stay where they are."""
    head, tokens, r = 3, 10, 5
    metric = torch.ones(1, head + tokens, 4) + 1e-3 * torch.randn(1, head + tokens, 4)
    for name in CORE:
        plan = create_algorithm(name).plan(MergeRequest(metric=metric, r=torch.tensor([r]), r_max=r, num_protected=head))
        assert plan.assign[0, :head].tolist() == [0, 1, 2], name
        assert (plan.assign[0, head:] >= head).all(), name
        assert plan.num_out == head + tokens - r, name


def test_tome_in_a_model_removes_r_per_block(make_vit, images):
    model = make_vit(depth=4)
    pitome.patch(model, algorithm="tome", r=9)
    with torch.no_grad():
        model(images(1))
    assert pitome.info(model).tokens_per_layer == [65, 56, 47, 38, 29]
