"""The decoding-time few-row products (``model/fastpath.py``): same values as ``F.linear``, used only
inside ``decoding()``, never stale after a weight changes, freed when the block closes."""

import pytest
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
            assert len(fastpath._copies) == 1
            layer.weight.mul_(2)  # an in-place change bumps the version: the copy is rebuilt
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        assert len(fastpath._copies) == 0
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


def test_several_rows_go_through_the_reordered_copy():
    """2..MAX_ROWS rows use oneDNN's reordered weight (where torch has oneDNN), one row the transposed
    copy; both equal F.linear, for a plain and a stacked weight slice."""
    torch.manual_seed(1)
    w, b = torch.randn(40, 24), torch.randn(40)
    stacked = torch.randn(3, 2, 8, 24)  # (k, r, D_out, D_in)
    with torch.no_grad(), fastpath.decoding():
        for rows in (1, 4, fastpath.MAX_ROWS):
            x = torch.randn(rows, 24)
            torch.testing.assert_close(fastpath.project(x, w, bias=b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
            got = fastpath.project(x, stacked, slice(1, 3))  # offsets 1..2 at once
            torch.testing.assert_close(got, x @ stacked[1:3].reshape(-1, 24).t(), rtol=1e-5, atol=1e-5)
        kinds = {kind for _, _, copies in fastpath._copies.values() for kind, _ in copies}
    assert kinds == ({"t", "dnn"} if fastpath._ONEDNN else {"t"})


def test_project_outside_decoding_keeps_autograd_for_a_stacked_slice():
    stacked = torch.randn(3, 2, 8, 24, requires_grad=True)
    x = torch.randn(2, 24)
    y = fastpath.project(x, stacked, slice(0, 2))  # not inside decoding(): the plain F.linear
    torch.testing.assert_close(y, x @ stacked[0:2].reshape(-1, 24).t())
    y.sum().backward()
    assert stacked.grad is not None and stacked.grad[2].abs().sum() == 0 and stacked.grad[:2].abs().sum() > 0


@pytest.mark.skipif(not fastpath.INT8, reason="this torch build has no fbgemm int8 engine")
def test_int8_copy_is_close_but_not_exact_and_scoped():
    """``project_int8`` (drafts only): within 3% of F.linear in relative norm, for a plain weight and a
    stacked slice, yet not equal to it (the int8 copy is really used); one row and many; outside
    decoding() or with autograd on it is the exact plain product."""
    torch.manual_seed(2)
    w = torch.randn(300, 64) * torch.rand(300, 1)  # rows of different scales: one scale per row matters
    stacked = torch.randn(3, 2, 16, 64)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    with torch.no_grad(), fastpath.decoding():
        for rows in (1, 12):
            x = torch.randn(rows, 64)
            got, want = fastpath.project_int8(x, w), F.linear(x, w)
            assert got.shape == want.shape and 0 < rel(got, want) < 0.03
            got = fastpath.project_int8(x, stacked, slice(1, 3))
            want = x @ stacked[1:3].reshape(-1, 64).t()
            assert got.shape == want.shape and 0 < rel(got, want) < 0.03
        kinds = {kind for _, _, copies in fastpath._copies.values() for kind, _ in copies}
        assert kinds == {"q8"}
    assert len(fastpath._copies) == 0
    x = torch.randn(4, 64)
    with torch.no_grad():  # outside decoding()
        torch.testing.assert_close(fastpath.project_int8(x, w), F.linear(x, w), rtol=1e-6, atol=1e-6)
