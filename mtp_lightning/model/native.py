"""The few-row float32 kernel (``fewrow.cpp``): built on first use, loaded with ctypes, optional.

Why a kernel of our own: decoding's products have 1 to a few dozen rows, and at that size the libraries'
per-call costs dominate. ``python benchmarks/skinny_matmul.py 2`` on the 2-core AMD EPYC of
docs/benchmarks.md ("Few-row products"), median us, weights cold / hot: 4 x 256 -> 768 took
107 / 79 through oneDNN and 58 / 37 here; 4 x 256 -> 4096 took 324 / 149 against 224 / 86; one row
256 -> 768 took 68 / 28 through MKL's matrix-vector product and 61 / 31 here.

How it is built: the first ``kernel()`` call compiles ``fewrow.cpp`` with the system's C++ compiler
(``$CXX``, else ``g++``/``c++``; about 3 s) into ``$MTP_LIGHTNING_CACHE`` (default
``~/.cache/mtp_lightning``)/kernels, under a name that hashes the source, the flags and the torch
build, so an edit or an upgrade rebuilds it. The build is an ``mtp_lightning.atomic.cached_entry``: it
goes to a temporary file renamed into place under a file lock, so concurrent processes (DDP ranks, test
workers) never load a half-written library, and a library that no longer matches its manifest (size
and checksum) is rebuilt with a note. It links against the OpenMP runtime torch itself loaded, so the kernel uses torch's threads.
Before it is used, one product is checked against ``F.linear``.

It is skipped, and ``fastpath`` keeps its library paths, when any of these holds (``why_not()`` says
which): ``MTP_LIGHTNING_NATIVE=0``; the CPU lacks AVX2/FMA; no compiler; the build or the check fails.
Nothing else changes then: the kernel is a speed path; its results differ from the libraries' only by
float rounding and, in the softmaxes, by its polynomial exponential (relative error about 2e-7).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mtp_lightning.atomic import cached_entry, sidecar, writing_path

SOURCE = Path(__file__).with_name("fewrow.cpp")
ABI_VERSION = 6
PANEL = 24
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-fno-math-errno", "-std=c++17"]

_lib: ctypes.CDLL | None = None
_tried = False
_why_not = "not tried yet"


def cache_dir() -> Path:
    root = os.environ.get("MTP_LIGHTNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mtp_lightning")
    return Path(root) / "kernels"


def _torch_openmp() -> Path | None:
    """The OpenMP runtime file torch ships and loads (``torch/lib/libgomp*.so*``), or None (a torch
    without it, e.g. one built with Intel's runtime: the kernel is then built single-threaded)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    libs = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return libs[0] if libs else None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(cxx: str, omp: Path | None) -> Path:
    flags = _FLAGS + (["-fopenmp"] if omp is not None else [])
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), cxx.encode(), torch.__version__.encode(),
                                     str(omp).encode()])).hexdigest()[:16]
    out = cache_dir() / f"fewrow-{tag}.so"

    def compile_it() -> tuple[list[Path], dict]:
        with writing_path(out, what="kernel build", fix="the kernel stays off: free space there") as tmp:
            cmd = [cxx, *flags, str(SOURCE), "-o", str(tmp)]
            if omp is not None:
                # link torch's own runtime by path: the loader then reuses the copy torch already loaded
                # (same soname), so the kernel and torch share one OpenMP thread pool
                cmd += [f"-L{omp.parent}", f"-l:{omp.name}", f"-Wl,-rpath,{omp.parent}"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-400:]}")
        return [out], {"tag": tag}

    cached_entry(sidecar(out), compile_it, f"the kernel build '{out}'")
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.mtpl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.mtpl_abi_version()}, expected {ABI_VERSION}")
    f = lib.mtpl_linear
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    f.restype = None
    q = lib.mtpl_linear_q8
    q.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    q.restype = None
    d = lib.mtpl_greedy_draft
    d.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    d.restype = ctypes.c_int
    mx = lib.mtpl_mixture
    mx.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    mx.restype = ctypes.c_int
    g = lib.mtpl_greedy_chain
    g.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                  ctypes.c_void_p]
    g.restype = ctypes.c_int
    return lib


def _self_check(lib: ctypes.CDLL) -> None:
    """One product per path (full panels, a 16-wide tail, 1..5 rows, bias, threads) against F.linear."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24 * 9 + 16, 40, generator=g), torch.randn(24 * 9 + 16, generator=g)
    packed = pack(w)
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(rows, 40, generator=g)
        got = _call(lib, x, packed, None, b, w.shape[0], 2)
        want = F.linear(x.double(), w.double(), b.double()).float()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"self-check failed for {rows} rows: max error {float((got - want).abs().max()):.3g}")
        q, scale = pack_q8(w)
        got = _call(lib, x, q, scale, b, w.shape[0], 2)
        want = F.linear(x.double(), dequantize_q8(w).double(), b.double()).float()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"int8 self-check failed for {rows} rows: max error {float((got - want).abs().max()):.3g}")


def _check_chain(lib: ctypes.CDLL) -> None:
    """The greedy draft chain against ``reference_chain`` on random logits (well separated: no ties)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 64, generator=g) * 4
    pi = torch.rand(2, 4, generator=g) + 0.1
    got = _chain(lib, z.clone(), pi.clone())
    want = reference_chain(z.softmax(-1), pi)
    if not torch.equal(got, want):
        raise RuntimeError(f"self-check of the draft chain failed: {got.tolist()} against {want.tolist()}")


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be used (``why_not()``). Built once per process."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("MTP_LIGHTNING_NATIVE", "1") == "0":
        _why_not = "disabled by MTP_LIGHTNING_NATIVE=0"
        return None
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512", "AVX512_BF16"):
        _why_not = f"needs Linux on an x86 CPU with AVX2 (this is {sys.platform}, {torch.backends.cpu.get_cpu_capability()})"
        return None
    cxx = _compiler()
    if cxx is None:
        _why_not = "no C++ compiler (set CXX, or install g++)"
        return None
    try:
        lib = _load(_build(cxx, _torch_openmp()))
        _self_check(lib)
        _check_chain(lib)
    except Exception as e:  # a speed path: fall back to the library products, and say why
        _why_not = f"{type(e).__name__}: {e}"
        return None
    _lib, _why_not = lib, ""
    return lib


def why_not() -> str:
    """Empty when the kernel is in use; otherwise why not."""
    return _why_not


def supports(out_features: int) -> bool:
    return out_features % 8 == 0


def pack(w: torch.Tensor) -> torch.Tensor:
    """W (O, I) float32 (or int8) -> the kernel's panel layout, flat (O * I,): panels of 24 output columns, each
    (I, width) row-major, back to back; the last panel 8 or 16 wide."""
    O, I = w.shape
    assert O % 8 == 0, O
    full = O // PANEL * PANEL
    w = w.detach() if w.dtype == torch.int8 else w.detach().float()
    parts = [w[:full].reshape(-1, PANEL, I).transpose(1, 2).reshape(-1)]
    if full < O:
        parts.append(w[full:].t().reshape(-1))
    return torch.cat(parts).contiguous()


def q8_scales(w: torch.Tensor) -> torch.Tensor:
    """The symmetric int8 scale of each output row of W (O, I): max |W_o| / 127 (this kernel's int8
    copies and fbgemm's, ``fastpath._pack_int8``, use the same)."""
    return (w.detach().float().abs().amax(1) / 127).clamp_min(1e-12)


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (O, I) -> int8 Wq (O, I) and one float32 scale per output row, symmetric: W ≈ Wq * scale[:, None]."""
    w = w.detach().float()
    scale = q8_scales(w)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_q8(w: torch.Tensor) -> torch.Tensor:
    """The float32 weight the int8 product really multiplies by: Wq * scale."""
    q, scale = quantize_q8(w)
    return q.float() * scale[:, None]


def pack_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (O, I) -> (the int8 weight in ``pack``'s panel layout, flat; the scales (O,))."""
    q, scale = quantize_q8(w)
    return pack(q), scale.contiguous()


def _on_cpu(*tensors: torch.Tensor | None) -> None:
    """The kernel reads raw pointers: a tensor anywhere but in CPU memory would crash it, so refuse it."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the native kernel runs on the CPU; got a tensor on {t.device}")


def _call(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor | None,
          bias: torch.Tensor | None, out_features: int, threads: int) -> torch.Tensor:
    """x (..., I) times a packed weight -> (..., out_features): float32 (``scale`` None) or int8 with
    one scale per output."""
    _on_cpu(x, packed, scale, bias)
    I = x.shape[-1]
    x2 = x.reshape(-1, I).contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    b = None if bias is None else bias.data_ptr()
    if scale is None:
        lib.mtpl_linear(x2.data_ptr(), x2.shape[0], I, packed.data_ptr(), b, y.data_ptr(), out_features, threads)
    else:
        lib.mtpl_linear_q8(x2.data_ptr(), x2.shape[0], I, packed.data_ptr(), scale.data_ptr(), b, y.data_ptr(),
                           out_features, threads)
    return y.view(*x.shape[:-1], out_features)


def linear_q8(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], out_features: int) -> torch.Tensor:
    """y = x (Wq * scale)^T through the kernel, ``packed`` from ``pack_q8(W)``: only the weight is
    quantized (x stays float32), so y is exact for the dequantized weight up to float32 rounding."""
    return _call(_lib, x, packed[0], packed[1], None, out_features, torch.get_num_threads())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x W^T + bias through the kernel: x (..., I) float32 on the CPU, ``packed`` from ``pack(W)``,
    bias (O,) contiguous float32 or None. Only call where ``kernel()`` is not None."""
    return _call(_lib, x, packed, None, bias, out_features, torch.get_num_threads())


def reference_chain(P: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """The greedy draft chain in torch: factor probabilities P (B, ks, r, V) and the expert posterior pi
    (B, r) after the last emitted token -> drafts (B, ks): d_s = argmax_x sum_a pi_a P_a^(s)(x), then
    pi <- pi P^(s)(d_s), renormalised. What ``greedy_chain`` computes, and the decoders' fallback."""
    B, ks, r, _ = P.shape
    tiny = torch.finfo(P.dtype).tiny
    pi = pi[:, None, :]  # (B, 1, r)
    tokens = torch.empty(B, ks, dtype=torch.long, device=P.device)
    for s in range(ks):
        Ps = P[:, s]  # (B, r, V)
        d = torch.bmm(pi, Ps).argmax(-1).view(B)  # (B,)
        tokens[:, s] = d
        if s < ks - 1:
            # a probability that underflowed to 0 for every expert must not zero the posterior
            pi = pi * Ps.gather(-1, d.view(B, 1, 1).expand(B, r, 1)).view(B, 1, r).clamp_min(tiny)
            pi = pi / pi.sum(-1, keepdim=True)
    return tokens


def _chain(lib: ctypes.CDLL, logits: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    _on_cpu(logits, pi)
    B, ks, r, V = logits.shape
    tokens = torch.empty(B, ks, dtype=torch.long)
    if lib.mtpl_greedy_chain(logits.data_ptr(), B, ks, r, V, pi.data_ptr(), tokens.data_ptr()) != 0:
        raise ValueError(f"greedy_chain does not take logits of shape {tuple(logits.shape)}")
    return tokens


def chain_supports(logits_shape: tuple[int, ...]) -> bool:
    *_, ks, r, V = logits_shape
    return _lib is not None and V % 8 == 0 and 1 <= r <= 16 and 1 <= ks and ks * r <= 1024


def greedy_chain(logits: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """``reference_chain(logits.softmax(-1), pi)`` in one call: draft logits (B, ks, r, V) and the
    posterior pi (B, r) -> drafts (B, ks). The softmax uses a fast polynomial exponential, so on a near
    tie a draft may differ from the torch chain's; drafts only propose, the verifier decides. Only where
    ``chain_supports(logits.shape)``. Both inputs are scratch: contiguous float32 ones are overwritten."""
    return _chain(_lib, logits.float().contiguous(), pi.float().contiguous())


def greedy_draft(u: torch.Tensor, joint1: torch.Tensor, c: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor],
                 unembedding: tuple[torch.Tensor, torch.Tensor], k: int, ks: int, rank: int, mlp: bool
                 ) -> torch.Tensor:
    """A whole greedy draft in one call: the expert posterior pi_a = joint1[b, a, c_b] (the verifier's
    router-weighted offset-1 factors (B, r, V) at the last tokens c (B,)), the int8 draft maps of k
    offsets (``pack_q8`` of the stacked (k * r * D, D) weight) from the states u (B, D), SiLU and residual
    for ``mlp`` heads, the int8 unembedding (``pack_q8`` of U) of the first ks offsets, and
    ``greedy_chain`` -> drafts (B, ks). The same drafts as those steps done one by one in torch, up to
    float32 rounding and the polynomial exponential."""
    _on_cpu(u, joint1, c, *maps, *unembedding)
    B, D = u.shape
    V = unembedding[1].numel()
    u, joint1, c = u.float().contiguous(), joint1.float().contiguous(), c.contiguous()
    tokens = torch.empty(B, ks, dtype=torch.long)
    # scratch per call, not kept between calls: decodes in several threads must not share it
    h, logits = torch.empty(k * rank * D), torch.empty(ks * rank * V)
    rc = _lib.mtpl_greedy_draft(u.data_ptr(), B, D, maps[0].data_ptr(), maps[1].data_ptr(), unembedding[0].data_ptr(),
                                unembedding[1].data_ptr(), V, k, ks, rank, int(mlp), joint1.data_ptr(), c.data_ptr(),
                                h.data_ptr(), logits.data_ptr(), tokens.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"greedy_draft does not take D={D}, V={V}, k={k}, ks={ks}, r={rank} or tokens {c.tolist()}")
    return tokens


def mixture(logits: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The marginal verifier in probability space from factor logits (..., r, V) and router weights
    (..., r): (sum_a w_a softmax(z_a), the weighted factors w_a softmax(z_a) (..., r, V)), summed over a
    in order, as ``CPModel.verifier_and_factors(probs=True)`` computes them in torch. One pass instead
    of a softmax, a product and r - 1 sums; the exponential is the kernel's (relative error about 2e-7),
    so both decoders, which call this alike, still see the same numbers. ``logits`` is scratch: a
    contiguous float32 one becomes the weighted factors. Only where ``_lib`` is set and V % 8 == 0."""
    _on_cpu(logits, w)
    *lead, r, V = logits.shape
    z = logits.float().contiguous()
    wc = w.float().contiguous()
    marginal = torch.empty(*lead, V, dtype=torch.float32)
    n = marginal.numel() // V if V else 0
    if _lib.mtpl_mixture(z.data_ptr(), n, r, V, wc.data_ptr(), marginal.data_ptr()) != 0:
        raise ValueError(f"mixture does not take factors of shape {tuple(logits.shape)}")
    return marginal, z
