"""What every baseline must honour: exact budgets, protected tokens, batch = per sample, padding and frozen
tokens, option validation, missing attention, and the plan extensions they use (mix, norm)."""

from __future__ import annotations

import pytest
import torch

import pitome
from pitome.algorithms import ALGORITHMS, MergeRequest, create_algorithm
from pitome.plan import MergePlan, build_plan

BASELINES = ("tofu", "dct", "diffrate", "mctf", "crossget", "random", "kth", "evit")
# variants that drop tokens instead of merging them (sizes are not preserved)
DROPPING = (("tofu", {"mode": "prune"}), ("diffrate", {"prune_fraction": 1.0}), ("evit", {"fuse": False}),
            ("diffrate", {"prune_fraction": 0.5}))
VARIANTS = [(name, {}) for name in BASELINES] + [
    ("tofu", {"mode": "prune"}), ("dct", {"norm": "mean"}), ("diffrate", {"prune_fraction": 0.5}),
    ("mctf", {"bidirectional": False}), ("random", {"match": "similar"}), ("kth", {"k": 2}), ("evit", {"fuse": False}),
]


def _ids(variants):
    return [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in variants]


def _inputs(batch: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, tokens, 8, generator=g)
    attention = torch.softmax(torch.randn(batch, tokens, generator=g) * 2, dim=-1)
    size = torch.randint(1, 4, (batch, tokens), generator=g).float()
    x = torch.randn(batch, tokens, 5, generator=g)
    return metric, attention, size, x


def _request(metric, attention, size, r, head, **extra) -> MergeRequest:
    r_t = torch.as_tensor(r).expand(metric.shape[0]).clone() if not torch.is_tensor(r) else r
    return MergeRequest(metric=metric, r=r_t, r_max=int(r_t.max()), r_min=int(r_t.min()), num_protected=head,
                        attention=attention, size=size[:, head:], **extra)


def _drops(name, opts) -> bool:
    return (name, opts) in DROPPING


@pytest.mark.parametrize("name", BASELINES)
def test_registered_and_selectable_by_name(name):
    assert name in pitome.available_algorithms()
    algo = create_algorithm(name)
    assert algo.name == name and ALGORITHMS[name] is type(algo)
    with pytest.raises(ValueError, match="unknown option"):
        create_algorithm(name, no_such_option=1)


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=_ids(VARIANTS))
@pytest.mark.parametrize("r", [1, 6, 12])
def test_budget_is_exact_and_protected_tokens_untouched(name, opts, r):
    head, tokens = 2, 2 + 25
    metric, attention, size, x = _inputs(3, tokens)
    plan = create_algorithm(name, **opts).plan(_request(metric, attention, size, r, head))
    out, new_size = plan.merge(x, size)
    assert plan.num_out == tokens - r and out.shape == (3, tokens - r, 5)
    assert torch.isfinite(out).all()
    # protected tokens: same slots, alone, values unchanged
    assert plan.assign[:, :head].tolist() == [[0, 1]] * 3
    torch.testing.assert_close(out[:, :head], x[:, :head])
    assert torch.equal(new_size[:, :head], size[:, :head])
    if plan.mix is None:
        assert not (plan.assign[:, head:, None] == torch.arange(head)).any()
        counts = torch.stack([torch.bincount(row[row >= 0], minlength=plan.num_out) for row in plan.assign])
        assert counts.min() >= 1  # every output slot holds something
    if _drops(name, opts):
        assert (new_size.sum(1) < size.sum(1)).all()
    else:
        torch.testing.assert_close(new_size.sum(1), size.sum(1))


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=_ids(VARIANTS))
def test_batch_equals_per_sample(name, opts):
    head, tokens = 1, 1 + 20
    metric, attention, size, x = _inputs(3, tokens, seed=1)
    algo = create_algorithm(name, **opts)
    plan = algo.plan(_request(metric, attention, size, 7, head))
    out, new_size = plan.merge(x, size)
    for b in range(3):
        one = algo.plan(_request(metric[b : b + 1], attention[b : b + 1], size[b : b + 1], 7, head))
        assert torch.equal(one.assign[0], plan.assign[b])
        out_b, size_b = one.merge(x[b : b + 1], size[b : b + 1])
        torch.testing.assert_close(out_b[0], out[b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(size_b[0], new_size[b])


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=_ids(VARIANTS))
def test_padding_and_frozen_tokens_stay_out_and_real_tokens_merge_as_alone(name, opts):
    """Sample 0 has 18 real tokens (the last frozen) and 4 padding tokens; it must merge like its 18 tokens alone."""
    head, real, pad = 1, 18, 4
    metric, attention, size, x = _inputs(1, head + real + pad, seed=2)
    attention = attention.clone()
    attention[:, head + real :] = 0
    attention = attention / attention.sum(dim=1, keepdim=True)
    valid = torch.ones(1, real + pad, dtype=torch.bool)
    valid[:, real:] = False
    frozen = torch.zeros_like(valid)
    frozen[:, real - 1] = True
    algo = create_algorithm(name, **opts)
    r = torch.tensor([5])
    padded = algo.plan(_request(metric, attention, size, r, head, valid=valid, frozen=frozen))
    alone = algo.plan(_request(metric[:, : head + real], attention[:, : head + real], size[:, : head + real], r, head,
                               valid=valid[:, :real], frozen=frozen[:, :real]))
    out_p, size_p = padded.merge(x, size)
    out_a, size_a = alone.merge(x[:, : head + real], size[:, : head + real])
    n = alone.num_out
    assert padded.num_out == n + pad
    torch.testing.assert_close(out_p[:, :n], out_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(size_p[:, :n], size_a)
    # padding and the frozen token pass through alone and unchanged
    torch.testing.assert_close(out_p[0, n:], x[0, head + real :])
    ok = torch.cat([torch.ones(1, head, dtype=torch.bool), valid], 1)
    assert padded.any(ok)[0].tolist() == [True] * n + [False] * pad
    frozen_slot = int(padded.assign[0, head + real - 1])
    torch.testing.assert_close(out_p[0, frozen_slot], x[0, head + real - 1])
    if padded.mix is None:
        assert int((padded.assign[0] == frozen_slot).sum()) == 1


@pytest.mark.parametrize("name", BASELINES)
def test_per_sample_budgets_in_one_batch(name):
    head, tokens = 1, 1 + 16
    metric, attention, size, x = _inputs(3, tokens, seed=3)
    algo = create_algorithm(name)
    r = torch.tensor([0, 3, 6])
    plan = algo.plan(_request(metric, attention, size, r, head))
    out, new_size = plan.merge(x, size)
    assert plan.num_out == tokens
    for b, rb in enumerate(r.tolist()):
        one = algo.plan(_request(metric[b : b + 1], attention[b : b + 1], size[b : b + 1], rb, head))
        out_b, size_b = one.merge(x[b : b + 1], size[b : b + 1])
        torch.testing.assert_close(out[b, : one.num_out], out_b[0], rtol=1e-5, atol=1e-6)
        assert (new_size[b, one.num_out :] == 0).all()  # empty slots


@pytest.mark.parametrize("name", [n for n in BASELINES if ALGORITHMS[n].needs_attention])
def test_missing_attention_is_a_clear_error(name):
    metric, _, size, _ = _inputs(1, 9)
    with pytest.raises(ValueError, match="needs attention probabilities"):
        create_algorithm(name).plan(_request(metric, None, size, 2, 1))
    with pytest.raises(ValueError, match="shape"):
        create_algorithm(name).plan(_request(metric, torch.ones(1, 5), size, 2, 1))


def test_attention_flags():
    needs = {n for n in BASELINES if ALGORITHMS[n].needs_attention}
    assert needs == {"diffrate", "mctf", "evit"}
    assert ALGORITHMS["mctf"].attention_from == "mean"
    assert ALGORITHMS["evit"].attention_from == ALGORITHMS["diffrate"].attention_from == "cls"


@pytest.mark.parametrize(
    ("name", "opts", "word"),
    [
        ("tofu", {"mode": "merge"}, "mode"), ("tofu", {"merge_from": -1}, "merge_from"),
        ("tofu", {"merge_from": 1.5}, "merge_from"), ("dct", {"norm": "l2"}, "norm"),
        ("diffrate", {"prune_fraction": 1.5}, "prune_fraction"), ("diffrate", {"prune_fraction": "half"}, "prune_fraction"),
        ("mctf", {"tau_sim": 0}, "tau_sim"), ("mctf", {"tau_info": -1.0}, "tau_info"),
        ("mctf", {"tau_size": float("nan")}, "tau_size"), ("mctf", {"bidirectional": 1}, "bidirectional"),
        ("mctf", {"attention_weighted": "yes"}, "attention_weighted"), ("random", {"match": "best"}, "match"),
        ("random", {"seed": -1}, "seed"), ("random", {"seed": 1.0}, "seed"), ("kth", {"k": 1}, "k"),
        ("kth", {"k": True}, "k"), ("evit", {"fuse": "no"}, "fuse"),
    ],
)
def test_bad_options_name_the_option(name, opts, word):
    with pytest.raises(ValueError, match=word):
        create_algorithm(name, **opts)


def test_mctf_criteria_can_be_switched_off():
    assert create_algorithm("mctf", tau_info=float("inf"), tau_size=None).tau_size is None


def test_max_removable():
    assert create_algorithm("crossget").max_removable(9) == 4
    assert create_algorithm("mctf").max_removable(9) == 4
    assert create_algorithm("random").max_removable(9) == 4
    for name in ("dct", "diffrate", "evit"):
        assert create_algorithm(name).max_removable(9) == 8
        assert create_algorithm(name).max_removable(torch.tensor([0, 1, 9])).tolist() == [0, 0, 8]


# --- plan extensions: mix (DCT) and norm (ToFu's MLERP) -----------------------------------------------------------

def test_mix_plan_reductions():
    mix = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, -0.5, 0.0], [0.0, 0.25, 0.25, 0.0]]])
    plan = MergePlan(assign=torch.tensor([[0, 1, 1, -1]]), num_out=3, mix=mix)
    x = torch.arange(8.0).view(1, 4, 2)
    out, size = plan.merge(x, torch.tensor([[1.0, 2.0, 4.0, 1.0]]))
    torch.testing.assert_close(out, mix @ x)
    # |mix| per input column: token 1 -> 2/3, 1/3; token 2 the same; the all-zero column 3 goes nowhere
    torch.testing.assert_close(size, torch.tensor([[1.0, 2 * 2 / 3 + 4 * 2 / 3, 2 / 3 + 4 / 3]]))
    assert plan.any(torch.tensor([[False, True, False, True]])).tolist() == [[False, True, True]]
    assert plan.any(torch.tensor([[True, False, False, True]])).tolist() == [[True, False, False]]
    back = plan.unmerge(out)
    torch.testing.assert_close(back, torch.linalg.pinv(mix) @ out)
    assert plan.unmerge(torch.ones(1, 3)).shape == (1, 4)
    assert plan.compose_source(torch.tensor([[0, 1, 2, 3, 3]])).tolist() == [[0, 1, 1, -1, -1]]


def test_norm_max_plan_keeps_gradients_and_rejects_unknown():
    target = torch.tensor([[1, 1, 2]])
    plan = build_plan(target, torch.arange(3.0).unsqueeze(0), 0)
    plan = MergePlan(assign=plan.assign, num_out=plan.num_out, norm="max")
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    out, _ = plan.merge(x, torch.ones(1, 3))
    torch.testing.assert_close(out[0, 0].norm(), torch.tensor(3.0))
    torch.testing.assert_close(out[0, 1], x[0, 2])
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, :2] != 0).any()
    with pytest.raises(ValueError, match="norm"):
        MergePlan(assign=plan.assign, num_out=2, norm="l2")


@pytest.mark.parametrize("bias_rows", [1, 40])
def test_mean_attention_in_row_blocks_equals_the_plain_formula(monkeypatch, bias_rows):
    """'mean' attention (MCTF) is computed in blocks of query rows to bound its memory; same values to rounding."""
    from pitome.adapters import common
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    bias = torch.randn(2, 1, bias_rows, 40)
    plain = (q @ k.transpose(-2, -1) * 0.35 + bias).softmax(dim=-1).mean(dim=(1, 2))
    monkeypatch.setattr(common, "ATTENTION_CHUNK_ELEMENTS", 2 * 3 * 40 * 7)  # 7 rows a block: 6 blocks, last short
    torch.testing.assert_close(common.mean_attention(q, k, 0.35, bias, torch.float32), plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, options", [v for v in VARIANTS if v[0] != "dct"], ids=_ids([v for v in VARIANTS
                                                                                              if v[0] != "dct"]))
@pytest.mark.parametrize("padded", [False, True])
def test_one_r_for_the_batch_gives_the_gather_form_and_it_equals_the_scatter_form(name, options, padded):
    """Every assignment baseline hands ``build_plan`` its fewest survivors, so one r for the batch gives the fast
    gather form (also with padding, where padding tokens survive); merging, sums, masks and source maps through
    it equal the plain scatter form of the same assignment."""
    metric, attention, size, x = _inputs(3, 19, seed=5)
    valid = None
    if padded:
        valid = torch.ones(3, 18, dtype=torch.bool)
        valid[1, -3:] = False
    plan = create_algorithm(name, **options).plan(_request(metric, attention, size, 4, 1, valid=valid))
    assert plan.rows is not None and plan.num_out == 19 - 4
    scatter = MergePlan(assign=plan.assign, num_out=plan.num_out, weight=plan.weight, norm=plan.norm)
    for s in (None, size):
        for weighted in (True, False):
            fast, fast_size = plan.merge(x, s, size_weighted=weighted)
            slow, slow_size = scatter.merge(x, s, size_weighted=weighted)
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fast_size, slow_size)
    mask = torch.rand(3, 19, generator=torch.Generator().manual_seed(1)) > 0.5
    assert torch.equal(plan.any(mask), scatter.any(mask))
