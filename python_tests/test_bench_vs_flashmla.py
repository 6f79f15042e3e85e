"""bench/vs_flashmla.py's host side (the comparison itself runs on a GPU with FlashMLA built):
FlashMLA's 576-wide cache and queries hold exactly mla_ext's contents, so that attention over
them (MQA, values = the first 512 channels) equals mla_ext's reference decode; the head-count
argument, the output comparison, the file name and the error without FlashMLA."""
import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_mla_decode import parse_heads  # noqa: E402
from bench.vs_flashmla import (D_C, D_R, PAGE, flashmla_cache, flashmla_query, gpu_tag,  # noqa: E402
                               import_flash_mla, rel_max_diff)
from mla_ext import reference  # noqa: E402


def small_cache(B=3, H=16, blocks_per_seq=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = B * blocks_per_seq + 2  # spare blocks the table does not use
    latent = torch.randn(n, PAGE, D_C, generator=gen).to(torch.bfloat16)
    k_rope = torch.randn(n, PAGE, 1, D_R, generator=gen).to(torch.bfloat16)
    q_lat = torch.randn(B, 1, H, D_C, generator=gen).to(torch.bfloat16)
    q_rope = torch.randn(B, 1, H, D_R, generator=gen).to(torch.bfloat16)
    table = torch.randperm(n, generator=gen)[:B * blocks_per_seq].to(torch.int32).view(B, -1)
    lens = torch.tensor([1, PAGE + 5, blocks_per_seq * PAGE][:B], dtype=torch.int32)
    return q_lat, q_rope, latent, k_rope, table, lens


def test_the_576_wide_cache_holds_the_same_contents():
    q_lat, q_rope, latent, k_rope, _, _ = small_cache()
    k_cache = flashmla_cache(latent, k_rope)
    assert k_cache.shape == (latent.shape[0], PAGE, 1, D_C + D_R)
    assert torch.equal(k_cache[:, :, 0, :D_C], latent)
    assert torch.equal(k_cache[:, :, 0, D_C:], k_rope[:, :, 0])
    q = flashmla_query(q_lat, q_rope)
    assert torch.equal(q[..., :D_C], q_lat) and torch.equal(q[..., D_C:], q_rope)


def mqa_over_flashmla_layout(q, k_cache, table, lens, scale):
    """Dense MQA over FlashMLA's layout: K = the 576-wide row, V = its first 512 channels."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], D_C)
    for b in range(q.shape[0]):
        rows = k_cache[table[b].long()].reshape(-1, D_C + D_R)[:lens[b]].float()
        s = torch.einsum("thd,nd->thn", q[b].float(), rows) * scale
        out[b] = torch.einsum("thn,nc->thc", torch.softmax(s, dim=-1), rows[:, :D_C])
    return out


def test_attention_over_flashmla_layout_equals_mla_ext_reference():
    q_lat, q_rope, latent, k_rope, table, lens = small_cache()
    scale = 1.0 / math.sqrt(192)
    ours, _ = reference.mla_decode(q_lat, q_rope, latent, None, None, k_rope, None, table, lens,
                                   scale)
    theirs = mqa_over_flashmla_layout(flashmla_query(q_lat, q_rope),
                                      flashmla_cache(latent, k_rope), table, lens, scale)
    assert rel_max_diff(ours, theirs) < 0.02  # ours rounds o_lat to bf16


def test_a_cache_of_several_kv_heads_is_rejected():
    latent = torch.zeros(2, PAGE, D_C, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one KV head"):
        flashmla_cache(latent, torch.zeros(2, PAGE, 2, D_R, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="must share blocks, page and dtype"):
        flashmla_cache(latent, torch.zeros(2, PAGE, 1, D_R, dtype=torch.float16))


def test_rel_max_diff_is_relative_to_flashmla():
    theirs = torch.tensor([2.0, -4.0])
    assert rel_max_diff(torch.tensor([2.0, -3.0]), theirs) == pytest.approx(0.25)
    assert rel_max_diff(theirs, theirs) == 0.0


def test_heads_argument():
    assert parse_heads("16,64,128") == (16, 64, 128)
    for bad in ("16,x", "0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_heads(bad)


def test_gpu_tag_names_the_card():
    assert gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_tag("NVIDIA H200") == "h200"


def test_missing_flashmla_says_how_to_build_it(tmp_path):
    if "flash_mla" in sys.modules:
        pytest.skip("FlashMLA is importable here")
    with pytest.raises(SystemExit, match="run_h200.sh flashmla"):
        import_flash_mla(str(tmp_path))
