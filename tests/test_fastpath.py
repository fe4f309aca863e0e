"""The decoding-time few-row products (``model/fastpath.py``): same values as ``F.linear``, used only
inside ``decoding()``, never stale after a weight changes, freed when the block closes."""

import torch
import torch.nn.functional as F

from mtp_lightning.model import fastpath


def test_skinny_linear_matches_linear_and_is_scoped():
    torch.manual_seed(0)
    layer = fastpath.Linear(32, 48)
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = F.linear(x, layer.weight, layer.bias)
        assert not fastpath.applies(x)  # outside decoding(): the plain path
        with fastpath.decoding():
            assert fastpath.applies(x) and not fastpath.applies(torch.randn(fastpath.MAX_ROWS + 1, 32))
            torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
            assert len(fastpath._transposed) == 1
            layer.weight.mul_(2)  # an in-place change bumps the version: the copy is rebuilt
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        assert len(fastpath._transposed) == 0
    with fastpath.decoding():  # autograd on: the plain path, gradients flow
        assert not fastpath.applies(x)
        layer(x).sum().backward()
    assert layer.weight.grad is not None


def test_stacked_weight_slice():
    w = torch.randn(4, 2, 8, 8)  # (n, r, D_out, D_in), as the heads store it
    u = torch.randn(5, 8)
    with torch.no_grad(), fastpath.decoding():
        got = (u @ fastpath.transposed(w, 2)).unflatten(-1, (2, 8))
    torch.testing.assert_close(got, torch.einsum("rod,bd->bro", w[2], u), rtol=1e-6, atol=1e-6)
