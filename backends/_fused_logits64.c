/*
 * Fused float64 passes of kl_div_from_logits for the NumPy fast path.
 *
 * kldiv_spec.backends._fused_logits64.rows_f64(s, t, vocab, kl, grad, terms, temperature,
 * grad_scale, factor, reverse) is rows_f32 of backends/_fused_logits.c for float64 logits:
 * the same arguments, None handling, outputs, edge values and marker (KL_REDO_BITS), and the
 * same algorithm, read there first. Every buffer holds float64 ('d', any alignment) and all
 * arithmetic is float64: s' = s / T is the reference's quotient (kldiv_spec/_core_logits.py
 * divides the float64 logits by the float64 T; s * (1 / T) where T is a power of 2 whose
 * inverse is normal, the same value), m = max s' (the quotient is monotonic in s),
 * x = s' - m, and per row
 *
 *     Z_s = sum exp(x_s),  Z_t = sum exp(x_t),  S = sum exp(x_w) d,  d = x_w - x_o,
 *     KL = S / Z_w + log Z_o - log Z_w                 (w = p, o = q forward; swapped reverse)
 *
 * in three passes (the maxima, fused into pass 2 of the previous row; the sums; the
 * gradient cG (q - p) forward or cG q (d + C - KL) reverse, and/or the terms
 * factor w (d + C), C = log Z_o - log Z_w), with the exponentials of pass 2 kept in the
 * output they are replaced by and, for exp(x_t) of the forward gradient, one float64
 * scratch row per call. log is libm's, once per row. Excluded classes (-inf, or a shift
 * that overflows to -inf) stay here; rows that need it are walked by kl64_special_row (a
 * scalar walk: rows without a softmax, or a class the weighting side keeps and the other
 * excludes); rows with NaN or +inf logits (or a quotient that overflows to +inf), and the
 * rare rows the walk cannot settle, get KL_REDO_BITS, with NaN gradient and terms.
 *
 * exp, four lanes at a time (AVX2 and FMA): x = (4 m + j) ln 2 / 4 + r with k = 4 m + j =
 * round(x 4 / ln 2) (formed by adding 1.5 * 2^52, whose low bits then hold k), j = k mod 4
 * and |r| <= ln 2 / 8 (and a little); r = (x - k H) - k L with ln 2 / 4 = H + L, H of 32
 * significant bits (k H and x - k H are exact; L's rounding and that of the second step
 * leave |error(r)| <= 2^-57, relatively 2^-57 in the result). Then
 *
 *     e^x = 2^m (T_j + (T_j (r + r^2 P(r)) + T'_j)),
 *
 * T_j + T'_j = 2^(j/4) (two doubles; the four pairs picked with one cross-lane permutation
 * each, no gather), P a degree-7 Chebyshev fit of (e^r - 1 - r) / r^2 (r + r^2 P is within
 * 1.1e-19 of e^r - 1, relatively), evaluated by Estrin's scheme. The last addition rounds
 * once (0.5 ulp); the small term (up to 0.091 T_j) and P's roundings add up to
 * about 0.2 ulp more. 2^m goes into the exponent bits when every lane is in [-708, 709] or
 * below -746 (+0: excluded classes); otherwise the argument is clamped to [-746, 710] and
 * 2^m applied as two normal factors 2^(m/2) (the second multiply rounds a subnormal result
 * once), x < -746 gives +0 (-inf included), x > 709.79 gives +inf and NaN stays NaN.
 * benchmarks/logits64_bench.py --exp-sweep 12000000 measures it against exp in x87 long
 * double (checked against mpmath at 40 digits on the worst 200 and 20000 others): over 12
 * million arguments in [-745.2, 709.8] (half uniform, a quarter over the subnormal results,
 * the rest near 0 and in [-30, 30]) the error is at most 0.7852 ulp of the exact value (at
 * x = -708.675856050392, a subnormal result), 0.6982 ulp over the normal results (at x =
 * -273.8816538497493); every result is faithfully rounded and 1.88% are not correctly
 * rounded (NumPy's float64 exp there: at most 0.7183 ulp, 3.40% not correctly rounded).
 * It costs about 1.1 ns per value on the machine of the measurements (AMD EPYC, Zen 4, in
 * cache), NumPy's float64 exp (AVX-512) about 0.85 ns and the float32 kernel's 0.47 ns.
 *
 * The sums are float64, compensated: each lane adds 4 consecutive vectors (16 classes: a
 * chain of at most 3 roundings), and each such block sum is folded into a per-lane
 * (hi, lo) pair with TwoSum (Knuth, six additions, error-free); the four lanes' pairs are
 * summed at the end with TwoSum again. With u = 2^-53, the computed sum of n values v is
 * within (3u + 2u + O(n u^2)) sum |v| of the exact sum of the values (4u + 3u for the
 * final lanes' sum: at most 8u sum |v| in all, for n < 2^40), independent of n, where
 * NumPy's pairwise sums are within about (log2(n / 128) + 19) u sum |v| (27u at 32000
 * classes). The order is fixed: results do not depend on the blocks or threads.
 *
 * Error of a row's divergence against KL_x, the exact divergence of the float64 shifted
 * logits x the kernel forms (those of the reference): with eta <= 0.70 ulp <= 1.4 u the
 * exp's relative error, each product exp(x_w) d rounded twice (d and the product: 2u),
 * the sums 8u, log from libm (< 1 ulp) and the three final operations,
 *     |KL - KL_x| <= (2 eta + 18u) sum_i w_i |d_i| + 2 (eta + 8u) + 2u (|log Z_s| +
 *                    |log Z_t| + |KL|)          (under 21u sum w|d| + 19u + 2u (...)),
 * which tests/test_backend_numpy_logits64.py checks against mpmath at 50 digits. Measured on
 * 240 random rows (3 to 1000 classes, spreads 0.3 to 20, T 0.5 to 3, both directions) the
 * error is at most 5.9u (sum w|d| + 1) and 0.15 of the bound; the plain float64 NumPy
 * formula on the same x: 6.0u (sum w|d| + 1). The ufunc path's float64 logarithms and
 * pairwise sums add u (|log Z| + |m|) per term and (log2(n / 128) + 19) u.
 *
 * The build passes -ffp-contract=off (only the explicit FMAs of exp are fused) and
 * -fno-wrapv, as for _fused_logits.c. Without AVX2 and FMA at run time (or on another
 * architecture) rows_f64 and exp_f64 return NotImplemented and the caller uses NumPy's
 * ufuncs. The GIL is released while a block is evaluated.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>

#include "_kl_simd.h"

/* What one call computes. */
typedef struct {
    double temperature; /* T */
    int multiply;       /* 1: s / T computed as s * (1 / T), exactly the same (T a power of 2) */
    double inverse;     /* 1 / T when multiply */
    int reverse;        /* 0: KL(p || q), 1: KL(q || p) */
    int softmax_only;   /* only the forward gradient (kl not asked) */
    double grad_scale;  /* cG */
    double factor;      /* the terms' factor */
} kl64_options;

#if KL_X86

/* --- float64 vector helpers (candidates for _kl_simd.h) ----------------------------------- */

/* Inlined wherever used (GCC would call exp as a function, which triples its cost). */
#define KL64_INLINE KL_TARGET static inline __attribute__((always_inline))

#define KL64_LANE sizeof(double)
#define KL64_SHIFTER 0x1.8p52                 /* 1.5 * 2^52: x + it rounds x to an integer */
#define KL64_INV_LN2_4 0x1.71547652b82fep+2   /* 4 / ln 2 */
#define KL64_LN2_4_HEAD 0x1.62e42ff000000p-3  /* ln 2 / 4, 32 significant bits */
#define KL64_LN2_4_TAIL -0x1.718432a1b0e26p-37 /* ln 2 / 4 - HEAD */

/* 2^(j/4) = KL64_EXP2_HI[j] + KL64_EXP2_LO[j] (the head rounded to nearest). */
static const double KL64_EXP2_HI[4] = {
    0x1.0000000000000p+0, 0x1.306fe0a31b715p+0, 0x1.6a09e667f3bcdp+0, 0x1.ae89f995ad3adp+0};
static const double KL64_EXP2_LO[4] = {
    0x0.0p+0, 0x1.6f46ad23182e4p-55, -0x1.bdd3413b26456p-54, 0x1.7a1cd345dcc81p-54};
/* P(r) ~ (e^r - 1 - r) / r^2 on |r| <= ln 2 / 8 (a Chebyshev fit of degree 7, mpmath's
 * chebyfit at 40 digits, rounded to doubles), highest degree first: r + r^2 P(r) is within
 * 1.1e-19 of e^r - 1 relatively to e^r (0.0005 ulp). */
static const double KL64_P[8] = {
    0x1.71eb2716c5245p-19, 0x1.a02bc737f70c9p-16, 0x1.a01a016200a29p-13,
    0x1.6c16c116b386ap-10, 0x1.1111111111709p-7,  0x1.55555555565bep-5,
    0x1.5555555555555p-3,  0x1.0000000000000p-1};

KL64_INLINE __m256d kl64_load4(const unsigned char *p)
{
    __m256d v;
    memcpy(&v, p, sizeof v);
    return v;
}

KL64_INLINE void kl64_store4(unsigned char *p, __m256d v) { memcpy(p, &v, sizeof v); }

/* ``rest`` (< 4) doubles from ``p`` in the low lanes, zeros above. */
KL64_INLINE __m256d kl64_load_tail(const unsigned char *p, Py_ssize_t rest)
{
    double buffer[4] = {0.0, 0.0, 0.0, 0.0};
    memcpy(buffer, p, (size_t)rest * KL64_LANE);
    return _mm256_loadu_pd(buffer);
}

KL64_INLINE void kl64_store_tail(unsigned char *p, __m256d v, Py_ssize_t rest)
{
    double buffer[4];
    _mm256_storeu_pd(buffer, v);
    memcpy(p, buffer, (size_t)rest * KL64_LANE);
}

/* All ones in the low ``rest`` lanes. */
KL64_INLINE __m256d kl64_lanes(Py_ssize_t rest)
{
    const __m256i index = _mm256_setr_epi64x(0, 1, 2, 3);
    return _mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_set1_epi64x(rest), index));
}

/* The four doubles of ``table`` picked by the int64 lanes ``j`` (0 to 3): one cross-lane
 * permutation of their 32-bit halves (AVX2 has no 64-bit one; no gather). */
KL64_INLINE __m256d kl64_pick(const double *table, __m256i j)
{
    /* lane i takes floats 2j and 2j + 1 (vpermps reads the low 3 bits of each index) */
    const __m256i twice = _mm256_shuffle_epi32(_mm256_slli_epi64(j, 1), 0xa0); /* 0, 0, 2, 2 */
    const __m256i index = _mm256_or_si256(twice, _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1));
    return _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_loadu_ps((const float *)table), index));
}

/* y = 2^(j/4) e^r for x = (4 m + j) ln 2 / 4 + r; ``k`` = 4 m + j (a double) and ``scale``
 * = m << 52 (the bits to add to y's for 2^m y, when that is normal). */
KL64_INLINE __m256d kl64_exp4_reduced(__m256d x, __m256d *k, __m256i *scale)
{
    const __m256d shifter = _mm256_set1_pd(KL64_SHIFTER);
    const __m256d big = _mm256_fmadd_pd(x, _mm256_set1_pd(KL64_INV_LN2_4), shifter);
    const __m256d kd = _mm256_sub_pd(big, shifter); /* exact */
    __m256d r = _mm256_fnmadd_pd(kd, _mm256_set1_pd(KL64_LN2_4_HEAD), x); /* exact */
    r = _mm256_fnmadd_pd(kd, _mm256_set1_pd(KL64_LN2_4_TAIL), r);
    /* big's bits are those of 1.5 * 2^52 plus k: j = k mod 4 in the low bits, and
     * (bits - j) << 50 = m << 52 (the constant's bits shift out) */
    const __m256i bits = _mm256_castpd_si256(big);
    const __m256i j = _mm256_and_si256(bits, _mm256_set1_epi64x(3));
    const __m256d hi = kl64_pick(KL64_EXP2_HI, j), lo = kl64_pick(KL64_EXP2_LO, j);
    /* P(r) by Estrin's scheme (a short dependency chain) */
    const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2);
    const __m256d q0 = _mm256_fmadd_pd(_mm256_set1_pd(KL64_P[6]), r, _mm256_set1_pd(KL64_P[7]));
    const __m256d q1 = _mm256_fmadd_pd(_mm256_set1_pd(KL64_P[4]), r, _mm256_set1_pd(KL64_P[5]));
    const __m256d q2 = _mm256_fmadd_pd(_mm256_set1_pd(KL64_P[2]), r, _mm256_set1_pd(KL64_P[3]));
    const __m256d q3 = _mm256_fmadd_pd(_mm256_set1_pd(KL64_P[0]), r, _mm256_set1_pd(KL64_P[1]));
    const __m256d low = _mm256_fmadd_pd(q1, r2, q0), high = _mm256_fmadd_pd(q3, r2, q2);
    __m256d p = _mm256_fmadd_pd(high, r4, low);
    p = _mm256_fmadd_pd(p, r2, r); /* e^r - 1 */
    *k = kd;
    *scale = _mm256_slli_epi64(_mm256_sub_epi64(bits, j), 50);
    return _mm256_add_pd(hi, _mm256_fmadd_pd(hi, p, lo));
}

/* 2^m for lanes holding integers -1022 <= m <= 1023 (as doubles). */
KL64_INLINE __m256d kl64_pow2(__m256d m)
{
    const __m256i bits = _mm256_castpd_si256(_mm256_add_pd(m, _mm256_set1_pd(KL64_SHIFTER)));
    return _mm256_castsi256_pd(
        _mm256_slli_epi64(_mm256_add_epi64(bits, _mm256_set1_epi64x(1023)), 52));
}

/* exp of any four lanes. */
KL_TARGET static inline __m256d kl64_exp4_any(__m256d x)
{
    /* clamp (max_pd returns its second operand where the first is NaN) */
    const __m256d xc =
        _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(-746.0)), _mm256_set1_pd(710.0));
    __m256d k;
    __m256i scale;
    const __m256d y = kl64_exp4_reduced(xc, &k, &scale);
    /* m in [-1077, 1024]: both halves in [-539, 512], normal powers of 2 */
    const __m256d m = _mm256_floor_pd(_mm256_mul_pd(k, _mm256_set1_pd(0.25)));
    const __m256d m1 = _mm256_floor_pd(_mm256_mul_pd(m, _mm256_set1_pd(0.5)));
    const __m256d m2 = _mm256_sub_pd(m, m1);
    __m256d result = _mm256_mul_pd(_mm256_mul_pd(y, kl64_pow2(m1)), kl64_pow2(m2));
    result = _mm256_andnot_pd(_mm256_cmp_pd(x, _mm256_set1_pd(-746.0), _CMP_LT_OQ), result);
    return _mm256_blendv_pd(result, x, _mm256_cmp_pd(x, x, _CMP_UNORD_Q)); /* NaN stays */
}

/* exp of four lanes, the short way when every result is normal or +0. */
KL64_INLINE __m256d kl64_exp4(__m256d x)
{
    const __m256d zero = _mm256_cmp_pd(x, _mm256_set1_pd(-746.0), _CMP_LT_OQ);
    const __m256d regular = _mm256_and_pd(_mm256_cmp_pd(x, _mm256_set1_pd(-708.0), _CMP_GE_OQ),
                                          _mm256_cmp_pd(x, _mm256_set1_pd(709.0), _CMP_LE_OQ));
    const int zero_bits = _mm256_movemask_pd(zero);
    if (zero_bits == 0xf) {
        return _mm256_setzero_pd();
    }
    if ((zero_bits | _mm256_movemask_pd(regular)) == 0xf) {
        __m256d k;
        __m256i scale;
        const __m256d y = kl64_exp4_reduced(x, &k, &scale);
        return _mm256_andnot_pd(
            zero, _mm256_castsi256_pd(_mm256_add_epi64(_mm256_castpd_si256(y), scale)));
    }
    return kl64_exp4_any(x);
}

/* hi + lo += v, per lane, with TwoSum: hi + lo holds the lanes' running sums exactly but
 * for lo's roundings. */
KL64_INLINE void kl64_fold(__m256d *hi, __m256d *lo, __m256d v)
{
    const __m256d s = _mm256_add_pd(*hi, v);
    const __m256d bv = _mm256_sub_pd(s, *hi);
    const __m256d ah = _mm256_sub_pd(s, bv);
    const __m256d e = _mm256_add_pd(_mm256_sub_pd(*hi, ah), _mm256_sub_pd(v, bv));
    *hi = s;
    *lo = _mm256_add_pd(*lo, e);
}

/* The sum of the four lanes' (hi, lo) pairs, compensated (TwoSum on the heads). */
KL_TARGET static inline double kl64_total(__m256d hi, __m256d lo)
{
    double h[4], l[4];
    _mm256_storeu_pd(h, hi);
    _mm256_storeu_pd(l, lo);
    double sum = 0.0, error = (l[0] + l[1]) + (l[2] + l[3]);
    for (int i = 0; i < 4; i++) {
        const double s = sum + h[i], bv = s - sum, ah = s - bv;
        error += (sum - ah) + (h[i] - bv);
        sum = s;
    }
    return sum + error;
}

/* --- the passes --------------------------------------------------------------------------- */

KL64_INLINE __m256d kl64_scaled4(__m256d v, const kl64_options *o)
{
    return o->multiply ? _mm256_mul_pd(v, _mm256_set1_pd(o->inverse))
                       : _mm256_div_pd(v, _mm256_set1_pd(o->temperature));
}

static inline double kl64_scaled1(double v, const kl64_options *o)
{
    return o->multiply ? v * o->inverse : v / o->temperature;
}

/* The largest of the lanes of ``m`` and the ``rest`` (< 4) doubles at ``p`` (NaN ignored). */
KL_TARGET static double kl64_max_finish(__m256d m0, const unsigned char *p, Py_ssize_t rest)
{
    double lanes[4];
    _mm256_storeu_pd(lanes, m0);
    double m = -INFINITY;
    for (int k = 0; k < 4; k++) {
        m = lanes[k] > m ? lanes[k] : m;
    }
    for (Py_ssize_t i = 0; i < rest; i++) {
        double v;
        memcpy(&v, p + i * KL64_LANE, KL64_LANE);
        m = v > m ? v : m;
    }
    return m;
}

/* The largest of ``n`` doubles at ``p`` (NaN ignored; -inf for none). */
KL_TARGET static double kl64_max(const unsigned char *p, Py_ssize_t n)
{
    __m256d m0 = _mm256_set1_pd(-INFINITY), m1 = m0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        m0 = _mm256_max_pd(kl64_load4(p + i * KL64_LANE), m0);
        m1 = _mm256_max_pd(kl64_load4(p + (i + 4) * KL64_LANE), m1);
    }
    for (; i + 4 <= n; i += 4) {
        m0 = _mm256_max_pd(kl64_load4(p + i * KL64_LANE), m0);
    }
    return kl64_max_finish(_mm256_max_pd(m0, m1), p + i * KL64_LANE, n - i);
}

/* Vectors per block of the sums (each lane adds this many before the TwoSum fold). */
#define KL64_CHAIN 4

/* The running sums of pass 2: per lane, the current block's (a*) and the compensated
 * totals (h*, l*) of Z_s, Z_t and S, and the next row's maxima. */
typedef struct {
    __m256d as, at, aw, hs, ls, ht, lt, hw, lw, nms, nmt;
} kl64_acc;

/* One vector of pass 2, at class ``i``: ``rest`` lanes (4: a full vector, also the next
 * row's maxima there when ``next_s`` is not NULL). */
KL64_INLINE void kl64_sums_step(const unsigned char *s, const unsigned char *t, Py_ssize_t i,
                                Py_ssize_t rest, __m256d vms, __m256d vmt, const kl64_options *o,
                                unsigned char *es_out, unsigned char *et_out,
                                const unsigned char *next_s, const unsigned char *next_t,
                                kl64_acc *acc, int reverse, int sums_only)
{
    const size_t at = (size_t)i * KL64_LANE;
    const __m256d zero = _mm256_setzero_pd();
    __m256d sv, tv, keep = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    if (rest == 4) {
        sv = kl64_load4(s + at);
        tv = kl64_load4(t + at);
        if (next_s != NULL) {
            acc->nms = _mm256_max_pd(kl64_load4(next_s + at), acc->nms);
            acc->nmt = _mm256_max_pd(kl64_load4(next_t + at), acc->nmt);
        }
    } else {
        sv = kl64_load_tail(s + at, rest);
        tv = kl64_load_tail(t + at, rest);
        keep = kl64_lanes(rest);
    }
    const __m256d xs = _mm256_sub_pd(kl64_scaled4(sv, o), vms);
    const __m256d xt = _mm256_sub_pd(kl64_scaled4(tv, o), vmt);
    const __m256d es = _mm256_and_pd(kl64_exp4(xs), keep);
    const __m256d et = _mm256_and_pd(kl64_exp4(xt), keep);
    acc->as = _mm256_add_pd(acc->as, es);
    acc->at = _mm256_add_pd(acc->at, et);
    if (!sums_only) {
        /* a weight 0 contributes 0 (its d may be infinite or NaN); so do the lanes past the
         * row's end */
        const __m256d d = reverse ? _mm256_sub_pd(xs, xt) : _mm256_sub_pd(xt, xs);
        const __m256d ew = reverse ? es : et;
        const __m256d weighted = _mm256_cmp_pd(ew, zero, _CMP_GT_OQ);
        acc->aw = _mm256_add_pd(acc->aw, _mm256_and_pd(_mm256_mul_pd(ew, d), weighted));
    }
    if (rest == 4) {
        if (es_out != NULL) {
            kl64_store4(es_out + at, es);
        }
        if (et_out != NULL) {
            kl64_store4(et_out + at, et);
        }
    } else {
        if (es_out != NULL) {
            kl64_store_tail(es_out + at, es, rest);
        }
        if (et_out != NULL) {
            kl64_store_tail(et_out + at, et, rest);
        }
    }
}

/* The current block's sums folded into the totals (TwoSum), and the block's reset. */
KL64_INLINE void kl64_sums_fold(kl64_acc *acc, int sums_only)
{
    const __m256d zero = _mm256_setzero_pd();
    kl64_fold(&acc->hs, &acc->ls, acc->as);
    kl64_fold(&acc->ht, &acc->lt, acc->at);
    if (!sums_only) {
        kl64_fold(&acc->hw, &acc->lw, acc->aw);
    }
    acc->as = acc->at = acc->aw = zero;
}

/* Pass 2 of one row (see _fused_logits.c's kl_sums_as): Z_s, Z_t and (unless ``sums_only``)
 * S; exp(x_s), exp(x_t) stored at ``es_out``, ``et_out`` where not NULL; the maxima of the
 * next row (``next_s``, ``next_t``; NULL for none) to ``next_max``. Whole blocks of
 * KL64_CHAIN vectors first, then the rest of the row (a last, partial block). */
KL64_INLINE void kl64_sums_as(const unsigned char *s, const unsigned char *t, Py_ssize_t n,
                              double ms, double mt, const kl64_options *o,
                              unsigned char *es_out, unsigned char *et_out, double *zs,
                              double *zt, double *sw, const unsigned char *next_s,
                              const unsigned char *next_t, double *next_max, int reverse,
                              int sums_only)
{
    const Py_ssize_t full = n - n % 4, blocks = n - n % (4 * KL64_CHAIN);
    const __m256d vms = _mm256_set1_pd(ms), vmt = _mm256_set1_pd(mt);
    const __m256d zero = _mm256_setzero_pd(), ninf = _mm256_set1_pd(-INFINITY);
    kl64_acc acc = {zero, zero, zero, zero, zero, zero, zero, zero, zero, ninf, ninf};
    Py_ssize_t i = 0;
    for (; i < blocks; i += 4 * KL64_CHAIN) {
        for (int k = 0; k < KL64_CHAIN; k++) {
            kl64_sums_step(s, t, i + 4 * k, 4, vms, vmt, o, es_out, et_out, next_s, next_t, &acc,
                           reverse, sums_only);
        }
        kl64_sums_fold(&acc, sums_only);
    }
    if (i < n) {
        for (; i < n; i += 4) {
            kl64_sums_step(s, t, i, n - i < 4 ? n - i : 4, vms, vmt, o, es_out, et_out, next_s,
                           next_t, &acc, reverse, sums_only);
        }
        kl64_sums_fold(&acc, sums_only);
    }
    *zs = kl64_total(acc.hs, acc.ls);
    *zt = kl64_total(acc.ht, acc.lt);
    *sw = kl64_total(acc.hw, acc.lw);
    if (next_s != NULL) {
        next_max[0] = kl64_max_finish(acc.nms, next_s + full * KL64_LANE, n - full);
        next_max[1] = kl64_max_finish(acc.nmt, next_t + full * KL64_LANE, n - full);
    }
}

/* Pass 2 specialised for the direction and for the softmax alone (constants in its loop). */
KL_TARGET static void kl64_sums(const unsigned char *s, const unsigned char *t, Py_ssize_t n,
                                double ms, double mt, const kl64_options *o,
                                unsigned char *es_out, unsigned char *et_out, double *zs,
                                double *zt, double *sw, const unsigned char *next_s,
                                const unsigned char *next_t, double *next_max)
{
    if (o->softmax_only) {
        kl64_sums_as(s, t, n, ms, mt, o, es_out, et_out, zs, zt, sw, next_s, next_t, next_max,
                     0, 1);
    } else if (o->reverse) {
        kl64_sums_as(s, t, n, ms, mt, o, es_out, et_out, zs, zt, sw, next_s, next_t, next_max,
                     1, 0);
    } else {
        kl64_sums_as(s, t, n, ms, mt, o, es_out, et_out, zs, zt, sw, next_s, next_t, next_max,
                     0, 0);
    }
}

/* Where one row's pass 3 reads and writes. */
typedef struct {
    const unsigned char *s, *t;   /* the logits (read for d) */
    const unsigned char *es, *et; /* exp(x_s), exp(x_t) stored by pass 2 (NULL: not needed) */
    unsigned char *grad, *terms;  /* the outputs (NULL: not asked) */
} kl64_row;

/* Pass 3 of one row: the gradient (``a`` = cG / Z_s, ``b`` = cG / Z_t forward, or ``a`` and
 * ``k`` = C - KL reverse) and the terms (``f`` = factor / Z_w, ``c`` = C). A stored
 * exponential may live in the output it is replaced by: each vector is read first. */
KL_TARGET static void kl64_outputs(const kl64_row *row, Py_ssize_t n, double ms, double mt,
                                   const kl64_options *o, double a, double b, double k,
                                   double f, double c)
{
    const __m256d vms = _mm256_set1_pd(ms), vmt = _mm256_set1_pd(mt);
    const __m256d va = _mm256_set1_pd(a), vb = _mm256_set1_pd(b), vk = _mm256_set1_pd(k);
    const __m256d vf = _mm256_set1_pd(f), vc = _mm256_set1_pd(c);
    const __m256d zero = _mm256_setzero_pd();
    const int need_d = row->terms != NULL || o->reverse;
    for (Py_ssize_t i = 0; i < n; i += 4) {
        const Py_ssize_t rest = n - i < 4 ? n - i : 4;
        const size_t at = (size_t)i * KL64_LANE;
        __m256d es = zero, et = zero, d = zero;
        if (row->es != NULL) {
            es = rest == 4 ? kl64_load4(row->es + at) : kl64_load_tail(row->es + at, rest);
        }
        if (row->et != NULL) {
            et = rest == 4 ? kl64_load4(row->et + at) : kl64_load_tail(row->et + at, rest);
        }
        if (need_d) {
            const __m256d sv = rest == 4 ? kl64_load4(row->s + at) : kl64_load_tail(row->s + at, rest);
            const __m256d tv = rest == 4 ? kl64_load4(row->t + at) : kl64_load_tail(row->t + at, rest);
            const __m256d xs = _mm256_sub_pd(kl64_scaled4(sv, o), vms);
            const __m256d xt = _mm256_sub_pd(kl64_scaled4(tv, o), vmt);
            d = o->reverse ? _mm256_sub_pd(xs, xt) : _mm256_sub_pd(xt, xs);
        }
        if (row->grad != NULL) {
            __m256d g;
            if (o->reverse) {
                /* q = 0: 0 (d is -inf or NaN where the student excludes the class) */
                const __m256d q = _mm256_mul_pd(es, va);
                g = _mm256_andnot_pd(_mm256_cmp_pd(q, zero, _CMP_EQ_OQ),
                                     _mm256_mul_pd(q, _mm256_add_pd(d, vk)));
            } else {
                g = _mm256_sub_pd(_mm256_mul_pd(es, va), _mm256_mul_pd(et, vb));
            }
            if (rest == 4) {
                kl64_store4(row->grad + at, g);
            } else {
                kl64_store_tail(row->grad + at, g, rest);
            }
        }
        if (row->terms != NULL) {
            const __m256d w = _mm256_mul_pd(o->reverse ? es : et, vf);
            __m256d e = _mm256_mul_pd(w, _mm256_add_pd(d, vc));
            e = _mm256_andnot_pd(_mm256_cmp_pd(w, zero, _CMP_EQ_OQ), e); /* weight 0: +0 */
            if (rest == 4) {
                kl64_store4(row->terms + at, e);
            } else {
                kl64_store_tail(row->terms + at, e, rest);
            }
        }
    }
}

/* ``n`` copies of ``value`` at ``p``. */
static void kl64_fill(unsigned char *p, Py_ssize_t n, double value)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        kl_store_double(p, i, value);
    }
}

/* Whether the reference's probability of a class is 0 (see kl64_special_row). */
enum { KL64_ZERO, KL64_POSITIVE, KL64_UNSURE, KL64_UNDEFINED };

/* The status of the reference's probability exp(x - log Z) of the shifted logit ``x``
 * (``log_z`` -inf for a row without a softmax). exp(-744) is over two least subnormals, so
 * positive for any faithful exp; exp(-746) is under half the least subnormal: 0. */
static inline int kl64_weight(double x, double log_z)
{
    if (log_z == -INFINITY) {
        return KL64_UNDEFINED;
    }
    if (x == -INFINITY) {
        return KL64_ZERO;
    }
    const double lw = x - log_z; /* the reference's log-probability, within 1e-12 */
    if (lw > -744.0) {
        return KL64_POSITIVE;
    }
    return lw < -746.0 ? KL64_ZERO : KL64_UNSURE;
}

/* The divergence (``value``), the reverse gradient and the terms of a row whose plain
 * evaluation is not finite although no logit is NaN or +inf (_fused_logits.c's
 * kl_special_row, class by class): -1 where the reference must decide. */
static int kl64_special_row(const kl64_row *row, Py_ssize_t n, double ms, double mt,
                            const kl64_options *o, double zs, double zt, double *value)
{
    const int reverse = o->reverse;
    const double zw = reverse ? zs : zt, zo = reverse ? zt : zs;
    const double lzw = zw > 0 ? log(zw) : -INFINITY, lzo = zo > 0 ? log(zo) : -INFINITY;
    const int undefined = zw == 0 || zo == 0; /* a row without a softmax: NaN */
    const int want_grad = row->grad != NULL && reverse;
    if (undefined && row->terms == NULL && !want_grad) {
        *value = NAN;
        return 0;
    }
    const double f = o->factor / zw, c = lzo - lzw;
    const double infinite_grad = o->grad_scale * -INFINITY;
    const unsigned char *ew_src = reverse ? row->es : row->et;
    int conflict_positive = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double sv, tv, ew = 0.0;
        memcpy(&sv, row->s + i * KL64_LANE, KL64_LANE);
        memcpy(&tv, row->t + i * KL64_LANE, KL64_LANE);
        if (ew_src != NULL) {
            memcpy(&ew, ew_src + i * KL64_LANE, KL64_LANE); /* read before an output replaces it */
        }
        const double xs = kl64_scaled1(sv, o) - ms, xt = kl64_scaled1(tv, o) - mt;
        const double xw = reverse ? xs : xt, xo = reverse ? xt : xs;
        const int status = kl64_weight(xw, lzw);
        const int conflict = xo == -INFINITY && xw != -INFINITY; /* d = +inf */
        if (conflict && !undefined && status == KL64_POSITIVE) {
            conflict_positive = 1;
            if (row->terms == NULL && !want_grad) {
                break; /* the divergence is +inf: nothing more to learn */
            }
        }
        if (row->terms != NULL) {
            double e;
            if (status == KL64_ZERO) {
                e = 0.0;
            } else if (status == KL64_UNDEFINED) {
                e = NAN;
            } else if (zo == 0 || conflict) {
                if (status == KL64_UNSURE) {
                    return -1;
                }
                e = zo == 0 ? NAN : INFINITY;
            } else {
                const double w = ew * f;
                e = w == 0 ? 0.0 : w * ((xw - xo) + c);
            }
            kl_store_double(row->terms, i, e);
        }
        if (want_grad) {
            double g;
            if (status == KL64_ZERO) {
                g = 0.0;
            } else if (status == KL64_UNSURE) {
                return -1;
            } else if (status == KL64_UNDEFINED || undefined || conflict) {
                g = NAN;
            } else {
                g = infinite_grad;
            }
            kl_store_double(row->grad, i, g);
        }
    }
    if (undefined) {
        *value = NAN;
        return 0;
    }
    if (!conflict_positive) {
        return -1; /* only tiny weights meet d = +inf (or S overflowed): the reference's */
    }
    *value = INFINITY;
    return 0;
}

/* Every row of the block; ``scratch`` holds one row of doubles where the forward gradient
 * is asked (for exp(x_t)), else NULL. */
KL_TARGET static void kl64_rows(const unsigned char *s, const unsigned char *t, Py_ssize_t rows,
                                Py_ssize_t vocab, unsigned char *kl, unsigned char *grad,
                                unsigned char *terms, unsigned char *scratch,
                                const kl64_options *o)
{
    const size_t row_bytes = (size_t)vocab * KL64_LANE;
    double raw_max[2] = {-INFINITY, -INFINITY};
    if (rows > 0) {
        raw_max[0] = kl64_max(s, vocab);
        raw_max[1] = kl64_max(t, vocab);
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        kl64_row row = {s + r * row_bytes, t + r * row_bytes, NULL, NULL,
                        grad == NULL ? NULL : grad + r * row_bytes,
                        terms == NULL ? NULL : terms + r * row_bytes};
        /* exp(x_s) (the gradient, or the reverse terms) in an output; exp(x_t) (forward)
         * in an output or the scratch row */
        unsigned char *es_out = NULL, *et_out = NULL;
        if (row.grad != NULL || (row.terms != NULL && o->reverse)) {
            es_out = row.grad != NULL ? row.grad : row.terms;
        }
        if (!o->reverse && (row.grad != NULL || row.terms != NULL)) {
            et_out = row.grad != NULL ? scratch : row.terms;
        }
        row.es = es_out;
        row.et = et_out;
        double ms = kl64_scaled1(raw_max[0], o), mt = kl64_scaled1(raw_max[1], o);
        const int last = r + 1 == rows;
        /* a row of -inf only is not shifted (its Z is 0), as in the reference */
        ms = ms == -INFINITY ? 0.0 : ms;
        mt = mt == -INFINITY ? 0.0 : mt;
        double zs, zt, sw;
        kl64_sums(row.s, row.t, vocab, ms, mt, o, es_out, et_out, &zs, &zt, &sw,
                  last ? NULL : row.s + row_bytes, last ? NULL : row.t + row_bytes, raw_max);
        if (o->softmax_only) {
            /* cG / 0 = inf (times exp = 0: NaN) and cG / NaN = NaN give NaN rows, as q - p */
            kl64_outputs(&row, vocab, ms, mt, o, o->grad_scale / zs, o->grad_scale / zt, 0.0,
                         0.0, 0.0);
            continue;
        }
        /* NaN or +inf logits (or a quotient that overflows to +inf) make Z NaN: the
         * reference's rows. Otherwise Z is finite, and 0 only for a row of -inf. */
        int redo = !(isfinite(zs) && isfinite(zt));
        if (!redo && !(zs > 0 && zt > 0 && isfinite(sw))) {
            double value;
            kl64_row special = row;
            special.grad = o->reverse ? row.grad : NULL;
            redo = kl64_special_row(&special, vocab, ms, mt, o, zs, zt, &value) < 0;
            if (!redo) {
                kl_store_double(kl, r, value);
                if (row.grad != NULL && !o->reverse) { /* cG q - cG p, NaN where Z = 0 */
                    kl64_row forward = row;
                    forward.terms = NULL;
                    kl64_outputs(&forward, vocab, ms, mt, o, o->grad_scale / zs,
                                 o->grad_scale / zt, 0.0, 0.0, 0.0);
                }
                continue;
            }
        }
        if (redo) {
            kl_store_double(kl, r, kl_redo()); /* evaluated again by the caller */
            if (row.grad != NULL) {
                kl64_fill(row.grad, vocab, NAN);
            }
            if (row.terms != NULL) {
                kl64_fill(row.terms, vocab, NAN);
            }
            continue;
        }
        const double zw = o->reverse ? zs : zt, zo = o->reverse ? zt : zs;
        const double c = log(zo) - log(zw); /* log w_i - log o_i = d_i + c */
        const double value = sw / zw + c;
        kl_store_double(kl, r, value);
        if (row.grad == NULL && row.terms == NULL) {
            continue;
        }
        kl64_outputs(&row, vocab, ms, mt, o, o->grad_scale / zs, o->grad_scale / zt, c - value,
                     o->factor / zw, c);
    }
}

/* exp of ``n`` doubles of ``src`` into ``dst`` (any alignment). */
KL_TARGET static void kl64_exp_avx2(const unsigned char *src, unsigned char *dst, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        kl64_store4(dst + i * KL64_LANE, kl64_exp4(kl64_load4(src + i * KL64_LANE)));
    }
    if (i < n) {
        kl64_store_tail(dst + i * KL64_LANE,
                        kl64_exp4(kl64_load_tail(src + i * KL64_LANE, n - i)), n - i);
    }
}

#endif

static PyObject *kl64_rows_f64(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "rows_f64(s, t, vocab, kl, grad, terms, temperature, grad_scale, "
                        "factor, reverse) takes ten arguments");
        return NULL;
    }
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    kl_rows_args a;
    if (kl_rows_scalars(args, 1, &a) < 0) {
        return NULL;
    }
    const double temperature = a.temperature;
    if (!(isfinite(temperature) && temperature >= 2.2250738585072014e-308)) {
        PyErr_SetString(PyExc_ValueError, "temperature must be a positive normal float64 number");
        return NULL;
    }
    kl64_options o = {0};
    o.temperature = temperature;
    int exponent;
    double mantissa = frexp(temperature, &exponent);
    /* T = 2^(exponent - 1): 1 / T is exact (normal) when exponent - 1 <= 1022 */
    o.multiply = mantissa == 0.5 && exponent - 1 <= 1022;
    o.inverse = o.multiply ? 1.0 / temperature : 0.0;
    o.reverse = a.last != 0.0;
    o.grad_scale = a.grad_scale;
    o.factor = a.factor;
    if (kl_rows_buffers(args, KL_F32, 1, "kl", 0, &a) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    o.softmax_only = kl_rows_softmax_only(&a, o.reverse);
    if (o.softmax_only < 0) {
        goto done;
    }
#if KL_X86
    unsigned char *scratch = NULL;
    if (a.have_grad && !o.reverse) {
        scratch = PyMem_RawMalloc((size_t)a.vocab * sizeof(double));
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    kl64_rows(a.s.buf, a.t.buf, a.rows, a.vocab, a.have_out ? a.out.buf : NULL,
              a.have_grad ? a.grad.buf : NULL, a.have_terms ? a.terms.buf : NULL, scratch, &o);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
#endif
    result = Py_None;
    Py_INCREF(result);
done:
    kl_rows_release(&a);
    return result;
}

static PyObject *kl64_exp_f64(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_buffer src, dst;
    const int held = kl_exp_buffers(args, nargs, 1, "exp_f64", &src, &dst);
    if (held != 0) {
        if (held < 0) {
            return NULL;
        }
        Py_RETURN_NOTIMPLEMENTED;
    }
#if KL_X86
    Py_BEGIN_ALLOW_THREADS
    kl64_exp_avx2((const unsigned char *)src.buf, (unsigned char *)dst.buf, src.len / 8);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *kl64_available(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(kl_have_avx2());
}

static PyMethodDef kl64_methods[] = {
    {"rows_f64", (PyCFunction)(void (*)(void))kl64_rows_f64, METH_FASTCALL,
     "rows_f64(s, t, vocab, kl, grad, terms, temperature, grad_scale, factor, reverse, /): "
     "one block of rows of kl_div_from_logits in float64, rows_f32's contract on float64 "
     "buffers (NotImplemented without AVX2)."},
    {"exp_f64", (PyCFunction)(void (*)(void))kl64_exp_f64, METH_FASTCALL,
     "exp_f64(src, dst, /): the vectorised float64 exp of src into dst (for the tests)."},
    {"available", kl64_available, METH_NOARGS,
     "available() -> bool: whether this CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kl64_module = {
    PyModuleDef_HEAD_INIT,
    "_fused_logits64",
    "Fused AVX2 passes of kl_div_from_logits in float64 (see backends/_fused_logits64.c).",
    -1,
    kl64_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__fused_logits64(void) { return PyModule_Create(&kl64_module); }
