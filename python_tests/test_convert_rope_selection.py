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


# --- the greedy selection: the attention-output error of each choice, on a calibration sample


def _sample(q, k, v, inv_freq, *, queries=None, gram=None, scaling=None):
    """An AttentionSample of one sequence: q (H, T, d_h), k and v (H_kv, T, d_h), all queries
    (or those at ``queries``), plain RoPE of ``inv_freq``."""
    from mla_ext.convert.calibration import AttentionSample

    t, d_h = k.shape[1], k.shape[2]
    pos = torch.arange(t) if queries is None else torch.as_tensor(queries)
    angle = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq.float()[None]
    angle = torch.cat([angle, angle], dim=-1)
    gram = torch.eye(d_h, dtype=torch.float64).repeat(q.shape[0], 1, 1) if gram is None else gram
    return AttentionSample(q=[q[:, pos].float()], query_pos=[pos], k=[k.float()], v=[v.float()],
                           cos=[angle.cos()], sin=[angle.sin()], out_gram=gram,
                           scaling=d_h ** -0.5 if scaling is None else scaling)


def _greedy_stats(sample, heads, kv_heads):
    pairs = sample.q[0].shape[-1] // 2
    return LayerStats(q_pair_norm=torch.ones(heads, pairs, dtype=torch.float64),
                      k_pair_norm=torch.ones(kv_heads, pairs, dtype=torch.float64), xtx=None,
                      num_tokens=1, attention_sample=sample)


def _naive_output_error(sample, kept, g, group):
    """Attention outputs with only the pairs ``kept`` of KV head ``g`` rotated, against the
    original, written out directly: the weighted squared error summed over queries."""
    q_all, k, v = sample.q[0], sample.k[0][g].double(), sample.v[0][g].double()
    pos, cos, sin = sample.query_pos[0], sample.cos[0].double(), sample.sin[0].double()
    d_h = k.shape[-1]
    half = d_h // 2

    def rope(x, c, s):
        return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s

    rotated_dims = torch.zeros(d_h, dtype=torch.bool)
    for j in kept:
        rotated_dims[j] = rotated_dims[j + half] = True
    k_rot = rope(k, cos, sin)
    total = 0.0
    for h in range(g * group, (g + 1) * group):
        q = q_all[h].double()
        q_rot = rope(q, cos[pos], sin[pos])
        for i, p in enumerate(pos.tolist()):
            full = q_rot[i] @ k_rot[:p + 1].T
            mixed = (q_rot[i] * rotated_dims) @ (k_rot[:p + 1] * rotated_dims).T \
                + (q[i] * ~rotated_dims) @ (k[:p + 1] * ~rotated_dims).T
            ref = (full * sample.scaling).softmax(-1) @ v[:p + 1]
            out = (mixed * sample.scaling).softmax(-1) @ v[:p + 1]
            e = out - ref
            total += float(e @ sample.out_gram[h] @ e)
    return total


def test_greedy_keeps_the_pair_whose_rotation_matters_not_the_largest():
    # Pair 0 has by far the largest q/k but frequency 0: removing its "rotation" changes nothing.
    # Pair 2 is smaller and turns fast: the scores depend on its rotation. 2-norm keeps pair 0,
    # the greedy selection, which measures the output, keeps pair 2.
    gen = torch.Generator().manual_seed(0)
    t, d_h = 24, 8
    q = torch.randn(2, t, d_h, generator=gen) * 0.1
    k = torch.randn(1, t, d_h, generator=gen) * 0.1
    for x in (q, k):
        x[..., 0] += 6.0
        x[..., 2] += 2.0 * torch.randn(x.shape[:-1], generator=gen)
        x[..., 6] += 2.0 * torch.randn(x.shape[:-1], generator=gen)
    v = torch.randn(1, t, d_h, generator=gen)
    inv_freq = torch.tensor([0.0, 0.05, 1.3, 0.01])
    stats = _greedy_stats(_sample(q, k, v, inv_freq), 2, 1)
    stats.q_pair_norm = torch.tensor([[6.0, 0.1, 2.0, 0.1]] * 2, dtype=torch.float64)
    stats.k_pair_norm = torch.tensor([[6.0, 0.1, 2.0, 0.1]], dtype=torch.float64)
    assert select_rope_pairs("2-norm", 1, head_dim=d_h, num_heads=2, num_kv_heads=1,
                             stats=stats).tolist() == [[0]]
    assert select_rope_pairs("greedy", 1, head_dim=d_h, num_heads=2, num_kv_heads=1,
                             stats=stats).tolist() == [[2]]


def test_greedy_steps_match_a_direct_computation_of_the_output_error():
    from mla_ext.convert.rope_selection import greedy_order

    gen = torch.Generator().manual_seed(1)
    h, h_kv, t, d_h = 4, 2, 20, 12
    q = torch.randn(h, t, d_h, generator=gen) * 2
    k = torch.randn(h_kv, t, d_h, generator=gen) * 2
    v = torch.randn(h_kv, t, d_h, generator=gen)
    blocks = torch.randn(h, 5, d_h, generator=gen, dtype=torch.float64)
    inv_freq = 1.0 / (10.0 ** (torch.arange(d_h // 2) / (d_h // 2)))
    sample = _sample(q, k, v, inv_freq, queries=[3, 7, 11, 19],
                     gram=blocks.transpose(1, 2) @ blocks)
    order = greedy_order(sample, h, h_kv, 3)
    for g in range(h_kv):
        kept = []
        for step in range(3):
            errors = {j: _naive_output_error(sample, kept + [j], g, 2)
                      for j in range(d_h // 2) if j not in kept}
            best = min(errors, key=lambda j: (errors[j], j))
            assert order[g, step] == best
            kept.append(best)
    # a longer request continues the memoised order; a shorter one is its prefix
    assert torch.equal(greedy_order(sample, h, h_kv, 5)[:, :3], order)
    assert torch.equal(greedy_order(sample, h, h_kv, 2), order[:, :2])
    stats = _greedy_stats(sample, h, h_kv)
    pairs = select_rope_pairs("greedy", 3, head_dim=d_h, num_heads=h, num_kv_heads=h_kv,
                              stats=stats)
    assert torch.equal(pairs, order.sort(dim=1).values)


def test_greedy_needs_a_matching_attention_sample():
    stats = _stats(torch.ones(4, 8), torch.ones(2, 8))
    with pytest.raises(ValueError, match="collect_attention_sample=True"):
        _select("greedy", 2, stats=stats)
    with pytest.raises(ValueError, match="needs stats"):
        _select("greedy", 2)
    sample = _sample(torch.ones(2, 8, 16), torch.ones(1, 8, 16), torch.ones(1, 8, 16),
                     torch.ones(8))
    with pytest.raises(ValueError, match="2 query heads, 1 KV heads and head_dim 16; expected 4, 2"):
        _select("greedy", 2, stats=_greedy_stats(sample, 2, 1))
    nan = _sample(torch.full((4, 8, 16), float("nan")), torch.ones(2, 8, 16),
                  torch.ones(2, 8, 16), torch.ones(8))
    with pytest.raises(ValueError, match="NaN"):
        _select("greedy", 2, stats=_greedy_stats(nan, 4, 2))
    # r = d_h/2 keeps every pair without a sample
    assert _select("greedy", 8, stats=stats).tolist() == [list(range(8))] * 2
