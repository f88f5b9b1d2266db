/*
 * Fused passes for the KL-divergence sum of the NumPy and PyTorch CPU fast paths: float32,
 * and bfloat16 or float16 (below).
 *
 * kldiv_spec.backends._fused.loss_sum_f32(x, t) returns, as a Python float,
 *
 *     sum_i ( [t_i == 0 ? 0 : t_i * log(t_i)] - t_i * x_i )
 *
 * over two C-contiguous float32 buffers of one length, reading each once: the
 * pointwise loss is formed in float32 in the reference's order (the product
 * t * x rounded before the subtraction, no fused multiply-add), and the terms
 * are accumulated in float64. NaN and infinities propagate as in the
 * reference (log of a negative target is NaN, 0 * log 0 is 0).
 *
 * log is evaluated eight lanes at a time with AVX2 and FMA: t = 2^e m with
 * m in [sqrt(1/2), sqrt(2)), f = m - 1, log(1 + f) = f - f^2/2 + f^3 R(f) with
 * R a degree-8 polynomial fitted (least squares at Chebyshev nodes) to
 * (log1p(f) - f + f^2/2) / f^3, and e ln 2 split into a head with few bits and
 * a tail. Eight lanes that are all positive, normal and finite (the common case)
 * skip the fix-ups; otherwise subnormal targets are scaled by 2^23 first and
 * zeros, negatives, infinities and NaN set afterwards. Over every positive finite
 * float32 (benchmarks/log_sweep.py, against float64 log) its error is at most
 * 0.8265 ulp of the exact value (at t = 1.413642, bits 0x3fb4f239), every result
 * is faithfully rounded and 0.64% are not correctly rounded; it is not NumPy's log
 * bit for bit (NumPy's float32 log is within 3.83 ulp there, on an AVX2 CPU).
 *
 * The loss's own product and difference are separate roundings: the build
 * passes -ffp-contract=off, so only the explicit FMAs of the log are fused.
 *
 * The buffers may start at any byte: NumPy exports an unaligned float32 array (as
 * dask.distributed's deserialised chunks are) with the format "=f", which is
 * accepted like "f", and the kernels read and write them as bytes (memcpy to and
 * from vector registers: unaligned loads and stores), never through a float
 * pointer. A float32 buffer of the other byte order is refused (TypeError).
 *
 * Without AVX2 and FMA at run time (or on another architecture) loss_sum_f32 returns
 * NotImplemented and the caller uses NumPy's ufuncs. log_f32(src, dst) exposes
 * the vector log for the tests. The GIL is released while summing.
 *
 * Half precision. loss_sum_half(x, t, format, log_target=False) returns the float64 sum,
 * and loss_half(x, t, out, format, log_target=False) writes the terms, of the pointwise
 * loss of two C-contiguous buffers of 2-byte elements (any alignment): format "float16"
 * takes NumPy float16 buffers ('e'), format "bfloat16" the bits of bfloat16 values as
 * int16 or uint16 ('h', 'H': a torch bfloat16 tensor's view(torch.int16).numpy()); any
 * other buffer is refused with a TypeError naming the argument. Each term is the
 * reference's in that dtype (kldiv_spec._core.pointwise_loss op by op, as PyTorch's CPU
 * kernels and NumPy's float16 loops evaluate it: each operation in float32 on the exactly
 * widened operands, its result rounded to the dtype):
 *
 *     l = R(R(t R(log t)) - R(t x))   (R(t R(log t)) replaced by +0 where t == 0)
 *     l = R(R(exp t) R(t - x))        (log_target)
 *
 * with R the rounding to the dtype (nearest, ties to even), log and exp the vector float32
 * ones above and in _kl_simd.h. Rounded to the dtype, those give torch's log and exp of
 * every one of the 65536 bfloat16 and float16 values, and NumPy's float16 log (its float16
 * exp differs at 4 values on AVX-512 CPUs); tests/test_half_precision_kl_div.py checks it
 * exhaustively. The part of a term that depends on t alone (R(t R(log t)), or R(exp t)) is
 * computed for all 65536 bit patterns once per format and log_target, into a table of
 * float32 (256 KiB) indexed by t's bits: the loop then gathers it instead of a log and two
 * roundings. The terms (halves: exact in float64) are added in float64, so the caller's
 * total rounded once to the dtype is within half an ulp of the exact sum of the terms
 * (plus the float64 sum's n 2^-53 sum |l|): benchmarks/half_bench.py measured every one of
 * 1024 sums of 64000 terms (2048 x 32000 log_softmax inputs, softmax targets) correctly
 * rounded in both dtypes, where F.kl_div (PyTorch 2.13, whose torch.sum in the dtype the
 * reference shares) is up to 1.19 ulp off and not correctly rounded in 23-27% of them.
 * The GIL is released while the kernels run; the tables are filled before, under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>

#include "_kl_simd.h"

#if KL_X86

/* The pointwise loss of eight lanes: [t == 0 ? 0 : t log t] - t x, each product rounded. */
KL_TARGET static inline __m256 kl_loss8(__m256 x, __m256 t)
{
    __m256 xlogy = _mm256_mul_ps(t, kl_log8(t));
    xlogy = _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_EQ_OQ), xlogy);
    return _mm256_sub_ps(xlogy, _mm256_mul_ps(t, x));
}

/* The sum of the loss over ``n`` lanes of the byte buffers ``x`` and ``t`` (any alignment). */
KL_TARGET static double kl_sum_avx2(const unsigned char *x,
                                                              const unsigned char *t, Py_ssize_t n)
{
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                      _mm256_setzero_pd()};
    const size_t lane = sizeof(float);
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = kl_loss8(kl_load8(x + i * lane), kl_load8(t + i * lane));
        __m256 b = kl_loss8(kl_load8(x + (i + 8) * lane), kl_load8(t + (i + 8) * lane));
        acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
        acc[2] = _mm256_add_pd(acc[2], _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
        acc[3] = _mm256_add_pd(acc[3], _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)));
    }
    /* the tail, padded with x = t = 0 (whose loss is +0) */
    for (; i < n; i += 8) {
        float xs[8] = {0}, ts[8] = {0};
        Py_ssize_t rest = n - i < 8 ? n - i : 8;
        memcpy(xs, x + i * lane, (size_t)rest * lane);
        memcpy(ts, t + i * lane, (size_t)rest * lane);
        __m256 a = kl_loss8(_mm256_loadu_ps(xs), _mm256_loadu_ps(ts));
        acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    }
    __m256d total = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    double lanes[4];
    _mm256_storeu_pd(lanes, total);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + 0.0; /* + 0.0: an all-zero sum is +0 */
}

/* --- half precision ------------------------------------------------------------------------
 * Each of the reference's operations, evaluated in float32 on the exactly widened operands
 * and rounded to the half format (bfloat16 or float16), where the reference rounds:
 *     log_target false:  l = R(R(t R(log t)) - R(t x)),  R(t log t) replaced by +0 where t == 0
 *     log_target true:   l = R(R(exp t) R(t - x))
 * (R: round to nearest even in the format, then widen: exact). */

/* ``v`` rounded to bfloat16 (to nearest, ties to even) and widened again: kl_to_bf16's
 * rounding without the packing, and without its NaN case. That case is never needed here:
 * every NaN this kernel rounds has its low 16 bits zero (a widened bfloat16 operand's NaN,
 * quieted by the arithmetic, or x86's default NaN 0xffc00000, or log's NAN), so that
 * adding at most 0x8000 to them carries nothing into the upper half, which is kept: a NaN
 * stays that NaN. Finite values round by the carry, and those beyond the largest bfloat16's
 * half-way point carry into the exponent: +-inf, as kl_to_bf16 gives. */
KL_TARGET static inline __m256 kl_round8_bf16(__m256 v)
{
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

/* ``v`` rounded to float16 (to nearest, ties to even) and widened again, in the float32
 * arithmetic: v + c - c with c = +-2^(E + 13), E the exponent of v clamped to [-14, 15], so
 * that the sum's last bit is float16's ulp at v (2^(E - 10), or 2^-24 among its subnormals)
 * and float32's rounding of the sum is float16's; the sign is put back (a result that
 * rounds to zero keeps v's sign), and magnitudes beyond 65504 become +-inf. Exactly the
 * float16 conversion round trip (vcvtps2ph, vcvtph2ps) for every float32 but the payload
 * of a NaN, in fewer cycles. */
KL_TARGET static inline __m256 kl_round8_f16(__m256 v)
{
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32((int)0x80000000u));
    __m256i e = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f800000));
    e = _mm256_max_epi32(e, _mm256_set1_epi32((127 - 14) << 23));
    e = _mm256_min_epi32(e, _mm256_set1_epi32((127 + 15) << 23));
    const __m256 c = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_add_epi32(e, _mm256_set1_epi32(13 << 23)), sign));
    __m256 r = _mm256_sub_ps(_mm256_add_ps(v, c), c);
    r = _mm256_or_ps(r, _mm256_castsi256_ps(sign));
    const __m256 magnitude = _mm256_andnot_ps(_mm256_castsi256_ps(sign), r);
    const __m256 overflow = _mm256_cmp_ps(magnitude, _mm256_set1_ps(65504.0f), _CMP_GT_OQ);
    const __m256 inf = _mm256_or_ps(_mm256_set1_ps(INFINITY), _mm256_castsi256_ps(sign));
    return _mm256_blendv_ps(r, inf, overflow);
}

/* ``v`` rounded to ``format`` (KL_BF16 or KL_F16) and widened again. */
KL_TARGET static inline __m256 kl_round8_half(__m256 v, kl_format format)
{
    return format == KL_BF16 ? kl_round8_bf16(v) : kl_round8_f16(v);
}

/* Eight half lanes of ``format`` (KL_BF16 or KL_F16) at ``p`` (any alignment), widened. */
KL_TARGET static inline __m256 kl_load8_half(const unsigned char *p, kl_format format)
{
    return format == KL_BF16 ? kl_load8_bf16(p) : kl_load8_f16(p);
}

/* The part of the loss of eight widened half lanes that depends on ``t`` alone, rounded as
 * the reference rounds it: R(exp t), or R(t R(log t)) with +0 where t == 0. */
KL_TARGET static inline __m256 kl_term8_half(__m256 t, int log_target, kl_format format)
{
    if (log_target) {
        return kl_round8_half(kl_exp8(t), format);
    }
    __m256 xlogy = kl_round8_half(_mm256_mul_ps(t, kl_round8_half(kl_log8(t), format)), format);
    return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_EQ_OQ), xlogy);
}

/* The loss of eight widened half lanes from their ``term`` (kl_term8_half): R(term - R(t x)),
 * or R(term R(t - x)) with log_target. */
KL_TARGET static inline __m256 kl_combine8_half(__m256 term, __m256 x, __m256 t,
                                                int log_target, kl_format format)
{
    if (log_target) {
        return kl_round8_half(_mm256_mul_ps(term, kl_round8_half(_mm256_sub_ps(t, x), format)),
                              format);
    }
    return kl_round8_half(_mm256_sub_ps(term, kl_round8_half(_mm256_mul_ps(t, x), format)),
                          format);
}

/* The term of every one of the 65536 half values, per format (bfloat16, float16) and
 * log_target, as float32 (exact: they are halves), indexed by the value's bits: one
 * gather instead of a log (or exp) and two or three roundings. Each table is filled once,
 * by kl_term8_half itself (so the loss is the same with or without it), while the caller
 * holds the GIL; a thread reads it only after its own call saw it filled, under the GIL. */
static float kl_terms[2][2][65536];
static int kl_terms_ready[2][2];

/* The table of ``format`` (KL_BF16 or KL_F16) and ``log_target``, filled if it was not. */
KL_TARGET static const float *kl_term_table(kl_format format, int log_target)
{
    int f = format == KL_BF16 ? 0 : 1;
    float *table = kl_terms[f][log_target];
    if (!kl_terms_ready[f][log_target]) {
        for (int i = 0; i < 65536; i += 8) {
            unsigned short bits[8];
            for (int k = 0; k < 8; k++) {
                bits[k] = (unsigned short)(i + k);
            }
            __m256 t = kl_load8_half((const unsigned char *)bits, format);
            _mm256_storeu_ps(table + i, kl_term8_half(t, log_target, format));
        }
        kl_terms_ready[f][log_target] = 1;
    }
    return table;
}

/* The loss of the eight half lanes at ``x`` and ``t`` (any alignment), their terms looked up. */
KL_TARGET static inline __m256 kl_loss8_half(const unsigned char *x, const unsigned char *t,
                                             const float *table, int log_target,
                                             kl_format format)
{
    __m128i h;
    memcpy(&h, t, sizeof h);
    __m256i index = _mm256_cvtepu16_epi32(h);
    __m256 term = _mm256_i32gather_ps(table, index, 4);
    __m256 tf = format == KL_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(index, 16))
                                  : _mm256_cvtph_ps(h);
    return kl_combine8_half(term, kl_load8_half(x, format), tf, log_target, format);
}

/* The float64 sum of the loss over ``n`` half lanes of ``x`` and ``t`` (any alignment). The
 * lanes' values are halves, exact in float32 and float64; only the float64 additions round.
 * Always inlined into its callers below, each with a constant format and log_target. */
KL_TARGET static inline __attribute__((always_inline)) double
kl_sum_half(const unsigned char *x, const unsigned char *t, Py_ssize_t n, const float *table,
            int log_target, kl_format format)
{
    __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                      _mm256_setzero_pd()};
    const size_t lane = 2;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = kl_loss8_half(x + i * lane, t + i * lane, table, log_target, format);
        __m256 b = kl_loss8_half(x + (i + 8) * lane, t + (i + 8) * lane, table, log_target,
                                 format);
        acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
        acc[2] = _mm256_add_pd(acc[2], _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
        acc[3] = _mm256_add_pd(acc[3], _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)));
    }
    /* the tail, padded with x = t = 0 (whose loss is +0 either way) */
    for (; i < n; i += 8) {
        Py_ssize_t rest = n - i < 8 ? n - i : 8;
        unsigned char xs[16] = {0}, ts[16] = {0};
        memcpy(xs, x + i * lane, (size_t)rest * lane);
        memcpy(ts, t + i * lane, (size_t)rest * lane);
        __m256 a = kl_loss8_half(xs, ts, table, log_target, format);
        acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    }
    __m256d total = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    double lanes[4];
    _mm256_storeu_pd(lanes, total);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + 0.0; /* + 0.0: an all-zero sum is +0 */
}

KL_TARGET static double kl_sum_bf16(const unsigned char *x, const unsigned char *t,
                                    Py_ssize_t n, const float *table, int log_target)
{
    return log_target ? kl_sum_half(x, t, n, table, 1, KL_BF16)
                      : kl_sum_half(x, t, n, table, 0, KL_BF16);
}

KL_TARGET static double kl_sum_f16(const unsigned char *x, const unsigned char *t,
                                   Py_ssize_t n, const float *table, int log_target)
{
    return log_target ? kl_sum_half(x, t, n, table, 1, KL_F16)
                      : kl_sum_half(x, t, n, table, 0, KL_F16);
}

/* The pointwise loss of ``n`` half lanes of ``x`` and ``t`` into ``out`` (any alignment). */
KL_TARGET static void kl_loss_half(const unsigned char *x, const unsigned char *t,
                                   unsigned char *out, Py_ssize_t n, const float *table,
                                   int log_target, kl_format format)
{
    const size_t lane = 2;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = kl_loss8_half(x + i * lane, t + i * lane, table, log_target, format);
        kl_store8_as(out + i * lane, a, format); /* exact: ``a`` holds halves */
    }
    if (i < n) {
        Py_ssize_t rest = n - i;
        unsigned char xs[16] = {0}, ts[16] = {0};
        memcpy(xs, x + i * lane, (size_t)rest * lane);
        memcpy(ts, t + i * lane, (size_t)rest * lane);
        kl_store_tail_as(out + i * lane, kl_loss8_half(xs, ts, table, log_target, format), rest,
                         format);
    }
}

/* log of ``n`` lanes of the byte buffer ``src`` into ``dst`` (any alignment). */
KL_TARGET static void kl_log_avx2(const unsigned char *src,
                                                            unsigned char *dst, Py_ssize_t n)
{
    const size_t lane = sizeof(float);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 y = kl_log8(kl_load8(src + i * lane));
        memcpy(dst + i * lane, &y, sizeof y); /* an unaligned store */
    }
    if (i < n) {
        float buffer[8] = {1, 1, 1, 1, 1, 1, 1, 1};
        Py_ssize_t rest = n - i;
        memcpy(buffer, src + i * lane, (size_t)rest * lane);
        _mm256_storeu_ps(buffer, kl_log8(_mm256_loadu_ps(buffer)));
        memcpy(dst + i * lane, buffer, (size_t)rest * lane);
    }
}

#endif

/* A C-contiguous float32 buffer of ``obj`` (any alignment, this machine's byte order),
 * or -1 with a TypeError naming ``name``. */
static int kl_float32_buffer(PyObject *obj, Py_buffer *view, int flags, const char *name)
{
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear(); /* not a buffer, not contiguous, or read-only where dst must be written */
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous float32 buffer%s", name,
                     (flags & PyBUF_WRITABLE) ? " (writable)" : "");
        return -1;
    }
    if (view->itemsize != 4 || !kl_native_format(view->format, 'f')) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous float32 buffer", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Buffers ``first`` (read) and ``second`` (``second_flags``) of one length from ``args``:
 * 0 with both held, or -1 with the error set and neither held. */
static int kl_float32_pair(PyObject *const *args, const char *first, const char *second,
                           int second_flags, Py_buffer *a, Py_buffer *b)
{
    if (kl_float32_buffer(args[0], a, PyBUF_SIMPLE, first) < 0) {
        return -1;
    }
    if (kl_float32_buffer(args[1], b, second_flags, second) < 0) {
        PyBuffer_Release(a);
        return -1;
    }
    if (a->len != b->len) {
        PyBuffer_Release(a);
        PyBuffer_Release(b);
        PyErr_Format(PyExc_ValueError, "%s and %s must have the same length", first, second);
        return -1;
    }
    return 0;
}

static PyObject *kl_loss_sum_f32(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "loss_sum_f32(x, t) takes two buffers");
        return NULL;
    }
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    Py_buffer x, t;
    if (kl_float32_pair(args, "x", "t", PyBUF_SIMPLE, &x, &t) < 0) {
        return NULL;
    }
    double total = 0.0;
#if KL_X86
    Py_ssize_t n = x.len / 4;
    Py_BEGIN_ALLOW_THREADS
    total = kl_sum_avx2((const unsigned char *)x.buf, (const unsigned char *)t.buf, n);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&x);
    PyBuffer_Release(&t);
    return PyFloat_FromDouble(total);
}

static PyObject *kl_log_f32(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "log_f32(src, dst) takes two buffers");
        return NULL;
    }
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    Py_buffer src, dst;
    if (kl_float32_pair(args, "src", "dst", PyBUF_WRITABLE, &src, &dst) < 0) {
        return NULL;
    }
#if KL_X86
    Py_BEGIN_ALLOW_THREADS
    kl_log_avx2((const unsigned char *)src.buf, (unsigned char *)dst.buf, src.len / 4);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

/* The half format named by ``name`` ("bfloat16" or "float16"), or -1 with a ValueError
 * (a TypeError when it is not a str). */
static int kl_half_format(PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "format must be 'bfloat16' or 'float16' (a str)");
        return -1;
    }
    if (PyUnicode_CompareWithASCIIString(name, "bfloat16") == 0) {
        return KL_BF16;
    }
    if (PyUnicode_CompareWithASCIIString(name, "float16") == 0) {
        return KL_F16;
    }
    PyErr_SetString(PyExc_ValueError, "format must be 'bfloat16' or 'float16'");
    return -1;
}

/* A C-contiguous buffer of ``obj`` holding ``format`` elements in this machine's byte order
 * (any alignment): float16 as 'e'; bfloat16 as its bits, 'h' or 'H' (a torch bfloat16
 * tensor viewed as int16 or uint16). Else -1 with a TypeError naming ``name``. */
static int kl_half_buffer(PyObject *obj, Py_buffer *view, int flags, const char *name,
                          int format)
{
    const char *what = format == KL_BF16 ? "bfloat16 buffer (int16 or uint16 bits)"
                                         : "float16 buffer";
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous %s%s", name, what,
                     (flags & PyBUF_WRITABLE) ? " (writable)" : "");
        return -1;
    }
    int ok = view->itemsize == 2 &&
             (format == KL_BF16
                  ? kl_native_format(view->format, 'h') || kl_native_format(view->format, 'H')
                  : kl_native_format(view->format, 'e'));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous %s", name, what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The arguments (x, t[, out], format[, log_target]) of the half kernels: the buffers held,
 * the format and log_target set, 0; or -1 with the error set and nothing held. */
static int kl_half_args(PyObject *const *args, Py_ssize_t nargs, int with_out, Py_buffer *x,
                        Py_buffer *t, Py_buffer *out, int *format, int *log_target)
{
    const char *usage = with_out ? "loss_half(x, t, out, format, log_target=False)"
                                 : "loss_sum_half(x, t, format, log_target=False)";
    Py_ssize_t fixed = with_out ? 4 : 3;
    if (nargs != fixed && nargs != fixed + 1) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd or %zd arguments", usage, fixed, fixed + 1);
        return -1;
    }
    *format = kl_half_format(args[fixed - 1]);
    if (*format < 0) {
        return -1;
    }
    *log_target = 0;
    if (nargs == fixed + 1) {
        *log_target = PyObject_IsTrue(args[fixed]);
        if (*log_target < 0) {
            return -1;
        }
    }
    if (kl_half_buffer(args[0], x, PyBUF_SIMPLE, "x", *format) < 0) {
        return -1;
    }
    if (kl_half_buffer(args[1], t, PyBUF_SIMPLE, "t", *format) < 0) {
        PyBuffer_Release(x);
        return -1;
    }
    if (with_out && kl_half_buffer(args[2], out, PyBUF_WRITABLE, "out", *format) < 0) {
        PyBuffer_Release(x);
        PyBuffer_Release(t);
        return -1;
    }
    if (x->len != t->len || (with_out && out->len != x->len)) {
        PyBuffer_Release(x);
        PyBuffer_Release(t);
        if (with_out) {
            PyBuffer_Release(out);
        }
        PyErr_SetString(PyExc_ValueError,
                        with_out ? "x, t and out must have the same length"
                                 : "x and t must have the same length");
        return -1;
    }
    return 0;
}

static PyObject *kl_loss_sum_half(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_buffer x, t;
    int format, log_target;
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (kl_half_args(args, nargs, 0, &x, &t, NULL, &format, &log_target) < 0) {
        return NULL;
    }
    double total = 0.0;
#if KL_X86
    Py_ssize_t n = x.len / 2;
    const unsigned char *xb = (const unsigned char *)x.buf, *tb = (const unsigned char *)t.buf;
    const float *table = kl_term_table((kl_format)format, log_target); /* with the GIL */
    Py_BEGIN_ALLOW_THREADS
    total = format == KL_BF16 ? kl_sum_bf16(xb, tb, n, table, log_target)
                              : kl_sum_f16(xb, tb, n, table, log_target);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&x);
    PyBuffer_Release(&t);
    return PyFloat_FromDouble(total);
}

static PyObject *kl_loss_half_py(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_buffer x, t, out;
    int format, log_target;
    if (!kl_have_avx2()) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (kl_half_args(args, nargs, 1, &x, &t, &out, &format, &log_target) < 0) {
        return NULL;
    }
#if KL_X86
    const float *table = kl_term_table((kl_format)format, log_target); /* with the GIL */
    Py_BEGIN_ALLOW_THREADS
    kl_loss_half((const unsigned char *)x.buf, (const unsigned char *)t.buf,
                 (unsigned char *)out.buf, x.len / 2, table, log_target, (kl_format)format);
    Py_END_ALLOW_THREADS
#endif
    PyBuffer_Release(&x);
    PyBuffer_Release(&t);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyObject *kl_available(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(kl_have_avx2());
}

static PyMethodDef kl_methods[] = {
    {"loss_sum_f32", (PyCFunction)(void (*)(void))kl_loss_sum_f32, METH_FASTCALL,
     "loss_sum_f32(x, t, /) -> float: the float64 sum of the float32 pointwise loss "
     "(NotImplemented without AVX2)."},
    {"log_f32", (PyCFunction)(void (*)(void))kl_log_f32, METH_FASTCALL,
     "log_f32(src, dst, /): the vectorised float32 log of src into dst (for the tests)."},
    {"loss_sum_half", (PyCFunction)(void (*)(void))kl_loss_sum_half, METH_FASTCALL,
     "loss_sum_half(x, t, format, log_target=False, /) -> float: the float64 sum of the "
     "pointwise loss of bfloat16 ('h'/'H' bits) or float16 ('e') buffers, each operation "
     "rounded to the format as the reference's (NotImplemented without AVX2)."},
    {"loss_half", (PyCFunction)(void (*)(void))kl_loss_half_py, METH_FASTCALL,
     "loss_half(x, t, out, format, log_target=False, /): the pointwise loss of half buffers "
     "into out, rounded as loss_sum_half's terms (NotImplemented without AVX2)."},
    {"available", kl_available, METH_NOARGS,
     "available() -> bool: whether this CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kl_module = {
    PyModuleDef_HEAD_INIT,
    "_fused",
    "Fused AVX2 passes for the KL-divergence sum: float32, and bfloat16 or float16 "
    "(see backends/_fused.c).",
    -1,
    kl_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&kl_module); }
