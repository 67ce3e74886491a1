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


def reference_tome(metric: np.ndarray, r: int) -> list[list[int]] | None:
    """Parity split over mergeable tokens (A even, B odd); the r A tokens with the best match merge.

    Output: unmerged A by position, then every B token (by position) with what merged into it.
    """
    k = metric / np.linalg.norm(metric, axis=1, keepdims=True)
    tokens = len(k)
    a_set, b_set = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    scores = k[a_set] @ k[b_set].T
    best = scores.max(axis=1)
    top2 = np.sort(scores, axis=1)[:, -2:]
    if np.min(np.diff(np.sort(best))) <= GAP or np.min(top2[:, 1] - top2[:, 0]) <= GAP:
        return None
    edge_order = np.argsort(-best, kind="stable")
    merged = set(int(i) for i in edge_order[:r])
    dst = {a_set[i]: b_set[int(np.argmax(scores[i]))] for i in merged}
    groups = [[a] for i, a in enumerate(a_set) if i not in merged]
    groups += [sorted([b] + [a for a, d in dst.items() if d == b]) for b in b_set]
    return groups


def plan_groups(plan: MergePlan, b: int, head: int) -> list[list[int]]:
    assign = plan.assign[b].tolist()
    assert assign[:head] == list(range(head))
    slots: dict[int, list[int]] = {}
    for i, s in enumerate(assign[head:]):
        slots.setdefault(s, []).append(i)
    return [slots[s] for s in sorted(slots)]


@pytest.mark.parametrize("head,tokens", [(0, 16), (1, 25), (2, 30), (5, 17)])
def test_tome_plan_matches_reference(head, tokens):
    batch = 3
    r = torch.tensor([1, tokens // 4, tokens // 2])
    algo = create_algorithm("tome")
    checked = 0
    for seed in range(60):
        metric = torch.randn(batch, head + tokens, 8, generator=torch.Generator().manual_seed(seed))
        refs = [reference_tome(metric[b, head:].double().numpy(), int(r[b])) for b in range(batch)]
        if any(ref is None for ref in refs):
            continue
        plan = algo.plan(MergeRequest(metric=metric, r=r, r_max=int(r.max()), r_min=int(r.min()), num_protected=head))
        for b in range(batch):
            assert plan_groups(plan, b, head) == refs[b], f"seed {seed} sample {b}"
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_tome_merged_features_are_size_weighted():
    head, tokens, r = 1, 12, 4
    for seed in range(50):
        metric = torch.randn(1, head + tokens, 6, generator=torch.Generator().manual_seed(seed))
        ref = reference_tome(metric[0, head:].double().numpy(), r)
        if ref is not None:
            break
    plan = create_algorithm("tome").plan(MergeRequest(metric=metric, r=torch.tensor([r]), r_max=r, num_protected=head))
    x, size = torch.randn(1, head + tokens, 3), torch.rand(1, head + tokens) + 1
    out, new_size = plan.merge(x, size)
    assert out.shape[1] == head + tokens - r
    torch.testing.assert_close(out[0, :head], x[0, :head])
    for slot, group in enumerate(ref, start=head):
        idx = [g + head for g in group]
        w = size[0, idx]
        torch.testing.assert_close(out[0, slot], (x[0, idx] * w[:, None]).sum(0) / w.sum())
        torch.testing.assert_close(new_size[0, slot], w.sum())


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
