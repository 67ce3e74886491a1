"""MergePlan and build_plan: the one object every algorithm produces and every model step applies."""

from __future__ import annotations

import torch

from pitome.plan import MergePlan, build_plan, identity_plan


def _random_targets(batch: int, tokens: int, merged: int, seed: int, drop: int = 0) -> torch.Tensor:
    """Random "who merges into whom": ``merged`` tokens go into other survivors, ``drop`` are dropped."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        perm = torch.randperm(tokens, generator=g)
        movers, dropped, stays = perm[:merged], perm[merged : merged + drop], perm[merged + drop :]
        target = torch.arange(tokens)
        target[movers] = stays[torch.randint(len(stays), (merged,), generator=g)]
        target[dropped] = -1
        rows.append(target)
    return torch.stack(rows)


def _groups(plan: MergePlan, b: int) -> list[list[int]]:
    """Members of every output slot of sample b, in slot order (input positions)."""
    return [[i for i in range(plan.num_in) if int(plan.assign[b, i]) == s] for s in range(plan.num_out)]


def _plan(batch=3, tokens=12, merged=4, head=2, seed=0, drop=0):
    target = _random_targets(batch, tokens, merged, seed, drop)
    key = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed + 100))
    return build_plan(target, key, head), target, key


def test_merge_is_size_weighted_average_and_sizes_sum():
    plan, _, _ = _plan()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, plan.num_in, 7, generator=g)
    size = torch.rand(3, plan.num_in, generator=g) * 3 + 0.5
    out, new_size = plan.merge(x, size)
    assert out.shape == (3, plan.num_out, 7) and new_size.shape == (3, plan.num_out)
    for b in range(3):
        for s, members in enumerate(_groups(plan, b)):
            assert members, "every slot has at least one member here"
            w = size[b, members]
            expected = (x[b, members] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(out[b, s], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new_size[b, s], w.sum())
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    # plain mean when not size-weighted; sizes still add up
    mean, summed = plan.merge(x, size, size_weighted=False)
    members = _groups(plan, 0)[plan.num_out - 1]
    torch.testing.assert_close(mean[0, -1], x[0, members].mean(0))
    torch.testing.assert_close(summed, new_size)


def test_merge_extra_weight_multiplies_size():
    plan, target, key = _plan(batch=1)
    weight = torch.rand(1, target.shape[1]) + 0.1
    weighted = build_plan(target, key, 2, weight=weight)
    assert weighted.weight.shape == (1, weighted.num_in)
    x, size = torch.randn(1, weighted.num_in, 4), torch.full((1, weighted.num_in), 2.0)
    out, _ = weighted.merge(x, size)
    w_all = torch.cat([torch.ones(1, 2), weight], dim=1) * size
    for s, members in enumerate(_groups(weighted, 0)):
        w = w_all[0, members]
        torch.testing.assert_close(out[0, s], (x[0, members] * w[:, None]).sum(0) / w.sum())


def test_any_mask_semantics():
    plan, _, _ = _plan(batch=2, tokens=10, merged=3, head=1)
    mask = torch.rand(2, plan.num_in, generator=torch.Generator().manual_seed(3)) > 0.6
    merged = plan.any(mask)
    assert merged.dtype == torch.bool
    for b in range(2):
        for s, members in enumerate(_groups(plan, b)):
            assert bool(merged[b, s]) == bool(mask[b, members].any())


def test_unmerge_after_merge_copies_back_to_every_position():
    plan, _, _ = _plan(drop=2)
    x = torch.randn(3, plan.num_in, 5)
    merged, _ = plan.merge(x, torch.ones(3, plan.num_in))
    back = plan.unmerge(merged)
    assert back.shape == x.shape
    for b in range(3):
        for i in range(plan.num_in):
            slot = int(plan.assign[b, i])
            if slot < 0:
                assert torch.all(back[b, i] == 0)
            else:
                assert torch.equal(back[b, i], merged[b, slot])
    # 2-D tensors (e.g. sizes) too
    sizes = torch.arange(plan.num_out, dtype=torch.float32).expand(3, -1)
    assert torch.equal(plan.unmerge(sizes)[plan.assign >= 0], plan.assign[plan.assign >= 0].float())


def test_compose_source_partitions_original_tokens():
    head = 1
    n0 = 17
    source = identity_plan(2, n0, torch.device("cpu")).assign
    tokens = n0
    for step, merged in enumerate((5, 3, 2)):
        target = _random_targets(2, tokens - head, merged, seed=step)
        plan = build_plan(target, torch.rand(2, tokens - head), head)
        source = plan.compose_source(source)
        tokens = plan.num_out
        assert source.shape == (2, n0)
        for b in range(2):
            # every original token in exactly one slot, every slot holds at least one original token
            assert source[b].min() >= 0 and source[b].max() < tokens
            assert torch.bincount(source[b], minlength=tokens).min() >= 1
        assert torch.equal(source[:, :head], torch.arange(head).expand(2, head))
    assert tokens == n0 - 10


def test_compose_source_keeps_dropped_tokens_dropped():
    target = torch.tensor([[0, -1, 2, 2, 4]])
    plan = build_plan(target, torch.arange(5.0).unsqueeze(0), 1)
    source = plan.compose_source(torch.arange(6).unsqueeze(0))
    assert source.tolist() == [[0, 1, -1, 2, 2, 3]]
    target2 = torch.tensor([[-1, 1, 2]])
    again = build_plan(target2, torch.zeros(1, 3), 1).compose_source(source)
    assert again.tolist() == [[0, -1, -1, 1, 1, 2]]


def test_build_plan_order_head_and_dropped():
    # 6 mergeable tokens after 2 protected ones; 1 -> 4, 3 dropped, others stay
    target = torch.tensor([[0, 4, 2, -1, 4, 5]])
    key = torch.tensor([[5.0, 0.0, 1.0, 2.0, 3.0, 0.5]])
    plan = build_plan(target, key, 2)
    # survivors ordered by ascending key: 5 (0.5), 2 (1.0), 4 (3.0), 0 (5.0); head keeps slots 0, 1
    assert plan.num_out == 2 + 4
    assert plan.assign.tolist() == [[0, 1, 2 + 3, 2 + 2, 2 + 1, -1, 2 + 2, 2 + 0]]
    x = torch.arange(8.0).view(1, 8, 1)
    out, size = plan.merge(x, torch.ones(1, 8))
    assert out.flatten().tolist() == [0.0, 1.0, 7.0, 4.0, (3.0 + 6.0) / 2, 2.0]
    assert size.flatten().tolist() == [1, 1, 1, 1, 2, 1]
    assert size.sum() == 8 - 1  # the dropped token is gone


def test_build_plan_stable_for_equal_keys():
    target = torch.arange(5).unsqueeze(0)
    plan = build_plan(target, torch.zeros(1, 5), 0)
    assert plan.assign.tolist() == [[0, 1, 2, 3, 4]]


def test_build_plan_puts_padding_survivors_after_real_ones():
    # sample 0: tokens 0-3 real, 4-5 padding; padding has the smallest keys but must go last
    target = torch.tensor([[0, 0, 2, 3, 4, 5], [0, 1, 1, 3, 4, 5]])
    key = torch.tensor([[3.0, 9.0, 1.0, 2.0, -5.0, -6.0], [4.0, 3.0, 9.0, 2.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, False, False], [True] * 6])
    plan = build_plan(target, key, 1, valid=valid)
    assert plan.num_out == 1 + 5
    groups0 = _groups(plan, 0)
    # real survivors 2, 3, 0 by key (positions shifted by the head), then padding 5, 4 by key
    assert groups0 == [[0], [3], [4], [1, 2], [6], [5]]
    assert plan.any(torch.cat([torch.ones(2, 1, dtype=torch.bool), valid], 1))[0].tolist() == [
        True, True, True, True, False, False]
    # the second sample has no padding: all 5 survivors are real
    assert _groups(plan, 1) == [[0], [6], [5], [4], [2, 3], [1]]
    # real tokens keep their relative order with or without the padding
    alone = build_plan(target[:1, :4], key[:1, :4], 1)
    assert _groups(alone, 0) == groups0[:4]


def test_empty_slots_when_samples_merge_different_amounts():
    target = torch.tensor([[0, 0, 2, 2], [0, 1, 2, 3]])
    plan = build_plan(target, torch.arange(4.0).expand(2, 4), 0)
    assert plan.num_out == 4
    x = torch.randn(2, 4, 3)
    out, size = plan.merge(x, torch.ones(2, 4))
    assert size[0].tolist() == [2, 2, 0, 0]
    assert torch.all(out[0, 2:] == 0) and torch.isfinite(out).all()
    assert not plan.any(torch.ones(2, 4, dtype=torch.bool))[0, 2:].any()
    torch.testing.assert_close(out[1], x[1])


def test_merge_gradient_flows_to_every_member():
    plan, _, _ = _plan(batch=1, drop=1)
    x = torch.randn(1, plan.num_in, 3, requires_grad=True)
    out, _ = plan.merge(x, torch.rand(1, plan.num_in) + 0.5)
    out.sum().backward()
    kept = plan.assign[0] >= 0
    assert torch.all(x.grad[0, kept] != 0)
    assert torch.all(x.grad[0, ~kept] == 0)


def test_identity_plan_changes_nothing():
    plan = identity_plan(2, 5, torch.device("cpu"))
    x = torch.randn(2, 5, 3)
    out, size = plan.merge(x, torch.ones(2, 5))
    torch.testing.assert_close(out, x)
    assert torch.equal(plan.unmerge(out), out)


def test_gather_form_agrees_with_the_assignment():
    """Plans built with equal survivor counts also carry the gather form (rows / dst); merging, summing
    and masks through it equal the scatter over ``assign`` (merged, dropped, weighted, protected tokens)."""
    import dataclasses

    batch, tokens, head, merged, drop = 3, 14, 2, 4, 2
    target = _random_targets(batch, tokens, merged, seed=3, drop=drop)
    key = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(4))
    weight = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(6)) + 0.1
    survivors = tokens - merged - drop
    for kwargs in (dict(), dict(weight=weight)):
        fast = build_plan(target, key, head, max_survivors=survivors, min_survivors=survivors, **kwargs)
        assert fast.rows.shape == (batch * (fast.num_out + 1 + merged + drop),)
        slow = dataclasses.replace(fast, rows=None, dst=None)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(batch, head + tokens, 9, generator=g)
        size = torch.randint(1, 4, (batch, head + tokens), generator=g).float()
        for size_weighted in (True, False):
            for s in (size, None):
                out_fast, size_fast = fast.merge(x, s, size_weighted)
                out_slow, size_slow = slow.merge(x, s, size_weighted)
                torch.testing.assert_close(out_fast, out_slow, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(size_fast, size_slow, rtol=0, atol=0)
        mask = torch.rand(batch, head + tokens, generator=g) > 0.5
        assert torch.equal(fast.any(mask), slow.any(mask))
        torch.testing.assert_close(fast.sum(x), slow.sum(x))
    # slots nobody merged into keep their survivor's features bit for bit (first merge: no sizes yet)
    fast = build_plan(target, key, head, max_survivors=survivors, min_survivors=survivors)
    out, _ = fast.merge(x, None)
    members = torch.zeros(batch, fast.num_out, dtype=torch.long).scatter_add_(
        1, fast.assign.clamp_min(0), (fast.assign >= 0).long())
    for b in range(batch):
        for s in range(fast.num_out):
            if members[b, s] == 1:
                i = int((fast.assign[b] == s).nonzero())
                assert torch.equal(out[b, s], x[b, i])


def test_no_gather_form_when_survivor_counts_may_differ():
    target = _random_targets(2, 10, 3, seed=1)
    key = torch.rand(2, 10)
    assert build_plan(target, key, 1, max_survivors=7).rows is None
    assert build_plan(target, key, 1, max_survivors=7, min_survivors=6).rows is None


def test_gather_form_gradients_equal_the_assignments():
    """Training through a merge: gradients to features and to merge weights are the same in both forms."""
    import dataclasses

    batch, tokens, head, merged = 2, 12, 1, 4
    target = _random_targets(batch, tokens, merged, seed=8)
    key = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(batch, head + tokens, 5, generator=g, dtype=torch.float64)
    w0 = torch.rand(batch, tokens, generator=g, dtype=torch.float64) + 0.5
    size = torch.randint(1, 4, (batch, head + tokens), generator=g).double()
    grads = []
    for gather in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        plan = build_plan(target, key, head, weight=w, max_survivors=tokens - merged, min_survivors=tokens - merged)
        plan = plan if gather else dataclasses.replace(plan, rows=None, dst=None)
        for s in (None, size):
            out, _ = plan.merge(x, s)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
