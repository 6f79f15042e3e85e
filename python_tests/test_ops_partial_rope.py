import pytest
import torch
from torch.library import opcheck

from mla_ext import ops, reference

SHAPES = [(0, 4, 2, 4), (1, 1, 1, 4), (7, 9, 3, 4), (33, 32, 8, 8), (5, 32, 32, 16), (3, 128, 1, 4)]


def make(n, heads, h_kv, r, dtype, device):
    x = torch.randn(n, heads, 2 * r, dtype=dtype, device=device)
    ang = torch.randn(n, h_kv, r, device=device)
    return x, ang.cos(), ang.sin()


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", devices())
def test_partial_rope_matches_reference(shape, dtype, device):
    x, cos, sin = make(*shape, dtype, device)
    ref = reference.partial_rope(x.float(), cos, sin)
    out = ops.partial_rope(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    inplace = x.clone()
    ops.partial_rope_(inplace, cos, sin)
    torch.testing.assert_close(inplace, out, atol=0, rtol=0)


@pytest.mark.parametrize("device", devices())
def test_partial_rope_opcheck(device):
    x, cos, sin = make(5, 6, 3, 4, torch.float32, device)
    opcheck(torch.ops.mla_ext.partial_rope.default, (x, cos, sin))
    opcheck(torch.ops.mla_ext.partial_rope_.default, (x.clone(), cos, sin))


def test_partial_rope_strided_input():
    x, cos, sin = make(4, 6, 3, 4, torch.float32, "cpu")
    wide = torch.randn(4, 6, 20)
    wide[..., :8] = x
    torch.testing.assert_close(ops.partial_rope(wide[..., :8], cos, sin),
                               reference.partial_rope(x, cos, sin))


@pytest.mark.parametrize("bad, match", [
    (lambda x, c, s: (x[:, :5], c, s), "multiple of"),
    (lambda x, c, s: (x[..., :6], c, s), "twice"),
    (lambda x, c, s: (x, c, s[:, :, :3]), "sin must have shape"),
    (lambda x, c, s: (x.int(), c, s), "x must have dtype"),
    (lambda x, c, s: (x[0], c, s), "x must have 3 dims"),
    (lambda x, c, s: (x, c[:3], s[:3]), "one row per token"),
])
def test_partial_rope_rejects_bad_input(bad, match):
    x, cos, sin = make(4, 6, 3, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=match):
        ops.partial_rope(*bad(x, cos, sin))


@pytest.mark.gpu
def test_partial_rope_cpu_vs_cuda():
    x, cos, sin = make(17, 32, 8, 8, torch.bfloat16, "cpu")
    out_cpu = ops.partial_rope(x, cos, sin)
    out_gpu = ops.partial_rope(x.cuda(), cos.cuda(), sin.cuda()).cpu()
    torch.testing.assert_close(out_gpu, out_cpu, atol=1e-2, rtol=1e-2)
