/*
 * Fused float32 passes of kl_div_from_logits for the NumPy fast path.
 *
 * kldiv_spec.backends._fused_logits.rows_f32(s, t, vocab, kl, grad, terms, temperature,
 * grad_scale, factor, reverse) evaluates one block of rows: s and t are the student's and
 * the teacher's logits (C-contiguous float32 buffers of rows * vocab values, any
 * alignment), and for every row, with s' = s / T and t' = t / T (each quotient rounded to
 * float32, as NumPy's s / T is: T is first rounded to float32),
 *
 *     m_s = max s',  x_s = s' - m_s,  Z_s = sum exp(x_s)      (the same for t: m_t, x_t, Z_t)
 *     log q = x_s - log Z_s,  log p = x_t - log Z_t,
 *
 * the forward divergence (w = p the weight, o = q; reverse swaps them) is
 *
 *     KL = sum_i w_i (log w_i - log o_i) = S / Z_w + log Z_o - log Z_w,
 *     S  = sum_i exp(x_w,i) d_i,   d_i = x_w,i - x_o,i,
 *
 * so that no logarithm of the logits' size is formed: three passes over a row, the
 * first reading it from memory and the others from the core's cache:
 *
 *   1. the maxima of s and t (m = max(s) / T: the quotient is monotonic in s), computed
 *      for the next row within pass 2 of this one, so that the reads from memory overlap
 *      the arithmetic;
 *   2. exp(x_s) and exp(x_t), summed into Z_s and Z_t, and the products exp(x_w) d
 *      summed into S. Each difference d, exp and product is rounded to float32 and the
 *      sums are accumulated in float64 (in a fixed order: the result does not depend on
 *      the blocks or threads). With KL_x the exact divergence of the float32 shifted
 *      logits x, u = 2^-24 and eta <= 0.6832 ulp <= 1.37 u the relative error of exp
 *      on normal results, the row's error is at most about
 *          |KL - KL_x| <= (2 eta + 2u) sum_i w_i |d_i| + 2 eta      (under 5u sum w|d| + 3u)
 *      plus the float64 sums' n 2^-53 relatively (tests/test_backend_numpy_logits_fused.py
 *      checks it). The ufunc path's float32 logarithms and pairwise sums add errors of
 *      u (|log Z| + |m|) per term and log2(n) u; both are within the documented
 *      8 u sum_i W_i of docs/logits.md, since |d_i| <= |x_w,i| + |x_o,i|;
 *   3. when asked, the gradient of the student's logits for a reduction (upstream
 *      gradient constant along the row, cG),
 *          forward: cG q - cG p = exp(x_s) (cG / Z_s) - exp(x_t) (cG / Z_t),
 *          reverse: cG q (log q - log p - KL) = exp(x_s) (cG / Z_s) (d + (C - KL)),
 *      and/or the terms w (log w - log o) times factor, exp(x_w) (factor / Z_w) (d + C),
 *      with C = log Z_o - log Z_w (the per-row constants in float64, then float32); a
 *      term whose weight is 0 is +0. The exponentials of pass 2 are kept for it in the
 *      output they are replaced by (the gradient, or the terms) and, for exp(x_t) of the
 *      forward gradient, in one scratch row per call: O(vocab) memory.
 *
 * Excluded classes (a logit of -inf, or a shift z / T - m that overflows to -inf) stay
 * here: exp gives 0 for them, and a product whose weight exp(x_w) is 0 is dropped from S
 * (its d is infinite or NaN), as a term whose weight is 0 is +0 and a reverse gradient
 * whose q is 0 is 0 in pass 3. A row then has finite Z_s, Z_t and S unless the weighting
 * distribution keeps a class the other excludes (d = +inf: S = +inf) or a side is -inf
 * only (its maximum replaced by 0, as the reference does, and Z = 0); those rows are
 * walked again class by class with the reference's rules (kl_special_row): a divergence
 * of +inf or NaN, their terms and reverse gradient, and the forward gradient
 * cG q - cG p of pass 3, which needs no special case. Rows with a NaN or +inf logit, or a
 * quotient z / T that overflows to +inf, have a NaN Z; they, and the rare rows where
 * kl_special_row cannot tell the reference's zero weights from tiny ones, get the marker
 * KL_REDO_BITS (a NaN with a payload) as divergence and NaN gradient and terms, so that
 * the caller evaluates them again with the reference. Within the other rows nothing
 * overflows: x_s, x_t <= 0, so |d| <= max(|x_s|, |x_t|) where both are finite.
 *
 * grad may be s itself (the same float32 buffer): the gradient then replaces the student's
 * logits, as a caller that no longer needs them asks (the chunks of kl_div_from_hidden: 8
 * bytes per class and row instead of 12). Such a call is staged as half precision is
 * (below): both exponentials kept in scratch rows, each vector of s read in pass 3 before
 * the gradient's is written over it, the rows kl_special_row settles evaluated on copies,
 * and a redo row left as it was, its logits intact for the caller's second evaluation.
 *
 * kl (a writable C-contiguous float64 buffer of one value per row, any alignment) receives
 * the rows' divergences. With kl None, only the forward gradient is computed (a backward
 * that needs no loss), in every row: there the natural IEEE evaluation already has the
 * specification's values (0 - 0 where both exclude a class, NaN in rows without a
 * softmax: cG / Z is inf or NaN there), as the ufunc path's.
 *
 * exp is evaluated eight lanes at a time with AVX2 and FMA: x = n ln 2 + r with n =
 * round(x log2 e) and |r| <= ln 2 / 2 (and a little); r = (x - n LN2_HEAD) - n LN2_TAIL,
 * where LN2_HEAD has 9 significant bits so that the first step is exact, and c, the
 * rounding error of the second step, is recovered with one more FMA; 1 + r = h + lo
 * exactly (Fast2Sum), and e^r = h + (lo + c + r^2 P(r)) with P a degree-4 polynomial
 * fitted (weighted least squares at Chebyshev nodes, then rounded to float32) to
 * (e^r - 1 - r) / r^2; 2^n goes into the exponent. Eight lanes with -86.5 <= x <= 88
 * (normal results: the common case) skip the fix-ups, and so do eight lanes each either
 * so or below -104 (+0: the -inf of excluded classes); otherwise 2^n is applied as two
 * factors 2^(n/2), so that a subnormal result is rounded once, x < -104 gives +0 (-inf
 * included), x > 89 gives +inf and NaN stays NaN. Over every float32 x in [-104, 89]
 * (benchmarks/exp_sweep.py, against float64 exp) the error is at most 0.7706 ulp of
 * the exact value (at x = -87.7053833, a subnormal result; 0.6832 ulp over the normal
 * results, at x = 5.2317009), every result is faithfully rounded, and 0.184% are not
 * correctly rounded; NumPy's float32 exp there: 2.5408 ulp, 1.9% not faithful.
 *
 * The build passes -ffp-contract=off: only the explicit FMAs of exp are fused. The buffers
 * may start at any byte and are read and written with memcpy (unaligned loads and stores).
 * rows_half(..., bfloat16) takes float16 logits (buffers 'e') or the bits of bfloat16 ones
 * (int16 or uint16 buffers). The same passes, specialised per element type (kl_rows_as),
 * read them in their own width, widening eight lanes at a time (exact), keep the
 * exponentials for pass 3 in two float32 scratch rows and round the gradient and terms once,
 * to nearest even, to the dtype; a row that needs kl_special_row or the reference is widened
 * whole into float32 rows and evaluated as rows_f32 evaluates it (kl_row_widened). Its values
 * are thus rows_f32's on the widened logits, rounded once, bit for bit; it holds seven rows
 * of float32 scratch. Reading half the bytes, it is as fast as rows_f32 or faster.
 *
 * Without AVX2, FMA and F16C at run time (or on another architecture) rows_f32, rows_half and exp_f32
 * return NotImplemented and the caller uses NumPy's ufuncs. The GIL is released while a
 * block is evaluated, so the blocks of one call run in parallel on the caller's threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>

#include "_kl_simd.h"

#if KL_X86
/* Built with -fno-wrapv (pyproject.toml): Python's CFLAGS bring -fwrapv, with which GCC
 * lays out the passes below about 1.5 times slower (register spills in the loops of pass
 * 2: dense rows with a gradient 1.39 ms against 0.92 ms per 16 x 32000 block, rows
 * mostly of -inf 2.5 times). Nothing here relies on signed overflow wrapping, and the
 * floating-point results are the same. */
#endif

/* What one call computes. */
typedef struct {
    kl_scale scale;     /* s / T (see _kl_simd.h) */
    int reverse;        /* 0: KL(p || q), 1: KL(q || p) */
    int softmax_only;   /* only the forward gradient (kl not asked) */
    double grad_scale;  /* cG */
    double factor;      /* the terms' factor */
} kl_options;

#if KL_X86





/* Add the eight float lanes of ``v`` to the two float64 accumulators ``acc``. */
KL_TARGET static inline void kl_accumulate(__m256d *acc, __m256 v)
{
    acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

KL_TARGET static inline double kl_total(const __m256d *acc)
{
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc[0], acc[1]));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/* One row's shifted logits x = s' - m of eight lanes. */
#define KL_SHIFTED(src, m) _mm256_sub_ps(kl_divide8((src), &o->scale), (m))

/* Pass 2 of one row: Z_s, Z_t and (unless ``sums_only``) S; exp(x_s) and exp(x_t) are
 * also stored at ``es_out`` and ``et_out`` where these are not NULL. Pass 1 of the next
 * row (``next_s``, ``next_t``; NULL for none) runs in the same loop, so that its reads
 * from memory overlap this row's arithmetic: its maxima go to ``next_max``. */
KL_GENERIC void kl_sums_as(const unsigned char *s,
                                                       const unsigned char *t, Py_ssize_t n,
                                                       float ms, float mt, const kl_options *o,
                                                       int sums_only, unsigned char *es_out,
                                                       unsigned char *et_out, double *zs,
                                                       double *zt, double *sw,
                                                       const unsigned char *next_s,
                                                       const unsigned char *next_t,
                                                       float *next_max, kl_format fmt)
{
    __m256 nms = _mm256_set1_ps(-INFINITY), nmt = nms;
    const Py_ssize_t full = n - n % 8;
    const size_t lane = sizeof(float), size = kl_format_size(fmt);
    const __m256 vms = _mm256_set1_ps(ms), vmt = _mm256_set1_ps(mt);
    __m256d as[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    __m256d at[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    __m256d aw[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    for (Py_ssize_t i = 0; i < n; i += 8) {
        Py_ssize_t rest = n - i < 8 ? n - i : 8;
        __m256 sv, tv, keep = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        if (rest == 8) {
            sv = kl_load8_as(s + i * size, fmt);
            tv = kl_load8_as(t + i * size, fmt);
        } else {
            sv = kl_load_tail_as(s + i * size, rest, fmt);
            tv = kl_load_tail_as(t + i * size, rest, fmt);
            keep = kl_lanes(rest);
        }
        if (next_s != NULL && i < full) {
            nms = _mm256_max_ps(kl_load8_as(next_s + i * size, fmt), nms);
            nmt = _mm256_max_ps(kl_load8_as(next_t + i * size, fmt), nmt);
        }
        __m256 xs = KL_SHIFTED(sv, vms), xt = KL_SHIFTED(tv, vmt);
        __m256 es = _mm256_and_ps(kl_exp8(xs), keep), et = _mm256_and_ps(kl_exp8(xt), keep);
        kl_accumulate(as, es);
        kl_accumulate(at, et);
        if (!sums_only) {
            /* a weight 0 contributes 0 (its d may be infinite or NaN: an excluded class);
             * the lanes past the row's end have a weight 0 */
            __m256 d = o->reverse ? _mm256_sub_ps(xs, xt) : _mm256_sub_ps(xt, xs);
            __m256 ew = o->reverse ? es : et;
            __m256 weighted = _mm256_cmp_ps(ew, _mm256_setzero_ps(), _CMP_GT_OQ);
            kl_accumulate(aw, _mm256_and_ps(_mm256_mul_ps(ew, d), weighted));
        }
        if (rest == 8) {
            if (es_out != NULL) {
                kl_store8(es_out + i * lane, es);
            }
            if (et_out != NULL) {
                kl_store8(et_out + i * lane, et);
            }
        } else {
            if (es_out != NULL) {
                kl_store_tail(es_out + i * lane, es, rest);
            }
            if (et_out != NULL) {
                kl_store_tail(et_out + i * lane, et, rest);
            }
        }
    }
    *zs = kl_total(as);
    *zt = kl_total(at);
    *sw = kl_total(aw);
    if (next_s != NULL) {
        next_max[0] = kl_max_finish(nms, next_s + full * size, n - full, fmt);
        next_max[1] = kl_max_finish(nmt, next_t + full * size, n - full, fmt);
    }
}

/* Where one row's pass 3 reads and writes. */
typedef struct {
    const unsigned char *s, *t;  /* the logits (read for d) */
    const unsigned char *es, *et; /* exp(x_s), exp(x_t) stored by pass 2 (NULL: not needed) */
    unsigned char *grad, *terms;  /* the outputs (NULL: not asked) */
} kl_row;

/* Pass 3 of one row: the gradient (``a`` = cG / Z_s, ``b`` = cG / Z_t forward, or
 * ``a`` = cG / Z_s and ``k`` = C - KL reverse) and the terms (``f`` = factor / Z_w,
 * ``c`` = C). A stored exponential may live in the output it is replaced by: each
 * vector is read before it is written. */
KL_GENERIC void kl_outputs_as(const kl_row *row, Py_ssize_t n,
                                                          float ms, float mt,
                                                          const kl_options *o, float a, float b,
                                                          float k, float f, float c,
                                 kl_format fmt)
{
    const size_t lane = sizeof(float), size = kl_format_size(fmt);
    const __m256 vms = _mm256_set1_ps(ms), vmt = _mm256_set1_ps(mt);
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vk = _mm256_set1_ps(k);
    const __m256 vf = _mm256_set1_ps(f), vc = _mm256_set1_ps(c);
    const __m256 zero = _mm256_setzero_ps();
    const int need_d = row->terms != NULL || o->reverse;
    for (Py_ssize_t i = 0; i < n; i += 8) {
        Py_ssize_t rest = n - i < 8 ? n - i : 8;
        __m256 es = zero, et = zero, d = zero;
        if (rest == 8) {
            if (row->es != NULL) {
                es = kl_load8(row->es + i * lane);
            }
            if (row->et != NULL) {
                et = kl_load8(row->et + i * lane);
            }
        } else {
            if (row->es != NULL) {
                es = kl_load_tail(row->es + i * lane, rest);
            }
            if (row->et != NULL) {
                et = kl_load_tail(row->et + i * lane, rest);
            }
        }
        if (need_d) {
            __m256 sv, tv;
            if (rest == 8) {
                sv = kl_load8_as(row->s + i * size, fmt);
                tv = kl_load8_as(row->t + i * size, fmt);
            } else {
                sv = kl_load_tail_as(row->s + i * size, rest, fmt);
                tv = kl_load_tail_as(row->t + i * size, rest, fmt);
            }
            __m256 xs = KL_SHIFTED(sv, vms), xt = KL_SHIFTED(tv, vmt);
            d = o->reverse ? _mm256_sub_ps(xs, xt) : _mm256_sub_ps(xt, xs);
        }
        if (row->grad != NULL) {
            __m256 g;
            if (o->reverse) {
                /* q = 0: 0 (d is -inf or NaN where the student excludes the class) */
                __m256 q = _mm256_mul_ps(es, va);
                g = _mm256_andnot_ps(_mm256_cmp_ps(q, zero, _CMP_EQ_OQ),
                                     _mm256_mul_ps(q, _mm256_add_ps(d, vk)));
            } else {
                g = _mm256_sub_ps(_mm256_mul_ps(es, va), _mm256_mul_ps(et, vb));
            }
            if (rest == 8) {
                kl_store8_as(row->grad + i * size, g, fmt);
            } else {
                kl_store_tail_as(row->grad + i * size, g, rest, fmt);
            }
        }
        if (row->terms != NULL) {
            __m256 w = _mm256_mul_ps(o->reverse ? es : et, vf);
            __m256 e = _mm256_mul_ps(w, _mm256_add_ps(d, vc));
            e = _mm256_andnot_ps(_mm256_cmp_ps(w, zero, _CMP_EQ_OQ), e); /* weight 0: +0 */
            if (rest == 8) {
                kl_store8_as(row->terms + i * size, e, fmt);
            } else {
                kl_store_tail_as(row->terms + i * size, e, rest, fmt);
            }
        }
    }
}

/* The specialisations of the passes, one per element type. */
#define KL_SPECIALISE(suffix, fmt)                                                             \
    KL_TARGET static float kl_max_##suffix(const unsigned char *p, Py_ssize_t n)               \
    {                                                                                          \
        return kl_max_as(p, n, fmt);                                                           \
    }                                                                                          \
    KL_TARGET static void kl_sums_##suffix(                                                    \
        const unsigned char *s, const unsigned char *t, Py_ssize_t n, float ms, float mt,      \
        const kl_options *o, int sums_only, unsigned char *es_out, unsigned char *et_out,      \
        double *zs, double *zt, double *sw, const unsigned char *next_s,                       \
        const unsigned char *next_t, float *next_max)                                          \
    {                                                                                          \
        kl_sums_as(s, t, n, ms, mt, o, sums_only, es_out, et_out, zs, zt, sw, next_s, next_t,  \
                   next_max, fmt);                                                             \
    }                                                                                          \
    KL_TARGET static void kl_outputs_##suffix(const kl_row *row, Py_ssize_t n, float ms,       \
                                              float mt, const kl_options *o, float a, float b, \
                                              float k, float f, float c)                       \
    {                                                                                          \
        kl_outputs_as(row, n, ms, mt, o, a, b, k, f, c, fmt);                                  \
    }
KL_SPECIALISE(f32, KL_F32)
KL_SPECIALISE(bf16, KL_BF16)
KL_SPECIALISE(f16, KL_F16)

/* Dispatch on a ``fmt`` that is a constant where it is used (folded away). */
#define KL_BY_FORMAT(fmt, name, ...)                                                           \
    ((fmt) == KL_F32 ? name##_f32(__VA_ARGS__)                                                 \
                     : (fmt) == KL_BF16 ? name##_bf16(__VA_ARGS__) : name##_f16(__VA_ARGS__))


/* Whether the reference's probability of a class is 0 (see kl_special_row). */
enum { KL_ZERO, KL_POSITIVE, KL_UNSURE, KL_UNDEFINED };

/* The status of the probability exp(x - log Z) of the shifted logit ``x`` (float32, as
 * the reference forms it), ``log_z`` -inf for a row without a softmax (Z = 0). */
static inline int kl_weight(float x, double log_z)
{
    if (log_z == -INFINITY) {
        return KL_UNDEFINED; /* the reference's probabilities are NaN */
    }
    if (x == -INFINITY) {
        return KL_ZERO;
    }
    double lw = (double)x - log_z; /* the reference's float32 log-probability, within 1e-5 */
    if (lw > -87.0) {
        return KL_POSITIVE; /* a normal float32 probability, for any faithful exp */
    }
    return lw < -105.0 ? KL_ZERO : KL_UNSURE; /* under half the least subnormal: 0 */
}

/* The divergence (``value``), the reverse gradient and the terms of a row whose plain
 * evaluation is not finite although no logit is NaN or +inf: a row of -inf only on
 * either side (Z = 0: a NaN divergence) or a class that the weighting distribution keeps
 * and the other excludes (d = +inf: S = +inf). Walked again class by class with the
 * reference's rules: a term is 0 where the reference's weight is 0, NaN where the
 * weighting distribution has no softmax, NaN where only the other has none, +inf where
 * the other excludes the class, the plain product otherwise; the reverse gradient
 * cG q (log q - log p - KL) is 0 where q = 0 and otherwise NaN (KL NaN, or a log-ratio of
 * +inf minus a KL of +inf) or cG * -inf. The forward gradient needs no walk: cG q - cG p
 * is already the reference's (kl_outputs). Where the weight 0 of a class with an infinite
 * factor cannot be told from the float32 rounding of its probability (a log-probability
 * between -105 and -87), or where every class with d = +inf has such a tiny weight (the
 * divergence is then finite), it returns -1 and the row goes to the reference. */
KL_TARGET static int kl_special_row(const kl_row *row, Py_ssize_t n,
                                                             float ms, float mt,
                                                             const kl_options *o, double zs,
                                                             double zt, double *value)
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
    const float f = (float)(o->factor / zw), c = (float)(lzo - lzw);
    const float infinite_grad = (float)(o->grad_scale * -INFINITY);
    const unsigned char *ew_src = reverse ? row->es : row->et;
    const size_t lane = sizeof(float);
    int conflict_positive = 0, conflict_other = 0, done = 0;
    Py_ssize_t i = 0;
    if (!undefined) {
        /* Eight classes at a time while every lane's weight is surely 0 or surely positive
         * (KL_ZERO or KL_POSITIVE, from the same float64 log-probability as kl_weight):
         * the same values as the class-by-class walk below, which takes over from the
         * first block with a lane it cannot settle (KL_UNSURE), and does the row's tail. */
        const __m256 vms = _mm256_set1_ps(ms), vmt = _mm256_set1_ps(mt);
        const __m256 ninf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
        const __m256 vf = _mm256_set1_ps(f), vc = _mm256_set1_ps(c);
        const __m256 vinf = _mm256_set1_ps(INFINITY), vnan = _mm256_set1_ps(NAN);
        const __m256 vgrad = _mm256_set1_ps(infinite_grad);
        const __m256d vlzw = _mm256_set1_pd(lzw);
        const __m256d positive_bound = _mm256_set1_pd(-87.0), zero_bound = _mm256_set1_pd(-105.0);
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (; i + 8 <= n; i += 8) {
            const __m256 xs = KL_SHIFTED(kl_load8(row->s + i * lane), vms);
            const __m256 xt = KL_SHIFTED(kl_load8(row->t + i * lane), vmt);
            const __m256 xw = reverse ? xs : xt, xo = reverse ? xt : xs;
            const __m256d lw0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xw)), vlzw);
            const __m256d lw1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xw, 1)), vlzw);
            const int positive =
                _mm256_movemask_pd(_mm256_cmp_pd(lw0, positive_bound, _CMP_GT_OQ)) |
                (_mm256_movemask_pd(_mm256_cmp_pd(lw1, positive_bound, _CMP_GT_OQ)) << 4);
            const int low = _mm256_movemask_pd(_mm256_cmp_pd(lw0, zero_bound, _CMP_LT_OQ)) |
                            (_mm256_movemask_pd(_mm256_cmp_pd(lw1, zero_bound, _CMP_LT_OQ)) << 4);
            const __m256 excluded = _mm256_cmp_ps(xw, ninf, _CMP_EQ_OQ);
            if ((positive | low | _mm256_movemask_ps(excluded)) != 0xff) {
                break; /* a weight kl_weight calls KL_UNSURE: class by class from here */
            }
            /* d = +inf: the other distribution excludes a class the weighting one keeps */
            const __m256 conflict = _mm256_andnot_ps(excluded, _mm256_cmp_ps(xo, ninf, _CMP_EQ_OQ));
            const int conflict_bits = _mm256_movemask_ps(conflict);
            if (conflict_bits & positive) {
                conflict_positive = 1;
                if (row->terms == NULL && !want_grad) {
                    done = 1; /* the divergence is +inf: nothing more to learn */
                    break;
                }
            }
            if (conflict_bits & ~positive) {
                conflict_other = 1;
            }
            /* all ones where the weight is positive, zeros where it is 0 */
            const __m256 kept = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                _mm256_and_si256(_mm256_set1_epi32(positive), bit), bit));
            __m256 ew = zero;
            if (ew_src != NULL) {
                ew = kl_load8(ew_src + i * lane); /* read before an output replaces it */
            }
            if (row->terms != NULL) {
                const __m256 w = _mm256_mul_ps(ew, vf);
                __m256 e = _mm256_mul_ps(w, _mm256_add_ps(_mm256_sub_ps(xw, xo), vc));
                e = _mm256_andnot_ps(_mm256_cmp_ps(w, zero, _CMP_EQ_OQ), e);
                e = _mm256_and_ps(_mm256_blendv_ps(e, vinf, conflict), kept);
                kl_store8(row->terms + i * lane, e);
            }
            if (want_grad) {
                const __m256 g = _mm256_and_ps(_mm256_blendv_ps(vgrad, vnan, conflict), kept);
                kl_store8(row->grad + i * lane, g);
            }
        }
    }
    for (; i < n && !done; i++) {
        float sv, tv, ew = 0.0f;
        memcpy(&sv, row->s + i * lane, lane);
        memcpy(&tv, row->t + i * lane, lane);
        if (ew_src != NULL) {
            memcpy(&ew, ew_src + i * lane, lane); /* read before an output replaces it */
        }
        const float xs = kl_divide1(sv, &o->scale) - ms, xt = kl_divide1(tv, &o->scale) - mt;
        const float xw = reverse ? xs : xt, xo = reverse ? xt : xs;
        const int status = kl_weight(xw, lzw);
        const int conflict = xo == -INFINITY && xw != -INFINITY; /* d = +inf */
        if (conflict && !undefined) {
            if (status == KL_POSITIVE) {
                conflict_positive = 1;
                if (row->terms == NULL && !want_grad) {
                    break; /* the divergence is +inf: nothing more to learn */
                }
            } else {
                conflict_other = 1;
            }
        }
        if (row->terms != NULL) {
            float e;
            if (status == KL_ZERO) {
                e = 0.0f;
            } else if (status == KL_UNDEFINED) {
                e = NAN;
            } else if (zo == 0 || conflict) {
                if (status == KL_UNSURE) {
                    return -1;
                }
                e = zo == 0 ? NAN : INFINITY;
            } else {
                const float w = ew * f;
                e = w == 0 ? 0.0f : w * ((xw - xo) + c);
            }
            memcpy(row->terms + i * lane, &e, lane);
        }
        if (want_grad) {
            float g;
            if (status == KL_ZERO) {
                g = 0.0f;
            } else if (status == KL_UNSURE) {
                return -1;
            } else if (status == KL_UNDEFINED || undefined || conflict) {
                g = NAN;
            } else {
                g = infinite_grad;
            }
            memcpy(row->grad + i * lane, &g, lane);
        }
    }
    if (undefined) {
        *value = NAN;
        return 0;
    }
    if (!conflict_positive) {
        (void)conflict_other; /* only tiny weights meet d = +inf: a finite divergence */
        return -1;
    }
    *value = INFINITY;
    return 0;
}

/* Whether kl_rows needs a scratch row: for exp(x_t) of the forward gradient. */
static int kl_scratch_needed(const kl_options *o, int have_grad)
{
    return have_grad && !o->reverse;
}

/* ``n`` elements of ``format`` at ``src`` widened to float32 at ``dst`` (exact). */
KL_TARGET static void kl_widen(const unsigned char *src, unsigned char *dst, Py_ssize_t n,
                               kl_format format)
{
    const size_t size = kl_format_size(format), lane = sizeof(float);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        kl_store8(dst + i * lane, kl_load8_as(src + i * size, format));
    }
    if (i < n) {
        kl_store_tail(dst + i * lane, kl_load_tail_as(src + i * size, n - i, format), n - i);
    }
}

/* ``n`` floats at ``src`` rounded (to nearest, ties to even) to ``format`` at ``dst``. */
KL_TARGET static void kl_narrow(const unsigned char *src, unsigned char *dst, Py_ssize_t n,
                                kl_format format)
{
    const size_t size = kl_format_size(format), lane = sizeof(float);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        kl_store8_as(dst + i * size, kl_load8(src + i * lane), format);
    }
    if (i < n) {
        kl_store_tail_as(dst + i * size, kl_load_tail(src + i * lane, n - i), n - i, format);
    }
}

/* Rows of floats of scratch a block needs: float32, one (for exp(x_t) of the forward
 * gradient, where kl_scratch_needed says so); half precision, KL_HALF_WORK_ROWS: exp(x_s)
 * and exp(x_t) (the outputs are too narrow to keep them), and five for kl_row_widened. */
#define KL_HALF_WORK_ROWS 7

KL_TARGET static void kl_rows_f32(const unsigned char *s, const unsigned char *t,
                                  Py_ssize_t rows, Py_ssize_t vocab, unsigned char *kl,
                                  unsigned char *grad, unsigned char *terms,
                                  unsigned char *scratch, const kl_options *o);

/* Whether the divergence stored at ``kl`` is the redo marker. */
static int kl_is_redo(const unsigned char *kl)
{
    unsigned long long bits;
    memcpy(&bits, kl, sizeof bits);
    return bits == KL_REDO_BITS;
}

/* One staged row the passes cannot settle (a NaN or +inf logit, a row of -inf, a class the
 * weighting side keeps and the other excludes): half precision, or float32 whose gradient
 * replaces its logits (grad == s). Widened exactly into float32 rows (copied, for
 * float32), evaluated by kl_rows_f32 (its special-row walk, or its redo marker), and its
 * gradient and terms rounded once to ``fmt``. A redo row of a call in place keeps its
 * logits (no NaN gradient written over them): the caller reads them again. ``work``
 * holds five rows of floats. */
KL_TARGET static void kl_row_widened(const unsigned char *s, const unsigned char *t,
                                     Py_ssize_t vocab, unsigned char *kl, unsigned char *grad,
                                     unsigned char *terms, unsigned char *work,
                                     const kl_options *o, kl_format fmt)
{
    const size_t float_row = (size_t)vocab * sizeof(float);
    unsigned char *sf = work, *tf = work + float_row, *gf = work + 2 * float_row;
    unsigned char *ef = work + 3 * float_row, *scratch = work + 4 * float_row;
    kl_widen(s, sf, vocab, fmt);
    kl_widen(t, tf, vocab, fmt);
    kl_rows_f32(sf, tf, 1, vocab, kl, grad == NULL ? NULL : gf, terms == NULL ? NULL : ef,
                scratch, o);
    if (grad != NULL && !(grad == s && kl_is_redo(kl))) {
        kl_narrow(gf, grad, vocab, fmt);
    }
    if (terms != NULL) {
        kl_narrow(ef, terms, vocab, fmt);
    }
}

/* Every row of the block (see the top of this file), logits and outputs of element type
 * ``fmt``; ``scratch`` holds the rows of floats KL_HALF_WORK_ROWS and kl_scratch_needed
 * say (NULL for none). Half precision reads its own type in the passes (the exponentials
 * kept for pass 3 in float32 scratch rows) and rounds the gradient and terms once; the rows
 * that need kl_special_row or the reference go through kl_row_widened, so every value is
 * the float32 kernel's on the widened logits, rounded once. */
KL_GENERIC void kl_rows_as(const unsigned char *s, const unsigned char *t, Py_ssize_t rows,
                           Py_ssize_t vocab, unsigned char *kl, unsigned char *grad,
                           unsigned char *terms, unsigned char *scratch, const kl_options *o,
                           kl_format fmt)
{
    const int half = fmt != KL_F32;
    /* staged: the exponentials pass 3 needs live in scratch rows, and a row the passes
     * cannot settle goes through kl_row_widened. Half precision (its outputs are too
     * narrow to keep them), and a float32 gradient written over the student's logits
     * (grad == s: the logits are read in pass 3, and kept for the reference in a redo
     * row). */
    const int staged = half || (grad != NULL && grad == s);
    const size_t row_bytes = (size_t)vocab * kl_format_size(fmt);
    const size_t float_row = (size_t)vocab * sizeof(float);
    float raw_max[2] = {-INFINITY, -INFINITY};
    if (rows > 0) {
        raw_max[0] = KL_BY_FORMAT(fmt, kl_max, s, vocab);
        raw_max[1] = KL_BY_FORMAT(fmt, kl_max, t, vocab);
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        kl_row row = {s + r * row_bytes, t + r * row_bytes, NULL, NULL,
                      grad == NULL ? NULL : grad + r * row_bytes,
                      terms == NULL ? NULL : terms + r * row_bytes};
        /* where pass 2 keeps the exponentials pass 3 needs: exp(x_s) (the gradient, or the
         * reverse terms) in an output; exp(x_t) (forward) in an output or the scratch row;
         * half precision: both in scratch rows */
        unsigned char *es_out = NULL, *et_out = NULL;
        if (row.grad != NULL || (row.terms != NULL && o->reverse)) {
            es_out = staged ? scratch : row.grad != NULL ? row.grad : row.terms;
        }
        if (!o->reverse && (row.grad != NULL || row.terms != NULL)) {
            et_out = staged ? scratch + float_row : row.grad != NULL ? scratch : row.terms;
        }
        row.es = es_out;
        row.et = et_out;
        float ms = kl_divide1(raw_max[0], &o->scale), mt = kl_divide1(raw_max[1], &o->scale);
        const int last = r + 1 == rows;
        /* a row of -inf only is not shifted (its Z is 0), as in the reference */
        ms = ms == -INFINITY ? 0.0f : ms;
        mt = mt == -INFINITY ? 0.0f : mt;
        double zs, zt, sw;
        KL_BY_FORMAT(fmt, kl_sums, row.s, row.t, vocab, ms, mt, o, o->softmax_only, es_out,
                     et_out, &zs, &zt, &sw, last ? NULL : row.s + row_bytes,
                     last ? NULL : row.t + row_bytes, raw_max);
        if (o->softmax_only) {
            /* cG / 0 = inf (times exp = 0: NaN) and cG / NaN = NaN give NaN rows, as q - p */
            KL_BY_FORMAT(fmt, kl_outputs, &row, vocab, ms, mt, o, (float)(o->grad_scale / zs),
                         (float)(o->grad_scale / zt), 0.0f, 0.0f, 0.0f);
            continue;
        }
        /* NaN or +inf logits (or a quotient z / T that overflows to +inf) make Z NaN: those
         * rows are the reference's. Otherwise Z is finite, and 0 only for a row of -inf. */
        int redo = !(isfinite(zs) && isfinite(zt));
        if (staged && (redo || !(zs > 0 && zt > 0 && isfinite(sw)))) {
            kl_row_widened(row.s, row.t, vocab, kl + r * sizeof(double), row.grad, row.terms,
                           scratch + 2 * float_row, o, fmt);
            continue;
        }
        if (!redo && !(zs > 0 && zt > 0 && isfinite(sw))) {
            double value;
            kl_row special = row;
            special.grad = o->reverse ? row.grad : NULL;
            redo = kl_special_row(&special, vocab, ms, mt, o, zs, zt, &value) < 0;
            if (!redo) {
                kl_store_double(kl, r, value);
                if (row.grad != NULL && !o->reverse) { /* cG q - cG p, NaN where Z = 0 */
                    kl_row forward = row;
                    forward.terms = NULL;
                    kl_outputs_f32(&forward, vocab, ms, mt, o, (float)(o->grad_scale / zs),
                                   (float)(o->grad_scale / zt), 0.0f, 0.0f, 0.0f);
                }
                continue;
            }
        }
        if (redo) {
            kl_store_double(kl, r, kl_redo()); /* evaluated again by the caller */
            if (row.grad != NULL) {
                kl_fill(row.grad, vocab, NAN);
            }
            if (row.terms != NULL) {
                kl_fill(row.terms, vocab, NAN);
            }
            continue;
        }
        double zw = o->reverse ? zs : zt, zo = o->reverse ? zt : zs;
        double c = log(zo) - log(zw); /* log w_i - log o_i = d_i + c */
        double value = sw / zw + c;
        kl_store_double(kl, r, value);
        if (row.grad == NULL && row.terms == NULL) {
            continue;
        }
        KL_BY_FORMAT(fmt, kl_outputs, &row, vocab, ms, mt, o, (float)(o->grad_scale / zs),
                     (float)(o->grad_scale / zt), (float)(c - value), (float)(o->factor / zw),
                     (float)c);
    }
}

KL_TARGET static void kl_rows_f32(const unsigned char *s, const unsigned char *t,
                                  Py_ssize_t rows, Py_ssize_t vocab, unsigned char *kl,
                                  unsigned char *grad, unsigned char *terms,
                                  unsigned char *scratch, const kl_options *o)
{
    kl_rows_as(s, t, rows, vocab, kl, grad, terms, scratch, o, KL_F32);
}

/* The rows of a half-precision block (kl_rows_as); ``work`` holds KL_HALF_WORK_ROWS rows
 * of floats. */
KL_TARGET static void kl_rows_half(const unsigned char *s, const unsigned char *t,
                                   Py_ssize_t rows, Py_ssize_t vocab, unsigned char *kl,
                                   unsigned char *grad, unsigned char *terms,
                                   unsigned char *work, const kl_options *o, kl_format format)
{
    if (format == KL_BF16) {
        kl_rows_as(s, t, rows, vocab, kl, grad, terms, work, o, KL_BF16);
    } else {
        kl_rows_as(s, t, rows, vocab, kl, grad, terms, work, o, KL_F16);
    }
}

/* exp of ``n`` lanes of ``src`` into ``dst`` (any alignment). */
KL_TARGET static void kl_exp_avx2(const unsigned char *src,
                                                           unsigned char *dst, Py_ssize_t n)
{
    const size_t lane = sizeof(float);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        kl_store8(dst + i * lane, kl_exp8(kl_load8(src + i * lane)));
    }
    if (i < n) {
        kl_store_tail(dst + i * lane, kl_exp8(kl_load_tail(src + i * lane, n - i)), n - i);
    }
}

#endif


/* rows_f32 and rows_half: ``element`` the logits' (and outputs') element type. */
static PyObject *kl_rows_call(PyObject *const *args, kl_format element)
{
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    kl_rows_args a;
    if (kl_rows_scalars(args, 1, &a) < 0) {
        return NULL;
    }
    kl_options o = {0};
    if (kl_scale_from(a.temperature, &o.scale) < 0) {
        return NULL;
    }
    o.reverse = a.last != 0.0;
    o.grad_scale = a.grad_scale;
    o.factor = a.factor;
    if (kl_rows_buffers(args, element, 0, "kl", 0, &a) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    o.softmax_only = kl_rows_softmax_only(&a, o.reverse);
    if (o.softmax_only < 0) {
        goto done;
    }
#if KL_X86
    unsigned char *scratch = NULL;
    /* a float32 gradient written over the student's logits is staged as half precision */
    const int in_place = a.have_grad && a.grad.buf == a.s.buf;
    size_t scratch_rows = element == KL_F32 && !in_place
                              ? (kl_scratch_needed(&o, a.have_grad) ? 1 : 0)
                              : KL_HALF_WORK_ROWS;
    if (scratch_rows > 0) {
        scratch = PyMem_RawMalloc(scratch_rows * (size_t)a.vocab * sizeof(float));
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    const unsigned char *s_buf = a.s.buf, *t_buf = a.t.buf;
    unsigned char *kl_buf = a.have_out ? a.out.buf : NULL;
    unsigned char *g_buf = a.have_grad ? a.grad.buf : NULL;
    unsigned char *e_buf = a.have_terms ? a.terms.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (element == KL_F32) {
        kl_rows_f32(s_buf, t_buf, a.rows, a.vocab, kl_buf, g_buf, e_buf, scratch, &o);
    } else {
        kl_rows_half(s_buf, t_buf, a.rows, a.vocab, kl_buf, g_buf, e_buf, scratch, &o, element);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
#endif
    result = Py_None;
    Py_INCREF(result);
done:
    kl_rows_release(&a);
    return result;
}

static PyObject *kl_rows_f32_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "rows_f32(s, t, vocab, kl, grad, terms, temperature, grad_scale, "
                        "factor, reverse) takes ten arguments");
        return NULL;
    }
    return kl_rows_call(args, KL_F32);
}

static PyObject *kl_rows_half_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError,
                        "rows_half(s, t, vocab, kl, grad, terms, temperature, grad_scale, "
                        "factor, reverse, bfloat16) takes eleven arguments");
        return NULL;
    }
    int bfloat16 = PyObject_IsTrue(args[10]);
    if (bfloat16 < 0) {
        return NULL;
    }
    return kl_rows_call(args, bfloat16 ? KL_BF16 : KL_F16);
}

static PyObject *kl_exp_f32(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_buffer src, dst;
    const int held = kl_exp_buffers(args, nargs, 0, "exp_f32", &src, &dst);
    if (held != 0) {
        if (held < 0) {
            return NULL;
        }
        Py_RETURN_NOTIMPLEMENTED;
    }
#if KL_X86
    Py_BEGIN_ALLOW_THREADS
    kl_exp_avx2((const unsigned char *)src.buf, (unsigned char *)dst.buf, src.len / 4);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *kl_available(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(kl_have_avx2());
}

static PyMethodDef kl_methods[] = {
    {"rows_f32", (PyCFunction)(void (*)(void))kl_rows_f32_entry, METH_FASTCALL,
     "rows_f32(s, t, vocab, kl, grad, terms, temperature, grad_scale, factor, reverse, /): "
     "one block of rows of kl_div_from_logits in float32 (NotImplemented without AVX2)."},
    {"rows_half", (PyCFunction)(void (*)(void))kl_rows_half_entry, METH_FASTCALL,
     "rows_half(s, t, vocab, kl, grad, terms, temperature, grad_scale, factor, reverse, "
     "bfloat16, /): rows_f32 on float16 logits (bfloat16=False: buffers 'e') or bfloat16 "
     "logits (bfloat16=True: int16/uint16 buffers of their bits), computed in float32, the "
     "gradient and terms rounded to the dtype (NotImplemented without AVX2)."},
    {"exp_f32", (PyCFunction)(void (*)(void))kl_exp_f32, METH_FASTCALL,
     "exp_f32(src, dst, /): the vectorised float32 exp of src into dst (for the tests)."},
    {"available", kl_available, METH_NOARGS,
     "available() -> bool: whether this CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kl_module = {
    PyModuleDef_HEAD_INIT,
    "_fused_logits",
    "Fused AVX2 passes of kl_div_from_logits in float32 (see backends/_fused_logits.c).",
    -1,
    kl_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__fused_logits(void) { return PyModule_Create(&kl_module); }
