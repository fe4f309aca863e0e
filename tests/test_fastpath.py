"""The decoding-time few-row products (``model/fastpath.py``): same values as ``F.linear``, used only
inside ``decoding()``, never stale after a weight changes, freed when the block closes."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mtp_lightning.model import fastpath, native

# where the kernel can be built it must be: an x86 Linux CPU with AVX2 and a C++ compiler (CI has both)
CAN_BUILD = (sys.platform == "linux" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16")
             and native._compiler() is not None)


@pytest.fixture
def library_paths(monkeypatch):
    """The products as they are without the kernel: MKL for one row, oneDNN for several."""
    native.kernel()
    monkeypatch.setattr(native, "_lib", None)


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


def test_several_rows_go_through_the_reordered_copy(library_paths):
    """Without the kernel, 2..MAX_ROWS rows use oneDNN's reordered weight (where torch has oneDNN), one
    row the transposed copy; both equal F.linear, for a plain and a stacked weight slice."""
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
def test_int8_copy_is_close_but_not_exact_and_scoped(library_paths):
    """Without the kernel, ``project_int8`` (drafts only) is fbgemm's: within 3% of F.linear in relative norm, for a plain weight and a
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


# ---- the few-row kernel (native.py, fewrow.cpp) -----------------------------------------------------


def test_kernel_is_built_where_it_can_be():
    """On an AVX2 Linux machine with a compiler the kernel is in use; it is never silently off there."""
    if not CAN_BUILD:
        pytest.skip("no AVX2 or no C++ compiler here")
    assert native.kernel() is not None, native.why_not()
    assert native.why_not() == ""
    # linked against torch's own OpenMP runtime: one libgomp in the process, torch's
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1 and "torch" in next(iter(gomp)), gomp


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
@pytest.mark.parametrize("out", [24 * 5, 24 * 9 + 8, 24 * 4 + 16, 8, 4096])
def test_kernel_matches_float64_and_every_row_is_computed_the_same_alone(out):
    """Against a float64 product, for full panels and both tail widths, 1..20 rows (chunks of 4 and
    every remainder), with and without bias, one thread and two. And the property the decoders rely
    on: a row's result is bit for bit the same whether it comes alone or among others, so one-row AR
    steps and several-row verification passes compute the trunk identically."""
    assert native.kernel() is not None
    g = torch.Generator().manual_seed(out)
    w, b = torch.randn(out, 96, generator=g), torch.randn(out, generator=g)
    packed = native.pack(w)
    for rows in (1, 2, 3, 4, 5, 7, 8, 13, 20):
        x = torch.randn(rows, 96, generator=g)
        for bias in (b, None):
            want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            for threads in (1, 2):
                got = native._call(native._lib, x, packed, None, bias, out, threads)
                assert got.dtype == torch.float32 and got.shape == (rows, out)
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
                alone = torch.cat([native._call(native._lib, x[i:i + 1], packed, None, bias, out, threads) for i in range(rows)])
                assert torch.equal(got, alone)
            assert torch.equal(got, native._call(native._lib, x, packed, None, bias, out, 1))


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
def test_project_takes_the_kernel_for_few_rows_and_the_libraries_otherwise():
    """Inside decoding(), up to NATIVE_MAX_ROWS float32 rows into a width divisible by 8 go through the
    kernel's packed copy ("fr"); a width it does not take and more rows use the library copies. All
    match F.linear; a stacked slice too."""
    torch.manual_seed(3)
    w, b = torch.randn(48, 32), torch.randn(48)
    odd = torch.randn(36, 32)  # 36 outputs: not a multiple of 8
    stacked = torch.randn(3, 2, 8, 32)
    with torch.no_grad(), fastpath.decoding():
        for rows in (1, 4, fastpath.NATIVE_MAX_ROWS):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(fastpath.project(x, w, bias=b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fastpath.project(x, stacked, slice(1, 3)),
                                       x @ stacked[1:3].reshape(-1, 32).t(), rtol=1e-5, atol=1e-5)
        kinds = {kind: c for _, _, copies in fastpath._copies.values() for (kind, _), c in copies.items()}
        assert set(kinds) == {"fr"}
        fastpath._copies.clear()
        x = torch.randn(fastpath.NATIVE_MAX_ROWS + 1, 32)
        torch.testing.assert_close(fastpath.project(x, w, bias=b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fastpath.project(x[:2], odd), F.linear(x[:2], odd), rtol=1e-5, atol=1e-5)
        copies = {kind: c for _, _, cs in fastpath._copies.values() for (kind, _), c in cs.items()}
        assert set(copies) == {"fr", "dnn" if fastpath._ONEDNN else "t"} and copies["fr"] is None  # odd: no "fr"


def test_disabled_kernel_says_why(tmp_path):
    """MTP_LIGHTNING_NATIVE=0 turns it off in a fresh process, which then says so."""
    code = "from mtp_lightning.model import native; print(native.kernel() is None, native.why_not())"
    env = {"MTP_LIGHTNING_NATIVE": "0", "MTP_LIGHTNING_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "True disabled by MTP_LIGHTNING_NATIVE=0"


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
def test_build_is_cached_and_atomic(tmp_path):
    """A fresh cache directory gets exactly one library (no temporary left behind), and a second process
    loads that file as it is instead of compiling again."""
    code = "from mtp_lightning.model import native; native.kernel(); print(native.why_not() or 'ok')"
    env = {"MTP_LIGHTNING_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert first.stdout.strip() == "ok", first.stdout + first.stderr
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len([n for n in built if n.endswith(".so")]) == 1 and not [n for n in built if n.endswith(".tmp")], built
    so = next((tmp_path / "kernels").glob("*.so"))
    stamp = so.stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert second.stdout.strip() == "ok"
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == built and so.stat().st_mtime_ns == stamp


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
@pytest.mark.parametrize("B,ks,r,V", [(1, 3, 4, 4096), (3, 2, 2, 64), (2, 5, 1, 40), (1, 1, 16, 8)])
def test_native_draft_chain_matches_the_torch_chain(B, ks, r, V):
    """The fused greedy chain gives the torch chain's drafts on well-separated logits (no near ties),
    for one and several rows, one expert and sixteen; its exponential is within 1e-6 of torch's."""
    assert native.kernel() is not None and native.chain_supports((ks, r, V))
    g = torch.Generator().manual_seed(B * 100 + ks * 10 + r)
    for trial in range(5):
        z = torch.randn(B, ks, r, V, generator=g) * 3
        pi = torch.rand(B, r, generator=g) + 0.05
        want = native.reference_chain(z.softmax(-1), pi)
        scratch = z.clone()
        got = native.greedy_chain(scratch, pi)
        assert torch.equal(got, want), (trial, got, want)
        # the scratch now holds exp(z - rowmax): check the exponential itself
        torch.testing.assert_close(scratch, (z - z.amax(-1, keepdim=True)).exp(), rtol=1e-6, atol=1e-30)
    assert not native.chain_supports((3, 4, 4100)) and not native.chain_supports((3, 17, 64))


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
def test_native_int8_product_is_exact_for_the_dequantized_weight():
    """The kernel's int8 product (drafts): equal, up to float32 rounding, to x times the dequantized
    weight Wq * scale (only the weight is quantized), within 2% of F.linear and not equal to it, for a
    plain weight and a stacked slice, 1 to NATIVE_MAX_ROWS rows; the copies are int8 and scoped."""
    torch.manual_seed(4)
    w = torch.randn(296, 64) * torch.rand(296, 1)  # rows of different scales: one scale per row matters
    stacked = torch.randn(3, 2, 16, 64)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    with torch.no_grad(), fastpath.decoding():
        for rows in (1, 3, 12, fastpath.NATIVE_MAX_ROWS):
            x = torch.randn(rows, 64)
            got = fastpath.project_int8(x, w)
            torch.testing.assert_close(got.double(), F.linear(x.double(), native.dequantize_q8(w).double()),
                                       rtol=1e-5, atol=1e-5)
            assert 0 < rel(got, F.linear(x, w)) < 0.02
            got = fastpath.project_int8(x, stacked, slice(1, 3))
            flat = stacked[1:3].reshape(-1, 64)
            torch.testing.assert_close(got.double(), (x.double() @ native.dequantize_q8(flat).double().t()),
                                       rtol=1e-5, atol=1e-5)
        copies = [c for _, _, cs in fastpath._copies.values() for (kind, _), c in cs.items() if kind == "n8"]
        assert len(copies) == 2 and all(c[0].dtype == torch.int8 for c in copies)
    assert len(fastpath._copies) == 0


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
def test_native_mixture_is_the_torch_mixture():
    """The marginal verifier's mixture in one pass: the weighted factors w_a softmax(z_a) and their sum
    over a, within 1e-6 of torch's, with the same argmax, for one position and a batch of them."""
    assert native.kernel() is not None
    g = torch.Generator().manual_seed(6)
    for lead in ((1,), (2, 4)):
        z = torch.randn(*lead, 4, 4096, generator=g) * 5
        w = torch.softmax(torch.randn(*lead, 4, generator=g), -1)
        joint_want = z.softmax(-1) * w[..., None]
        marg_want = joint_want[..., 0, :] + joint_want[..., 1, :] + joint_want[..., 2, :] + joint_want[..., 3, :]
        marg, joint = native.mixture(z.clone(), w)
        torch.testing.assert_close(joint, joint_want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(marg, marg_want, rtol=1e-6, atol=1e-9)
        assert torch.equal(marg.argmax(-1), marg_want.argmax(-1))


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
def test_kernel_refuses_tensors_outside_cpu_memory():
    """The kernel reads raw pointers, so a tensor elsewhere (here the meta device, standing in for a
    GPU) is refused with a clear error instead of crashing the process."""
    assert native.kernel() is not None
    packed = native.pack(torch.randn(8, 16))
    with pytest.raises(ValueError, match="runs on the CPU; got a tensor on meta"):
        native.linear(torch.empty(1, 16, device="meta"), packed, None, 8)
    with pytest.raises(ValueError, match="runs on the CPU"):
        native.greedy_chain(torch.empty(1, 2, 2, 8, device="meta"), torch.empty(1, 2, device="meta"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        native.mixture(torch.empty(1, 2, 8, device="meta"), torch.empty(1, 2, device="meta"))


@pytest.mark.skipif(not CAN_BUILD, reason="no AVX2 or no C++ compiler here")
def test_a_truncated_build_is_rebuilt_with_a_note(tmp_path):
    """A library cut short (a full disk, a copy interrupted) no longer matches its manifest: the next
    process rebuilds it, says so in one line, and uses the kernel."""
    code = "from mtp_lightning.model import native; native.kernel(); print(native.why_not() or 'ok')"
    env = {"MTP_LIGHTNING_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    so = next((tmp_path / "kernels").glob("*.so"))
    good = so.read_bytes()
    so.write_bytes(good[:1000])
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert again.stdout.strip() == "ok"
    assert again.stderr.splitlines() == [f"note: the kernel build '{so}' is damaged ({so.name} holds 1000 bytes, "
                                         f"its manifest says {len(good)}); rebuilding it"]
    assert so.stat().st_size == len(good)
