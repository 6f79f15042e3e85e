"""tools/sweep_split_plan.py: the hand-made plans follow csrc/core/split_plan.h's layout."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mla_ext import ops  # noqa: E402
from tools.sweep_split_plan import PLAN_HEADER, plan_with_chunk  # noqa: E402


def default_plan(lens):
    B = len(lens)
    q = torch.zeros(B, 1, 4, 32)
    latent = torch.zeros(8, 16, 32)
    k_rope = torch.zeros(8, 16, 2, 8)
    return ops.mla_decode_plan(q, latent, None, k_rope, torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("per_split", [1, 2, 3, 7, 1000])
def test_splits_cover_every_tile_once(per_split):
    lens = [300, 0, 33, 1]
    plan = plan_with_chunk(default_plan(lens), lens, per_split, grid_parts=10_000)
    capacity, tile_tokens, used, batch = plan[:PLAN_HEADER].tolist()
    work = plan[PLAN_HEADER:PLAN_HEADER + 4 * capacity].view(capacity, 4)
    info = plan[PLAN_HEADER + 4 * capacity:].view(batch, 2)
    for b, length in enumerate(lens):
        first, splits = info[b].tolist()
        tiles = math.ceil(length / tile_tokens)
        assert splits == max(1, math.ceil(tiles / per_split))
        covered = []
        for part in range(first, first + splits):
            seq, lo, hi, seq_len = work[part].tolist()
            assert (seq, seq_len) == (b, length) and hi - lo <= per_split
            covered += range(lo, hi)
        assert covered == list(range(tiles))
    assert used == sum(info[:, 1].tolist())
    assert (work[used:, 0] == -1).all()


def test_too_many_parts_for_the_grid():
    lens = [4096]
    assert plan_with_chunk(default_plan(lens), lens, 1, grid_parts=16) is None
