// Few-row float32 products for decoding on x86 CPUs with AVX2 and FMA: y (M, O) = x (M, I) W^T + b.
//
// Decoding multiplies 1 to about 16 rows (one token, or a draft of k+1 tokens times r experts) by each
// weight matrix. General GEMM libraries pay a per-call cost that dominates at that size (oneDNN spends
// 30-40 us on a 4 x 256 -> 256 product) and MKL repacks the weight on every call when there is more
// than one row. This kernel reads a weight packed once (``mtp_lightning/model/native.py`` packs it)
// and streams it with all rows' accumulators held in registers, so 4 rows cost little more than one.
//
// Layout of the packed weight: the output columns are cut into panels of 24 (three 8-float vectors);
// the last panel may be 8 or 16 wide (O must be a multiple of 8). Panel p holds, for every input k, its
// columns' weights W[24p + c, k], c < width, one after another: (I, width) row-major, the panels back to
// back. So a panel is one contiguous stream of I * width floats.
//
// Every output y[m, o] is the float32 sum over k = 0, 1, .., I-1, in that order, of x[m, k] * W[o, k]
// (one fused multiply-add per term), then + b[o]. The order does not depend on M or on how many panels
// a call does at once, so a row's result is the same bit for bit whether it comes alone or with others:
// autoregressive decoding (one row) and a speculative verification pass (several rows) compute the
// trunk with identical arithmetic.
//
// Panels are split between threads with OpenMP. ``native.py`` links this file against the OpenMP
// runtime that PyTorch itself loaded, so the kernel shares torch's thread pool instead of starting a
// second one.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

constexpr int kPanel = 24;

// 8 weights as floats: float32 as they are, int8 widened (its scale is applied once, at the end)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// NP consecutive panels of width 8*J each (J = 3 for full panels; a tail panel has NP = 1 and J < 3)
// for M <= 4 rows. At most 12 accumulators: M * NP * J <= 12. T is float (a float32 weight) or int8_t
// (an int8 weight whose per-column scale multiplies the sums).
template <typename T, int M, int NP, int J>
inline void block(const float* __restrict x, int64_t I, const T* __restrict w, int64_t panel_stride,
                  const float* __restrict scale, const float* __restrict bias, float* __restrict y, int64_t O,
                  const T* pf) {
    static_assert(M * NP * J <= 12, "too many accumulators for 16 ymm registers");
    constexpr int C = NP * J;  // vectors per row
    __m256 acc[M * C];
#pragma GCC unroll 12
    for (int a = 0; a < M * C; ++a) acc[a] = _mm256_setzero_ps();
    for (int64_t k = 0; k < I; ++k) {
        if (pf) {  // the weight the next pass will read, requested while this one computes
#pragma GCC unroll 4
            for (int p = 0; p < NP; ++p)
                _mm_prefetch(reinterpret_cast<const char*>(pf + p * panel_stride + k * (8 * J)), _MM_HINT_T0);
        }
        __m256 wv[C];
#pragma GCC unroll 12
        for (int c = 0; c < C; ++c) wv[c] = load8(w + (c / J) * panel_stride + k * (8 * J) + 8 * (c % J));
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
            const __m256 xb = _mm256_broadcast_ss(x + m * I + k);
#pragma GCC unroll 12
            for (int c = 0; c < C; ++c) acc[m * C + c] = _mm256_fmadd_ps(xb, wv[c], acc[m * C + c]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
#pragma GCC unroll 12
        for (int c = 0; c < C; ++c) {
            const int64_t col = (c / J) * kPanel + 8 * (c % J);
            __m256 r = acc[m * C + c];
            if (scale) r = _mm256_mul_ps(r, _mm256_loadu_ps(scale + col));
            if (bias) r = _mm256_add_ps(r, _mm256_loadu_ps(bias + col));
            _mm256_storeu_ps(y + m * O + col, r);
        }
    }
}

// Rows [0, M) (M <= 4) against panels [p0, p1) (all full) with NP panels per pass, then single panels.
// ``pf`` (or null): prefetch the weight 4 panels ahead of each one read, up to panel ``pf_end``.
template <typename T, int M, int NP>
inline void full_panels(const float* x, int64_t I, const T* wp, const float* scale, const float* bias, float* y,
                        int64_t O, int64_t p0, int64_t p1, bool pf, int64_t pf_end) {
    const int64_t stride = static_cast<int64_t>(kPanel) * I;
    int64_t p = p0;
    for (; p + NP <= p1; p += NP)
        block<T, M, NP, 3>(x, I, wp + p * stride, stride, scale ? scale + p * kPanel : nullptr,
                           bias ? bias + p * kPanel : nullptr, y + p * kPanel, O,
                           pf && p + 4 + NP <= pf_end ? wp + (p + 4) * stride : nullptr);
    for (; p < p1; ++p)
        block<T, M, 1, 3>(x, I, wp + p * stride, stride, scale ? scale + p * kPanel : nullptr,
                          bias ? bias + p * kPanel : nullptr, y + p * kPanel, O,
                          pf && p + 5 <= pf_end ? wp + (p + 4) * stride : nullptr);
}

template <typename T, int M>
void rows(const float* x, int64_t I, const T* wp, const float* scale, const float* bias, float* y, int64_t O,
          int64_t p0, int64_t p1, bool pf, int64_t pf_end) {
    // the widest pass that fits 12 accumulators: 4 panels for one row, 2 for two, 1 for three or four
    constexpr int NP = M == 1 ? 4 : M == 2 ? 2 : 1;
    const int64_t full = O / kPanel;
    full_panels<T, M, NP>(x, I, wp, scale, bias, y, O, p0, p1 < full ? p1 : full, pf, pf_end < full ? pf_end : full);
    if (p1 > full) {  // the tail panel, 8 or 16 wide
        const int64_t col = full * kPanel;
        const T* w = wp + col * I;
        const float* s = scale ? scale + col : nullptr;
        const float* b = bias ? bias + col : nullptr;
        if (O - col == 16) block<T, M, 1, 2>(x, I, w, 0, s, b, y + col, O, nullptr);
        else block<T, M, 1, 1>(x, I, w, 0, s, b, y + col, O, nullptr);
    }
}

// Rows [0, M) against panels [p0, p1). The panels go in runs of 4 (96 KB of float32 weight for 256
// inputs), and every group of 4 rows passes over a run before the next run is read, so a weight is read
// from memory once per call however many rows there are; the other row groups find the run in cache.
template <typename T>
void chunk(const float* x, int64_t M, int64_t I, const T* wp, const float* scale, const float* bias, float* y,
           int64_t O, int64_t p0, int64_t p1) {
    for (int64_t q0 = p0; q0 < p1; q0 += 4) {
        const int64_t q1 = q0 + 4 < p1 ? q0 + 4 : p1;
        int64_t m = 0;
        // the first row group also requests the next run of panels, which arrives while the groups compute
        for (; m + 4 <= M; m += 4) rows<T, 4>(x + m * I, I, wp, scale, bias, y + m * O, O, q0, q1, m == 0, p1);
        switch (M - m) {
            case 3: rows<T, 3>(x + m * I, I, wp, scale, bias, y + m * O, O, q0, q1, m == 0, p1); break;
            case 2: rows<T, 2>(x + m * I, I, wp, scale, bias, y + m * O, O, q0, q1, m == 0, p1); break;
            case 1: rows<T, 1>(x + m * I, I, wp, scale, bias, y + m * O, O, q0, q1, m == 0, p1); break;
            default: break;
        }
    }
}

// The panels shared out over ``threads`` threads in contiguous runs, aligned to 4 panels so that one-row
// passes stay 4 panels wide.
template <typename T>
void linear(const float* x, int64_t M, int64_t I, const T* wp, const float* scale, const float* bias, float* y,
            int64_t O, int threads) {
    const int64_t panels = (O + kPanel - 1) / kPanel;
    if (threads <= 1 || panels < 8) {
        chunk<T>(x, M, I, wp, scale, bias, y, O, 0, panels);
        return;
    }
#if defined(_OPENMP)
    const int64_t groups = (panels + 3) / 4;
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t g0 = groups * t / n, g1 = groups * (t + 1) / n;
        const int64_t p0 = g0 * 4, p1 = g1 * 4 < panels ? g1 * 4 : panels;
        if (p0 < p1) chunk<T>(x, M, I, wp, scale, bias, y, O, p0, p1);
    }
#else
    chunk<T>(x, M, I, wp, scale, bias, y, O, 0, panels);
#endif
}

}  // namespace

extern "C" {

// The ABI version ``native.py`` checks before it uses a build.
int mtpl_abi_version() { return 6; }

// y (M, O) = x (M, I) W^T + bias (nullable), W packed as described above; all arrays contiguous float32.
void mtpl_linear(const float* x, int64_t M, int64_t I, const float* wp, const float* bias, float* y, int64_t O,
                 int threads) {
    linear<float>(x, M, I, wp, nullptr, bias, y, O, threads);
}

// The same with an int8 weight in the same panel layout and one float32 scale per output column:
// y = (x Wq^T) * scale + bias, the sums in float32 (only the weight is quantized, not x).
void mtpl_linear_q8(const float* x, int64_t M, int64_t I, const int8_t* wp, const float* scale, const float* bias,
                    float* y, int64_t O, int threads) {
    linear<int8_t>(x, M, I, wp, scale, bias, y, O, threads);
}

}  // extern "C"

// ---- greedy drafts from rank-r CP factors --------------------------------------------------------
//
// A greedy speculative draft (docs/method.md, "Self-speculative decoding") from the draft logits
// z (ks, r, V) of one position and the expert posterior pi (r) after the last emitted token: for
// s = 0..ks-1,
//     d_s = argmax_x sum_a pi_a softmax(z[s, a])(x),   then pi_a <- pi_a softmax(z[s, a])(d_s), renormalised.
// A draft only proposes tokens (the verifier decides what is emitted), so the exponential here is a
// fast polynomial one (relative error about 2e-7 on the reduced range) rather than libm's.

namespace {

// e^x for 8 floats: x = n ln2 + t, |t| <= ln2 / 2, e^t by a degree-6 Taylor polynomial, 2^n through the
// exponent bits. Inputs below -87 give 0 (they are x - max of a softmax row, so the result underflows).
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // t = x - n ln2, with ln2 split in two for precision
    __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    t = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), t);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// A softmax row's numerators in place: zr (V) := exp(zr - max); returns 1 / their sum.
inline float exp_row(float* zr, int64_t V) {
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < V; i += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(zr + i));
    const __m256 m = _mm256_set1_ps(hmax8(mx));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < V; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(zr + i), m));
        _mm256_storeu_ps(zr + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    return 1.0f / hsum8(sum);
}

}  // namespace

// The sizes the chain takes: V a multiple of 8, 1 <= r <= 16, 1 <= ks and ks * r <= 1024 (its buffers).
static bool chain_fits(int64_t ks, int64_t r, int64_t V) {
    return V % 8 == 0 && r >= 1 && r <= 16 && ks >= 1 && ks * r <= 1024;
}

// One row: z (ks, r, V) float32 logits, overwritten with exp(z - rowmax); pi (r) the unnormalised
// posterior (non-negative, overwritten); tokens (ks) int64 out. Ties go to the lowest index, as
// torch.argmax does.
static void greedy_chain_row(float* z, int64_t ks, int64_t r, int64_t V, float* pi, int64_t* tokens) {
    float inv[1024];  // 1 / sum of exp per (s, a) row
    for (int64_t row = 0; row < ks * r; ++row) inv[row] = exp_row(z + row * V, V);
    const float tiny = 1.17549435e-38f;
    for (int64_t s = 0; s < ks; ++s) {
        float total = 0;
        for (int64_t a = 0; a < r; ++a) total += pi[a];
        float coef[16] = {0};
        for (int64_t a = 0; a < r; ++a) coef[a] = (total > 0 ? pi[a] / total : 1.0f / r) * inv[s * r + a];
        const float* zs = z + s * r * V;
        float best = -1.0f;
        int64_t arg = 0;
        for (int64_t i = 0; i < V; i += 8) {
            __m256 q = _mm256_mul_ps(_mm256_set1_ps(coef[0]), _mm256_loadu_ps(zs + i));
            for (int64_t a = 1; a < r; ++a) q = _mm256_fmadd_ps(_mm256_set1_ps(coef[a]), _mm256_loadu_ps(zs + a * V + i), q);
            if (hmax8(q) > best) {  // rare after the first blocks: find the lane only then
                float lanes[8];
                _mm256_storeu_ps(lanes, q);
                for (int j = 0; j < 8; ++j)
                    if (lanes[j] > best) { best = lanes[j]; arg = i + j; }
            }
        }
        tokens[s] = arg;
        for (int64_t a = 0; a < r; ++a) {
            const float p = zs[a * V + arg] * inv[s * r + a];
            pi[a] = (total > 0 ? pi[a] / total : 1.0f / r) * (p > tiny ? p : tiny);
        }
    }
}


extern "C" {

// B rows of ``greedy_chain_row``: z (B, ks, r, V), pi (B, r), tokens (B, ks); V a multiple of 8,
// r <= 16, ks * r <= 1024. Returns 0, or -1 for sizes it does not take (nothing is written then).
int mtpl_greedy_chain(float* z, int64_t B, int64_t ks, int64_t r, int64_t V, float* pi, int64_t* tokens) {
    if (!chain_fits(ks, r, V)) return -1;
    for (int64_t b = 0; b < B; ++b) greedy_chain_row(z + b * ks * r * V, ks, r, V, pi + b * r, tokens + b * ks);
    return 0;
}

}  // extern "C"

// ---- a whole greedy draft in one call ------------------------------------------------------------
//
// For B rows: the draft maps h_{s,a} = W_{s,a} u (``mlp`` heads: u + SiLU(W_{s,a} u)) for the k draft
// offsets and r experts from the state u (D), through an int8 weight (k * r * D, D) packed as above;
// the logits of the first ks offsets through the int8 unembedding (V, D); then the greedy chain from
// the posterior pi (r). One call replaces two products, the activation and the chain's dozen small ops.

namespace {

inline __m256 silu8(__m256 v) {  // v / (1 + e^-v)
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

}  // namespace

extern "C" {

// u (B, D); the posterior comes from joint (B, r, V), the verifier's router-weighted offset-1 factors
// w_a P_a^(1), at the last token c (B,): pi_a = joint[b, a, c_b] (at least the smallest normal float);
// tokens (B, ks) out; maps (wq, ws) for k * r * D outputs, unembedding (uq, us) for V outputs; h
// (k * r * D) and logits (ks * r * V) float32 scratch. mlp != 0: the residual SiLU form. Returns 0, or -1
// for sizes or tokens it does not take.
int mtpl_greedy_draft(const float* u, int64_t B, int64_t D, const int8_t* wq, const float* ws, const int8_t* uq,
                      const float* us, int64_t V, int64_t k, int64_t ks, int64_t r, int mlp, const float* joint,
                      const int64_t* c, float* h, float* logits, int64_t* tokens, int threads) {
    if (!chain_fits(ks, r, V) || D % 8 != 0 || ks > k) return -1;
    for (int64_t b = 0; b < B; ++b)
        if (c[b] < 0 || c[b] >= V) return -1;
    for (int64_t b = 0; b < B; ++b) {
        float pi[16];
        for (int64_t a = 0; a < r; ++a) {
            const float p = joint[(b * r + a) * V + c[b]];
            pi[a] = p > 1.17549435e-38f ? p : 1.17549435e-38f;
        }
        const float* ub = u + b * D;
        linear<int8_t>(ub, 1, D, wq, ws, nullptr, h, k * r * D, threads);
        if (mlp) {
            for (int64_t j = 0; j < k * r; ++j)
                for (int64_t i = 0; i < D; i += 8)
                    _mm256_storeu_ps(h + j * D + i, _mm256_add_ps(_mm256_loadu_ps(ub + i), silu8(_mm256_loadu_ps(h + j * D + i))));
        }
        linear<int8_t>(h, ks * r, D, uq, us, nullptr, logits, V, threads);
        greedy_chain_row(logits, ks, r, V, pi, tokens + b * ks);
    }
    return 0;
}

}  // extern "C"

// ---- the marginal verifier's mixture -------------------------------------------------------------

extern "C" {

// z (N, r, V) logits -> z := w_a softmax(z_a) in place (the router-weighted factors), and
// marginal (N, V) := sum over a of them, summed in the order a = 0, 1, .., r-1. w (N, r) router weights.
// The exponential is ``exp8`` (relative error about 2e-7). V a multiple of 8. Returns 0, or -1.
int mtpl_mixture(float* z, int64_t N, int64_t r, int64_t V, const float* w, float* marginal) {
    if (V % 8 != 0 || r < 1) return -1;
    for (int64_t n = 0; n < N; ++n) {
        float* out = marginal + n * V;
        for (int64_t a = 0; a < r; ++a) {
            float* zr = z + (n * r + a) * V;
            const __m256 scale = _mm256_set1_ps(w[n * r + a] * exp_row(zr, V));
            for (int64_t i = 0; i < V; i += 8) {
                const __m256 j = _mm256_mul_ps(_mm256_loadu_ps(zr + i), scale);
                _mm256_storeu_ps(zr + i, j);
                _mm256_storeu_ps(out + i, a == 0 ? j : _mm256_add_ps(_mm256_loadu_ps(out + i), j));
            }
        }
    }
    return 0;
}

}  // extern "C"
