/*
 * Fused float32 passes of the generalised Jensen-Shannon divergence of kl_div_from_logits
 * (its ``beta``, 0 < beta < 1) for the NumPy and PyTorch CPU fast paths.
 *
 * kldiv_spec.backends._fused_jsd.rows_f32(s, t, vocab, jsd, grad, terms, temperature,
 * grad_scale, factor, beta) evaluates one block of rows: s and t are the student's and the
 * teacher's logits (C-contiguous float32 buffers of rows * vocab values, any alignment).
 * Per row, with s' = s / T and t' = t / T rounded to float32 (as NumPy's s / T: T is first
 * rounded to float32),
 *
 *     m_s = max s',  x_s = s' - m_s,  E_s = exp(x_s),  Z_s = sum E_s     (the same for t),
 *     L_s = log Z_s,  q = E_s / Z_s,  log q = x_s - L_s                  (the same for p),
 *     m = beta p + (1 - beta) q,
 *
 * the divergence is
 *
 *     J = beta sum_i p_i (log p_i - log m_i) + (1 - beta) sum_i q_i (log q_i - log m_i).
 *
 * Four passes over a row, the first reading it from memory and the others from the core's
 * cache, with two exponentials and one logarithm per class:
 *
 *   1. the maxima of s and t (max(s) / T: the quotient is monotonic), computed for the next
 *      row within pass 2 of this one;
 *   2. E_s and E_t, summed (float64) into Z_s and Z_t and stored: E_s in the gradient's
 *      output (or a scratch row), E_t in a second scratch row;
 *   3. per class, in float32, the two weights and the mixture
 *          u = alpha E_t = beta p,   v = gamma E_s = (1 - beta) q,   M = u + v = m,
 *      alpha = fl(beta / Z_t), gamma = fl((1 - beta) / Z_s), log m = log M (the vector
 *      log of _kl_simd.h), the log-ratios
 *          d_t = (x_t - l_t) - log M,   d_s = (x_s - l_s) - log M,   l = fl(L),
 *      and the float64 sums S_t = sum_{u > 0} E_t d_t and S_s = sum_{v > 0} E_s d_s, so that
 *          J = beta S_t / Z_t + (1 - beta) S_s / Z_s + beta (l_t - L_t) + (1 - beta) (l_s - L_s)
 *      (the last two terms undo the rounding of L to l, as sum p = 1 to float64's
 *      precision). When asked, the terms factor (u d_t + v d_s) (each product +0 where its
 *      weight is 0) are written here, and d_s (0 where v = 0) replaces E_t in its scratch
 *      row;
 *   4. when asked, the student gradient for a reduction (upstream gradient cG, the same for
 *      every class: grad_scale). e_i depends on q only through q_i, de_i/dq_i =
 *      (1 - beta)(log q_i - log m_i) (the +1s of q log q and m log m cancel), and the
 *      softmax's chain rule gives
 *          grad_j = cG (1 - beta) q_j (d_s,j - R),   R = sum_i q_i d_s,i = S_s / Z_s,
 *      evaluated as fl(cG (1 - beta) / Z_s) E_s,j (d_s,j - fl(R)), a signed 0 where E_s,j = 0.
 *
 * Error. Every product, difference, exp and log is one float32 rounding (u = 2^-24; exp
 * within 0.7706 ulp, log within 0.8265 ulp: 1 ulp <= 2u), the sums are float64. M carries
 * a relative error of at most about 5u (E, alpha or gamma, the product, the sum), so log M
 * an absolute one of 5u + 2u |log m|; d_t then errs by at most about
 * u (7 + 3 |log p| + 3 |log m| + |L_t|) (|x_t| <= |log p| + L_t), and J by
 *     |J - J_x| <= u sum_i (beta p_i + (1 - beta) q_i) (9 + 3|log p_i| + 3|log q_i| + 4|log m_i|
 *                  + |L_t| + |L_s| + |d_t,i| + |d_s,i|)
 * against the exact J_x of the float32 shifted logits x, plus the float64 sums' vocab 2^-53
 * relatively (tests/test_jsd_fused.py checks a bound of this shape, and the oracle's
 * documented 8 u sum_j W_j of conformance/oracle_logits.py, whose W_j holds every one of
 * these magnitudes). Unlike the KL's, the mixture's log-ratios are bounded above
 * (log p - log m <= -log beta), and a class that one distribution excludes has m > 0 where
 * the other keeps it: no +inf and no weight needs telling from a tiny one. A weight that
 * underflows to 0 here (beta p < 2^-149) drops a term below 2^-149 |log p - log m|.
 *
 * Edge values. An excluded class (a logit of -inf, or a shift s' - m that overflows to
 * -inf) has E = 0, so u = 0 or v = 0 and its product is dropped (+0), as the reference's
 * 0 weight; where both exclude it, M = 0, log M = -inf, and both products, the stored d_s
 * and the gradient are 0. A row without a softmax on either side (a NaN or +inf logit, a
 * quotient s / T overflowing to +inf: Z is NaN; only -inf: Z = 0) gets the marker
 * KL_REDO_BITS (a NaN with a payload, _kl_simd.h's, as for the KL) as
 * divergence and NaN gradient and terms: the caller evaluates it again with the reference.
 *
 * The build passes -ffp-contract=off: only the explicit FMAs of exp and log are fused. The
 * buffers may start at any byte. Without AVX2, FMA and F16C at run time (or on another
 * architecture) rows_f32 returns NotImplemented. The GIL is released while a block is
 * evaluated, so the blocks of one call run in parallel on the caller's threads; two
 * scratch rows are allocated per call (O(vocab) memory).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>

#include "_kl_simd.h"

/* What one call computes. */
typedef struct {
    kl_scale scale;    /* s / T (see _kl_simd.h) */
    double beta;       /* 0 < beta < 1 */
    double grad_scale; /* cG */
    double factor;     /* the terms' factor */
} jsd_options;

/* Where one row's passes read and write. */
typedef struct {
    const unsigned char *s, *t; /* the logits */
    unsigned char *es;          /* E_s (the gradient's output, or scratch) */
    unsigned char *et;          /* E_t, then d_s (scratch) */
    unsigned char *grad, *terms; /* the outputs (NULL: not asked) */
} jsd_row;


#if KL_X86



/* Add the eight float lanes of ``v`` to the two float64 accumulators ``acc``. */
KL_TARGET static inline void jsd_accumulate(__m256d *acc, __m256 v)
{
    acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

KL_TARGET static inline double jsd_total(const __m256d *acc)
{
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(acc[0], acc[1]));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/* Eight floats at ``p`` (``rest`` < 8: the low lanes, zeros above). */
KL_TARGET static inline __m256 jsd_load(const unsigned char *p, Py_ssize_t rest)
{
    return rest == 8 ? kl_load8(p) : kl_load_tail(p, rest);
}

KL_TARGET static inline void jsd_store(unsigned char *p, __m256 v, Py_ssize_t rest)
{
    if (rest == 8) {
        kl_store8(p, v);
    } else {
        kl_store_tail(p, v, rest);
    }
}

/* Pass 2 of one row (pass 1 of the next, ``next_s``/``next_t`` non-NULL, in the same
 * loop: its maxima go to ``next_max``): Z_s and Z_t, E_s and E_t stored. */
KL_TARGET static void jsd_sums(const jsd_row *row, Py_ssize_t n, float ms, float mt,
                               const jsd_options *o, double *zs, double *zt,
                               const unsigned char *next_s, const unsigned char *next_t,
                               float *next_max)
{
    const size_t lane = sizeof(float);
    const Py_ssize_t full = n - n % 8;
    const __m256 vms = _mm256_set1_ps(ms), vmt = _mm256_set1_ps(mt);
    __m256 nms = _mm256_set1_ps(-INFINITY), nmt = nms;
    __m256d as[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    __m256d at[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    for (Py_ssize_t i = 0; i < n; i += 8) {
        const Py_ssize_t rest = n - i < 8 ? n - i : 8;
        const __m256 keep = rest == 8 ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : kl_lanes(rest);
        if (next_s != NULL && i < full) {
            nms = _mm256_max_ps(kl_load8(next_s + i * lane), nms);
            nmt = _mm256_max_ps(kl_load8(next_t + i * lane), nmt);
        }
        const __m256 xs = _mm256_sub_ps(kl_divide8(jsd_load(row->s + i * lane, rest), &o->scale), vms);
        const __m256 xt = _mm256_sub_ps(kl_divide8(jsd_load(row->t + i * lane, rest), &o->scale), vmt);
        const __m256 es = _mm256_and_ps(kl_exp8(xs), keep);
        const __m256 et = _mm256_and_ps(kl_exp8(xt), keep);
        jsd_accumulate(as, es);
        jsd_accumulate(at, et);
        jsd_store(row->es + i * lane, es, rest);
        jsd_store(row->et + i * lane, et, rest);
    }
    *zs = jsd_total(as);
    *zt = jsd_total(at);
    if (next_s != NULL) {
        next_max[0] = kl_max_finish(nms, next_s + full * lane, n - full, KL_F32);
        next_max[1] = kl_max_finish(nmt, next_t + full * lane, n - full, KL_F32);
    }
}

/* The per-row constants of passes 3 and 4 (float32, from the float64 sums). */
typedef struct {
    float ms, mt;        /* the shifts */
    float alpha, gamma;  /* beta / Z_t, (1 - beta) / Z_s */
    float lt, ls;        /* fl(log Z_t), fl(log Z_s) */
    float factor;        /* the terms' factor */
} jsd_row_constants;

/* Pass 3 of one row: S_t and S_s; the terms and d_s (over E_t) when asked (``keep_ds``). */
KL_TARGET static void jsd_mixture(const jsd_row *row, Py_ssize_t n, const jsd_options *o,
                                  const jsd_row_constants *k, int keep_ds, double *st,
                                  double *ss)
{
    const size_t lane = sizeof(float);
    const __m256 vms = _mm256_set1_ps(k->ms), vmt = _mm256_set1_ps(k->mt);
    const __m256 valpha = _mm256_set1_ps(k->alpha), vgamma = _mm256_set1_ps(k->gamma);
    const __m256 vlt = _mm256_set1_ps(k->lt), vls = _mm256_set1_ps(k->ls);
    const __m256 vfactor = _mm256_set1_ps(k->factor), zero = _mm256_setzero_ps();
    __m256d at[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    __m256d as[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    for (Py_ssize_t i = 0; i < n; i += 8) {
        const Py_ssize_t rest = n - i < 8 ? n - i : 8;
        const __m256 es = jsd_load(row->es + i * lane, rest);
        const __m256 et = jsd_load(row->et + i * lane, rest); /* read before d_s replaces it */
        const __m256 xs = _mm256_sub_ps(kl_divide8(jsd_load(row->s + i * lane, rest), &o->scale), vms);
        const __m256 xt = _mm256_sub_ps(kl_divide8(jsd_load(row->t + i * lane, rest), &o->scale), vmt);
        const __m256 u = _mm256_mul_ps(valpha, et), v = _mm256_mul_ps(vgamma, es);
        const __m256 lm = kl_log8(_mm256_add_ps(u, v)); /* -inf where both weights are 0 */
        /* all ones where the weight is positive: there x and log M are finite */
        const __m256 pos_u = _mm256_cmp_ps(u, zero, _CMP_GT_OQ);
        const __m256 pos_v = _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
        const __m256 dt = _mm256_and_ps(_mm256_sub_ps(_mm256_sub_ps(xt, vlt), lm), pos_u);
        const __m256 ds = _mm256_and_ps(_mm256_sub_ps(_mm256_sub_ps(xs, vls), lm), pos_v);
        jsd_accumulate(at, _mm256_mul_ps(et, dt));
        jsd_accumulate(as, _mm256_mul_ps(es, ds));
        if (row->terms != NULL) {
            const __m256 e = _mm256_add_ps(_mm256_mul_ps(u, dt), _mm256_mul_ps(v, ds));
            jsd_store(row->terms + i * lane, _mm256_mul_ps(e, vfactor), rest);
        }
        if (keep_ds) {
            jsd_store(row->et + i * lane, ds, rest);
        }
    }
    *st = jsd_total(at);
    *ss = jsd_total(as);
}

/* Pass 4 of one row: grad = a E_s (d_s - big_r) (E_s read from the gradient's output,
 * which it is replaced by). Where E_s = 0, d_s is 0 (pass 3): the gradient is a signed 0,
 * as the reference's 0 * (0 - sum q h). */
KL_TARGET static void jsd_gradient(const jsd_row *row, Py_ssize_t n, float a, float big_r)
{
    const size_t lane = sizeof(float);
    const __m256 va = _mm256_set1_ps(a), vr = _mm256_set1_ps(big_r);
    for (Py_ssize_t i = 0; i < n; i += 8) {
        const Py_ssize_t rest = n - i < 8 ? n - i : 8;
        const __m256 es = jsd_load(row->grad + i * lane, rest);
        const __m256 ds = jsd_load(row->et + i * lane, rest);
        const __m256 g = _mm256_mul_ps(_mm256_mul_ps(va, es), _mm256_sub_ps(ds, vr));
        jsd_store(row->grad + i * lane, g, rest);
    }
}

#endif


#if KL_X86

/* Every row of the block (see the top of this file); ``scratch`` holds two rows of floats. */
KL_TARGET static void jsd_rows(const unsigned char *s, const unsigned char *t, Py_ssize_t rows,
                               Py_ssize_t vocab, unsigned char *jsd, unsigned char *grad,
                               unsigned char *terms, unsigned char *scratch,
                               const jsd_options *o)
{
    const size_t row_bytes = (size_t)vocab * sizeof(float);
    const double beta = o->beta, beta1 = 1.0 - o->beta;
    float raw_max[2] = {-INFINITY, -INFINITY};
    if (rows > 0) {
        raw_max[0] = kl_max_as(s, vocab, KL_F32);
        raw_max[1] = kl_max_as(t, vocab, KL_F32);
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        jsd_row row = {s + r * row_bytes, t + r * row_bytes, NULL, scratch + row_bytes,
                       grad == NULL ? NULL : grad + r * row_bytes,
                       terms == NULL ? NULL : terms + r * row_bytes};
        row.es = row.grad != NULL ? row.grad : scratch;
        float ms = kl_divide1(raw_max[0], &o->scale), mt = kl_divide1(raw_max[1], &o->scale);
        const int last = r + 1 == rows;
        /* a row of -inf only is not shifted (its Z is 0), as in the reference */
        ms = ms == -INFINITY ? 0.0f : ms;
        mt = mt == -INFINITY ? 0.0f : mt;
        double zs, zt;
        jsd_sums(&row, vocab, ms, mt, o, &zs, &zt, last ? NULL : row.s + row_bytes,
                 last ? NULL : row.t + row_bytes, raw_max);
        /* NaN or +inf logits make Z NaN, a row of -inf only Z = 0: the reference's rows */
        if (!(isfinite(zs) && isfinite(zt) && zs > 0 && zt > 0)) {
            kl_store_double(jsd, r, kl_redo());
            if (row.grad != NULL) {
                kl_fill(row.grad, vocab, NAN);
            }
            if (row.terms != NULL) {
                kl_fill(row.terms, vocab, NAN);
            }
            continue;
        }
        const double log_zs = log(zs), log_zt = log(zt);
        const jsd_row_constants k = {ms,
                                     mt,
                                     (float)(beta / zt),
                                     (float)(beta1 / zs),
                                     (float)log_zt,
                                     (float)log_zs,
                                     (float)o->factor};
        double st, ss;
        jsd_mixture(&row, vocab, o, &k, row.grad != NULL, &st, &ss);
        const double value = beta * (st / zt) + beta1 * (ss / zs) +
                             (beta * ((double)k.lt - log_zt) + beta1 * ((double)k.ls - log_zs));
        kl_store_double(jsd, r, value);
        if (row.grad != NULL) {
            jsd_gradient(&row, vocab, (float)(o->grad_scale * beta1 / zs), (float)(ss / zs));
        }
    }
}

#endif


static PyObject *jsd_rows_f32(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "rows_f32(s, t, vocab, jsd, grad, terms, temperature, grad_scale, "
                        "factor, beta) takes ten arguments");
        return NULL;
    }
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    kl_rows_args a;
    if (kl_rows_scalars(args, 0, &a) < 0) {
        return NULL;
    }
    if (!(a.last > 0.0 && a.last < 1.0)) {
        PyErr_SetString(PyExc_ValueError, "beta must lie strictly between 0 and 1");
        return NULL;
    }
    jsd_options o = {0};
    if (kl_scale_from(a.temperature, &o.scale) < 0) {
        return NULL;
    }
    o.beta = a.last;
    o.grad_scale = a.grad_scale;
    o.factor = a.factor;
    if (kl_rows_buffers(args, KL_F32, 0, "jsd", 1, &a) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
#if KL_X86
    unsigned char *scratch = PyMem_RawMalloc(2 * (size_t)a.vocab * sizeof(float));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    jsd_rows(a.s.buf, a.t.buf, a.rows, a.vocab, a.out.buf, a.have_grad ? a.grad.buf : NULL,
             a.have_terms ? a.terms.buf : NULL, scratch, &o);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scratch);
#endif
    result = Py_None;
    Py_INCREF(result);
#if KL_X86
done:
#endif
    kl_rows_release(&a);
    return result;
}

static PyObject *jsd_available(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(kl_have_avx2());
}

static PyMethodDef jsd_methods[] = {
    {"rows_f32", (PyCFunction)(void (*)(void))jsd_rows_f32, METH_FASTCALL,
     "rows_f32(s, t, vocab, jsd, grad, terms, temperature, grad_scale, factor, beta, /): "
     "one block of rows of the generalised Jensen-Shannon divergence in float32 "
     "(NotImplemented without AVX2)."},
    {"available", jsd_available, METH_NOARGS,
     "available() -> bool: whether this CPU has AVX2, FMA and F16C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef jsd_module = {
    PyModuleDef_HEAD_INIT,
    "_fused_jsd",
    "Fused AVX2 passes of the generalised Jensen-Shannon divergence from logits in float32 "
    "(see backends/_fused_jsd.c).",
    -1,
    jsd_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__fused_jsd(void) { return PyModule_Create(&jsd_module); }
