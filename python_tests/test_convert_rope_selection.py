import pytest
import torch

from mla_ext.convert import STRATEGIES, LayerStats, select_rope_pairs, two_norm_scores


def _stats(q, k):
    q = torch.as_tensor(q, dtype=torch.float64)
    k = torch.as_tensor(k, dtype=torch.float64)
    return LayerStats(q_pair_norm=q, k_pair_norm=k, xtx=None, num_tokens=10)


def _select(strategy, r, head_dim=16, num_heads=4, num_kv_heads=2, stats=None):
    return select_rope_pairs(strategy, r, head_dim=head_dim, num_heads=num_heads,
                             num_kv_heads=num_kv_heads, stats=stats)


@pytest.mark.parametrize("strategy,r,head_dim,expected", [
    ("high", 3, 16, [0, 1, 2]),
    ("low", 3, 16, [5, 6, 7]),
    ("uniform", 3, 16, [0, 2, 5]),       # floor(k * 16 / 6) = 0, 2.67, 5.33
    ("uniform", 4, 64, [0, 8, 16, 24]),
    ("uniform", 5, 16, [0, 1, 3, 4, 6]),  # floor(k * 8 / 5)
    ("uniform", 8, 16, list(range(8))),
    ("full", 3, 16, list(range(8))),     # full ignores r
    ("high", 1, 2, [0]),
    ("low", 1, 64, [31]),
])
def test_fixed_strategies(strategy, r, head_dim, expected):
    out = _select(strategy, r, head_dim=head_dim, num_heads=6, num_kv_heads=3)
    assert out.dtype == torch.int64
    assert out.shape == (3, len(expected))
    for row in out:
        assert row.tolist() == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_none_means_all_pairs(strategy):
    # 2-norm at r = d_h/2 keeps everything, so it needs no statistics either.
    out = _select(strategy, None, head_dim=12, num_heads=4, num_kv_heads=2)
    assert out.tolist() == [list(range(6))] * 2
    assert _select(strategy, 6, head_dim=12).tolist() == [list(range(6))] * 2


def test_two_norm_scores_groups_consecutive_query_heads():
    # H = 6, H_kv = 2: KV head 0 serves query heads 0, 1, 2; KV head 1 serves 3, 4, 5.
    q = torch.arange(6 * 4, dtype=torch.float64).reshape(6, 4) + 1
    k = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 2.0, 1.0]], dtype=torch.float64)
    got = two_norm_scores(_stats(q, k), 6, 2)
    expected = torch.empty(2, 4, dtype=torch.float64)
    for g in range(2):
        for j in range(4):
            expected[g, j] = sum(q[h, j] * k[g, j] for h in range(3 * g, 3 * g + 3))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_two_norm_selects_per_kv_head_from_its_group():
    # 8 pairs, H = 4, H_kv = 2. Group 0 = query heads {0, 1}; group 1 = {2, 3}.
    q = torch.ones(4, 8, dtype=torch.float64)
    q[0, 1] = 10.0   # group 0 likes pair 1 ...
    q[1, 6] = 10.0   # ... and pair 6 (only visible when both query heads count)
    q[0, 3] = 7.0    # a single-head runner-up that loses to the group sum of pair 6 (11 vs 8)
    q[2, 4] = 9.0    # group 1 likes pair 4 ...
    q[3, 0] = 8.0    # ... and pair 0
    k = torch.ones(2, 8, dtype=torch.float64)
    out = _select("2-norm", 2, stats=_stats(q, k))
    # With the interleaved mapping (h % H_kv) group 0 would be {0, 2} and pick [1, 4].
    assert out.tolist() == [[1, 6], [0, 4]]


def test_two_norm_uses_key_norms():
    q = torch.ones(2, 8, dtype=torch.float64)
    q[:, 2] = 3.0
    k = torch.ones(1, 8, dtype=torch.float64)
    k[0, 5] = 4.0   # 2 * 4 = 8 beats 2 * 3 * 1 = 6
    k[0, 2] = 0.1
    out = select_rope_pairs("2-norm", 1, head_dim=16, num_heads=2, num_kv_heads=1,
                            stats=_stats(q, k))
    assert out.tolist() == [[5]]


def test_two_norm_ties_go_to_lower_pairs_and_rows_are_ascending():
    q = torch.ones(4, 8, dtype=torch.float64)
    k = torch.ones(2, 8, dtype=torch.float64)
    k[1, 7] = 2.0
    k[1, 5] = 2.0
    out = _select("2-norm", 3, stats=_stats(q, k))
    assert out.tolist() == [[0, 1, 2], [0, 5, 7]]


def test_two_norm_matches_brute_force_on_random_stats():
    gen = torch.Generator().manual_seed(3)
    q = torch.rand(12, 16, generator=gen, dtype=torch.float64)
    k = torch.rand(4, 16, generator=gen, dtype=torch.float64)
    out = select_rope_pairs("2-norm", 5, head_dim=32, num_heads=12, num_kv_heads=4,
                            stats=_stats(q, k))
    for g in range(4):
        scores = [(float(q[3 * g:3 * g + 3, j].sum() * k[g, j]), j) for j in range(16)]
        best = sorted(j for _, j in sorted(scores, key=lambda t: (-t[0], t[1]))[:5])
        assert out[g].tolist() == best


def test_bad_input():
    with pytest.raises(ValueError, match="strategy must be one of .*'high'.*'2-norm'"):
        _select("middle", 2)
    with pytest.raises(ValueError, match="rope_pairs"):
        _select("high", 0)
    with pytest.raises(ValueError, match=r"rope_pairs must be in \[1, head_dim/2 = 8\]"):
        _select("high", 9)
    with pytest.raises(ValueError, match="rope_pairs"):
        _select("high", True)
    with pytest.raises(ValueError, match="needs stats"):
        _select("2-norm", 2)
    with pytest.raises(ValueError, match="head_dim must be even"):
        _select("high", 2, head_dim=15)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _select("high", 2, num_heads=5, num_kv_heads=2)
    wrong_heads = _stats(torch.ones(3, 8), torch.ones(2, 8))
    with pytest.raises(ValueError, match="num_heads=4"):
        _select("2-norm", 2, stats=wrong_heads)
    wrong_pairs = _stats(torch.ones(4, 6), torch.ones(2, 6))
    with pytest.raises(ValueError, match="head_dim 16 needs 8"):
        _select("2-norm", 2, stats=wrong_pairs)
    nan = _stats(torch.full((4, 8), float("nan")), torch.ones(2, 8))
    with pytest.raises(ValueError, match="NaN"):
        _select("2-norm", 2, stats=nan)
