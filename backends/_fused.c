/*
 * One fused pass for the float32 KL-divergence sum of the NumPy fast path.
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
    {"available", kl_available, METH_NOARGS,
     "available() -> bool: whether this CPU has AVX2 and FMA."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kl_module = {
    PyModuleDef_HEAD_INIT,
    "_fused",
    "One fused AVX2 pass for the float32 KL-divergence sum (see backends/_fused.c).",
    -1,
    kl_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&kl_module); }
