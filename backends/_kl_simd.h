/*
 * The vector arithmetic the compiled kernels share (backends/_fused.c, _fused_logits.c and
 * _fused_jsd.c include it): float32 exp and log eight lanes at a time (AVX2 and FMA), their
 * loads and stores at any alignment, the conversions from and to bfloat16 and float16, the
 * CPU feature checks and the buffer-format test. Every function is static inline: each
 * kernel compiles its own copy. The accuracy of exp is stated in _fused_logits.c and that of
 * log in _fused.c (benchmarks/exp_sweep.py and benchmarks/log_sweep.py measure them).
 *
 * Half precision: a bfloat16 is the upper 16 bits of a float32, so widening is a shift,
 * exact; narrowing rounds to nearest, ties to even, and keeps NaN a (quiet) NaN. float16
 * uses the F16C instructions (vcvtph2ps, exact, and vcvtps2ph with round to nearest even),
 * so the kernels need F16C at run time as well (kl_have_avx2 checks it).
 */
#ifndef KL_SIMD_H
#define KL_SIMD_H

#include <Python.h>

#include <math.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define KL_X86 1
#include <immintrin.h>
/* Every vector function is compiled for AVX2, FMA and F16C (chosen at run time:
 * kl_have_avx2), so that each inlines into the others. */
#define KL_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define KL_X86 0
#endif

/* The element types of the kernels' inputs and outputs. */
typedef enum { KL_F32 = 0, KL_BF16 = 1, KL_F16 = 2 } kl_format;

/* Bytes per element of ``format``. */
static inline size_t kl_format_size(kl_format format) { return format == KL_F32 ? 4 : 2; }

#if KL_X86

/* ln 2 = LN2_HEAD + LN2_TAIL; LN2_HEAD has 9 significant bits, so n * LN2_HEAD is exact. */
#define KL_LN2_HEAD 0.693359375f
#define KL_LN2_TAIL -2.12194440e-4f

/* --- exp ---------------------------------------------------------------------------------- */

/* P(r) ~ (e^r - 1 - r) / r^2 on [-0.3466, 0.3466], constant term first. */
static const float KL_E[5] = {
    4.9999988079e-01f, 1.6666518152e-01f, 4.1669536382e-02f, 8.3689261228e-03f,
    1.3751373626e-03f,
};
#define KL_LOG2E 1.44269504088896341f

/* e^r (in [0.7, 1.42]) and n, for x = n ln 2 + r. */
KL_TARGET static inline __m256 kl_exp8_reduced(__m256 x, __m256i *n)
{
    __m256 nf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(KL_LOG2E)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r1 = _mm256_fnmadd_ps(nf, _mm256_set1_ps(KL_LN2_HEAD), x); /* exact */
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(KL_LN2_TAIL), r1);
    /* the rounding error of r: (r1 - r) - n LN2_TAIL */
    __m256 c = _mm256_fnmadd_ps(nf, _mm256_set1_ps(KL_LN2_TAIL), _mm256_sub_ps(r1, r));
    __m256 z = _mm256_mul_ps(r, r);
    __m256 p = _mm256_set1_ps(KL_E[4]);
    for (int i = 3; i >= 0; i--) {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(KL_E[i]));
    }
    /* 1 + r = h + lo exactly (Fast2Sum), then e^r = h + (lo + r^2 P(r)) */
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 h = _mm256_add_ps(one, r);
    __m256 lo = _mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(one, h), r), c);
    *n = _mm256_cvtps_epi32(nf);
    return _mm256_add_ps(h, _mm256_fmadd_ps(p, z, lo));
}

/* 2^k for integer lanes -126 <= k <= 127. */
KL_TARGET static inline __m256 kl_pow2(__m256i k)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

/* exp of any eight lanes. */
KL_TARGET static inline __m256 kl_exp8_any(__m256 x)
{
    /* clamp (max_ps returns its second operand where the first is NaN) */
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
    __m256i n;
    __m256 p = kl_exp8_reduced(xc, &n);
    __m256i n1 = _mm256_srai_epi32(n, 1); /* n in [-150, 129]: both halves in [-75, 65] */
    __m256i n2 = _mm256_sub_epi32(n, n1);
    __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, kl_pow2(n1)), kl_pow2(n2));
    result = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), result);
    return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); /* NaN stays */
}

/* exp of eight lanes, the short way when every result is normal. */
KL_TARGET static inline __m256 kl_exp8(__m256 x)
{
    /* Lanes below -104 (excluded classes: -inf) are +0: eight of them need no exp, and
     * with the other lanes normal the short way serves them too (its value in those
     * lanes, NaN for -inf, is dropped). One predictable branch for dense logits and for
     * logits with excluded classes scattered among them. */
    __m256 zero = _mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_LT_OQ);
    __m256 regular = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-86.5f), _CMP_GE_OQ),
                                   _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_LE_OQ));
    int zero_bits = _mm256_movemask_ps(zero);
    if (zero_bits == 0xff) {
        return _mm256_setzero_ps();
    }
    if ((zero_bits | _mm256_movemask_ps(regular)) == 0xff) {
        __m256i n;
        __m256 p = kl_exp8_reduced(x, &n);
        return _mm256_andnot_ps(zero, _mm256_castsi256_ps(_mm256_add_epi32(
                                          _mm256_castps_si256(p), _mm256_slli_epi32(n, 23))));
    }
    return kl_exp8_any(x);
}

KL_TARGET static inline __m256 kl_load8(const unsigned char *p)
{
    __m256 v;
    memcpy(&v, p, sizeof v);
    return v;
}

KL_TARGET static inline void kl_store8(unsigned char *p, __m256 v)
{
    memcpy(p, &v, sizeof v);
}

/* ``rest`` (< 8) floats from ``p`` in the low lanes, zeros above. */
KL_TARGET static inline __m256 kl_load_tail(const unsigned char *p,
                                                                     Py_ssize_t rest)
{
    float buffer[8] = {0};
    memcpy(buffer, p, (size_t)rest * sizeof(float));
    return _mm256_loadu_ps(buffer);
}

KL_TARGET static inline void kl_store_tail(unsigned char *p, __m256 v,
                                                                    Py_ssize_t rest)
{
    float buffer[8];
    _mm256_storeu_ps(buffer, v);
    memcpy(p, buffer, (size_t)rest * sizeof(float));
}

/* All ones in the low ``rest`` lanes. */
KL_TARGET static inline __m256 kl_lanes(Py_ssize_t rest)
{
    __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)rest), index));
}

/* --- log ---------------------------------------------------------------------------------- */


/* R(f) coefficients, constant term first. */
static const float KL_R[9] = {
    3.3333331347e-01f, -2.4999989569e-01f, 2.0000708103e-01f,
    -1.6668480635e-01f, 1.4249937236e-01f, -1.2411050498e-01f,
    1.1661510915e-01f, -1.1571200937e-01f, 7.1497537196e-02f,
};

/* log of eight positive normal finite lanes: the common case, without fix-ups. */
KL_TARGET static inline __m256 kl_log8_normal(__m256 w, __m256 e)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256i bits = _mm256_castps_si256(w);
    /* w = 2^(k + 1) m with m in [1/2, 1) */
    __m256i k = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    e = _mm256_add_ps(e, _mm256_cvtepi32_ps(k));
    /* m < sqrt(1/2): use 2m and e - 1, so that f = m - 1 lies in [sqrt(1/2) - 1, sqrt(2) - 1) */
    __m256 low = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710678118654752f), _CMP_LT_OQ);
    __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(low, m)), one); /* exact */
    e = _mm256_sub_ps(e, _mm256_and_ps(low, one));
    __m256 z = _mm256_mul_ps(f, f);
    __m256 r = _mm256_set1_ps(KL_R[8]);
    for (int i = 7; i >= 0; i--) {
        r = _mm256_fmadd_ps(r, f, _mm256_set1_ps(KL_R[i]));
    }
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(r, f), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(KL_LN2_TAIL), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(KL_LN2_HEAD), _mm256_add_ps(f, y));
}

/* log of any eight lanes: subnormals scaled, zeros, negatives, infinities and NaN fixed up. */
KL_TARGET static inline __m256 kl_log8_any(__m256 v)
{
    const __m256 zero = _mm256_setzero_ps();
    const __m256 smallest_normal = _mm256_castsi256_ps(_mm256_set1_epi32(0x00800000));
    __m256 subnormal = _mm256_cmp_ps(v, smallest_normal, _CMP_LT_OQ);
    __m256 w = _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(8388608.0f)), subnormal);
    __m256 result = kl_log8_normal(w, _mm256_and_ps(subnormal, _mm256_set1_ps(-23.0f)));
    /* log(+-0) = -inf; log(t < 0) = log(NaN) = NaN; log(+inf) = +inf */
    result = _mm256_blendv_ps(result, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(v, zero, _CMP_EQ_OQ));
    result = _mm256_blendv_ps(result, _mm256_set1_ps(NAN), _mm256_cmp_ps(v, zero, _CMP_NGE_UQ));
    result = _mm256_blendv_ps(result, v, _mm256_cmp_ps(v, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
    return result;
}

/* log of eight lanes, taking the short way when every lane is positive, normal and finite. */
KL_TARGET static inline __m256 kl_log8(__m256 v)
{
    const __m256 smallest_normal = _mm256_castsi256_ps(_mm256_set1_epi32(0x00800000));
    /* not (smallest_normal <= v < inf): subnormal, zero, negative, infinite or NaN */
    __m256 regular = _mm256_and_ps(_mm256_cmp_ps(v, smallest_normal, _CMP_GE_OQ),
                                   _mm256_cmp_ps(v, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
    if (_mm256_movemask_ps(regular) == 0xff) {
        return kl_log8_normal(v, _mm256_setzero_ps());
    }
    return kl_log8_any(v);
}

/* --- half precision ----------------------------------------------------------------------- */

/* Eight bfloat16 at ``p`` (any alignment) as float32: exact. */
KL_TARGET static inline __m256 kl_load8_bf16(const unsigned char *p)
{
    __m128i h;
    memcpy(&h, p, sizeof h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Eight float16 at ``p`` (any alignment) as float32: exact (needs F16C). */
KL_TARGET static inline __m256 kl_load8_f16(const unsigned char *p)
{
    __m128i h;
    memcpy(&h, p, sizeof h);
    return _mm256_cvtph_ps(h);
}

/* Eight float32 rounded to bfloat16 (to nearest, ties to even; NaN stays a quiet NaN). */
KL_TARGET static inline __m128i kl_to_bf16(__m256 v)
{
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* Eight float32 rounded to float16 (to nearest, ties to even; needs F16C). */
KL_TARGET static inline __m128i kl_to_f16(__m256 v)
{
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* Eight elements of ``format`` at ``p`` (any alignment) as float32. */
KL_TARGET static inline __m256 kl_load8_as(const unsigned char *p,
                                                                         kl_format format)
{
    switch (format) {
    case KL_BF16:
        return kl_load8_bf16(p);
    case KL_F16:
        return kl_load8_f16(p);
    default:
        return kl_load8(p);
    }
}

/* ``rest`` (< 8) elements of ``format`` at ``p`` in the low lanes, zeros above. */
KL_TARGET static inline __m256 kl_load_tail_as(
    const unsigned char *p, Py_ssize_t rest, kl_format format)
{
    unsigned char buffer[32] = {0};
    memcpy(buffer, p, (size_t)rest * kl_format_size(format));
    return kl_load8_as(buffer, format);
}

/* Eight float32 lanes stored at ``p`` as ``format`` (rounded to nearest for half). */
KL_TARGET static inline void kl_store8_as(unsigned char *p, __m256 v,
                                                                        kl_format format)
{
    if (format == KL_F32) {
        kl_store8(p, v);
        return;
    }
    __m128i h = format == KL_BF16 ? kl_to_bf16(v) : kl_to_f16(v);
    memcpy(p, &h, sizeof h);
}

/* The low ``rest`` (< 8) lanes stored at ``p`` as ``format``. */
KL_TARGET static inline void kl_store_tail_as(
    unsigned char *p, __m256 v, Py_ssize_t rest, kl_format format)
{
    unsigned char buffer[32];
    kl_store8_as(buffer, v, format);
    memcpy(p, buffer, (size_t)rest * kl_format_size(format));
}

/* Whether this CPU has AVX2, FMA and F16C (every kernel needs them; every x86 CPU with
 * AVX2 has F16C too). */
static inline int kl_have_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

#else

static inline int kl_have_avx2(void) { return 0; }

#endif

/* Whether the buffer format ``format`` is the one-character ``code`` in this machine's byte
 * order: "f", "@f" (native), "=f" (native order, standard size: NumPy's format for an
 * unaligned array), or the explicit order of this build ("<f" little-endian; ">f" or "!f"
 * big-endian); the same for any other code ('d', 'e', 'H'). NULL (unsigned bytes) is not. */
static inline int kl_native_format(const char *format, char code)
{
    if (format == NULL) {
        return 0;
    }
#if PY_BIG_ENDIAN
    if (*format == '@' || *format == '=' || *format == '>' || *format == '!') {
#else
    if (*format == '@' || *format == '=' || *format == '<') {
#endif
        format++;
    }
    return format[0] == code && format[1] == '\0';
}


/* ------------------------------------------------------------------------------------------
 * Shared by the kernels (_fused_logits.c, _fused_jsd.c): the temperature's quotient, the row
 * maxima, the outputs' stores and the redo marker, and the buffer checks.
 */

/* How the kernels form s / T: with T rounded to float32, as NumPy's s / T of float32 s is;
 * as s * (1 / T) when T is a power of 2 whose inverse is a normal float32, which gives
 * exactly the same quotient. */
typedef struct {
    float temperature; /* float32(T) */
    int multiply;      /* 1: s / T computed as s * (1 / T) */
    float inverse;     /* 1 / T when multiply */
} kl_scale;

/* ``sc`` for ``temperature``: 0, or -1 with a ValueError when float32(T) is not a
 * positive normal number. */
static inline int kl_scale_from(double temperature, kl_scale *sc)
{
    sc->temperature = (float)temperature;
    if (!(isfinite(sc->temperature) && sc->temperature >= 1.17549435e-38f)) {
        PyErr_SetString(PyExc_ValueError,
                        "temperature must be a positive normal float32 number");
        return -1;
    }
    int exponent;
    float mantissa = frexpf(sc->temperature, &exponent);
    /* T = 2^(exponent - 1): 1 / T is exact (normal) when exponent - 1 <= 126 */
    sc->multiply = mantissa == 0.5f && exponent - 1 <= 126;
    sc->inverse = sc->multiply ? 1.0f / sc->temperature : 0.0f;
    return 0;
}

static inline float kl_divide1(float v, const kl_scale *sc)
{
    return sc->multiply ? v * sc->inverse : v / sc->temperature;
}

#if KL_X86

KL_TARGET static inline __m256 kl_divide8(__m256 v, const kl_scale *sc)
{
    return sc->multiply ? _mm256_mul_ps(v, _mm256_set1_ps(sc->inverse))
                        : _mm256_div_ps(v, _mm256_set1_ps(sc->temperature));
}

/* The generic passes below take the logits' element type ``fmt`` (float32, bfloat16 or
 * float16): they are always inlined into one specialisation per type (the _f32, _bf16 and
 * _f16 functions), where ``fmt`` is a constant, so each reads its own type directly (a
 * widening load per eight lanes) and the float32 one is the plain float32 code. */
#define KL_GENERIC KL_TARGET static inline __attribute__((always_inline))

/* The largest of the lanes of ``m`` and the ``rest`` elements at ``p`` (NaN ignored). */
KL_GENERIC float kl_max_finish(__m256 m0, const unsigned char *p, Py_ssize_t rest, kl_format fmt)
{
    float lanes[8];
    _mm256_storeu_ps(lanes, m0);
    float m = -INFINITY;
    for (int k = 0; k < 8; k++) {
        m = lanes[k] > m ? lanes[k] : m;
    }
    if (rest > 0) {
        float tail[8];
        _mm256_storeu_ps(tail, kl_load_tail_as(p, rest, fmt));
        for (Py_ssize_t i = 0; i < rest; i++) {
            m = tail[i] > m ? tail[i] : m;
        }
    }
    return m;
}

/* The largest of ``n`` elements at ``p`` (NaN ignored; -inf for none). */
KL_GENERIC float kl_max_as(const unsigned char *p, Py_ssize_t n, kl_format fmt)
{
    const size_t size = kl_format_size(fmt);
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm256_max_ps(kl_load8_as(p + i * size, fmt), m0);
        m1 = _mm256_max_ps(kl_load8_as(p + (i + 8) * size, fmt), m1);
        m2 = _mm256_max_ps(kl_load8_as(p + (i + 16) * size, fmt), m2);
        m3 = _mm256_max_ps(kl_load8_as(p + (i + 24) * size, fmt), m3);
    }
    for (; i + 8 <= n; i += 8) {
        m0 = _mm256_max_ps(kl_load8_as(p + i * size, fmt), m0);
    }
    m0 = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    return kl_max_finish(m0, p + i * size, n - i, fmt);
}

#endif

/* ``value`` into the ``i``-th double of ``p`` (any alignment). */
static inline void kl_store_double(unsigned char *p, Py_ssize_t i, double value)
{
    memcpy(p + i * sizeof(double), &value, sizeof(double));
}

/* ``n`` copies of ``value`` at ``p``. */
static inline void kl_fill(unsigned char *p, Py_ssize_t n, float value)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(p + i * sizeof(float), &value, sizeof(float));
    }
}

/* The divergence of a row the reference must evaluate (the caller's marker): a quiet NaN
 * with a payload no arithmetic produces, told apart from a NaN divergence (a row without
 * a softmax) by its bits. */
#define KL_REDO_BITS 0x7FF8000000000BADull

static inline double kl_redo(void)
{
    const unsigned long long bits = KL_REDO_BITS;
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The buffer format codes of an element type: float32 'f'; bfloat16 (no buffer code of its
 * own: the bits, as NumPy's int16 or uint16 views of a torch.bfloat16 tensor) 'h' or 'H';
 * float16 'e'; and float64 'd' for the divergences. */
static inline int kl_format_code(const char *format, kl_format element, int float64)
{
    if (float64) {
        return kl_native_format(format, 'd');
    }
    switch (element) {
    case KL_BF16:
        return kl_native_format(format, 'h') || kl_native_format(format, 'H');
    case KL_F16:
        return kl_native_format(format, 'e');
    default:
        return kl_native_format(format, 'f');
    }
}

/* A C-contiguous buffer of ``obj`` holding ``element`` values (or float64 ones when
 * ``float64``), writable if asked: 0, or -1 with a TypeError naming ``name``. */
static inline int kl_buffer(PyObject *obj, Py_buffer *view, int writable, kl_format element,
                     int float64, const char *name)
{
    static const char *names[] = {"float32", "bfloat16 (int16 or uint16 bits)", "float16"};
    const char *what = float64 ? "float64" : names[element];
    const Py_ssize_t size = float64 ? 8 : (Py_ssize_t)kl_format_size(element);
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous %s buffer%s", name, what,
                     writable ? " (writable)" : "");
        return -1;
    }
    if (view->itemsize != size || !kl_format_code(view->format, element, float64)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous %s buffer", name, what);
        return -1;
    }
    return 0;
}

/* The arguments of the exp_* entry points (test-only), ``name(src, dst)``: two C-contiguous
 * buffers of float32 (float64 when ``float64``) values of one length, ``dst`` writable.
 * 1 where this CPU has no AVX2 (nothing held: the caller returns NotImplemented), 0 with
 * both held, or -1 with an exception and nothing held. The checks come in this order:
 * the count, the CPU, then each buffer and their lengths. */
static inline int kl_exp_buffers(PyObject *const *args, Py_ssize_t nargs, int float64,
                                 const char *name, Py_buffer *src, Py_buffer *dst)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s(src, dst) takes two buffers", name);
        return -1;
    }
    if (!kl_have_avx2()) {
        return 1;
    }
    if (kl_buffer(args[0], src, 0, KL_F32, float64, "src") < 0) {
        return -1;
    }
    if (kl_buffer(args[1], dst, 1, KL_F32, float64, "dst") < 0) {
        PyBuffer_Release(src);
        return -1;
    }
    if (src->len != dst->len) {
        PyBuffer_Release(src);
        PyBuffer_Release(dst);
        PyErr_SetString(PyExc_ValueError, "src and dst must have the same length");
        return -1;
    }
    return 0;
}

/* The arguments of every rows_* entry point, (s, t, vocab, out, grad, terms, temperature,
 * grad_scale, factor, last): the scalars parsed, then the buffers held and checked. */
typedef struct {
    Py_buffer s, t, out, grad, terms;
    int have_out, have_grad, have_terms; /* which of the optional buffers are held */
    Py_ssize_t vocab, rows;
    double temperature, grad_scale, factor;
    double last; /* args[9]: the truth of ``reverse`` (0 or 1), or ``beta`` */
} kl_rows_args;

/* Parse vocab, temperature, grad_scale, factor and args[9] (its truth when
 * ``last_is_bool``, else a float): 0, or -1 with an exception (vocab below 1 included). */
static inline int kl_rows_scalars(PyObject *const *args, int last_is_bool, kl_rows_args *a)
{
    memset(a, 0, sizeof *a);
    a->vocab = PyLong_AsSsize_t(args[2]);
    if (a->vocab == -1 && PyErr_Occurred()) {
        return -1;
    }
    a->temperature = PyFloat_AsDouble(args[6]);
    a->grad_scale = PyFloat_AsDouble(args[7]);
    a->factor = PyFloat_AsDouble(args[8]);
    if (last_is_bool) {
        int truth = PyObject_IsTrue(args[9]);
        if (truth < 0) {
            return -1;
        }
        a->last = truth;
    } else {
        a->last = PyFloat_AsDouble(args[9]);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    if (a->vocab < 1) {
        PyErr_SetString(PyExc_ValueError, "vocab must be at least 1");
        return -1;
    }
    return 0;
}

/* Whether a rows_* call computes only the forward gradient: 1 where ``out`` (the
 * divergences) was not asked, 0 where it was, or -1 with a ValueError where it was not
 * but the call asks for more than the forward gradient (terms, no grad, or ``reverse``). */
static inline int kl_rows_softmax_only(const kl_rows_args *a, int reverse)
{
    if (a->have_out) {
        return 0;
    }
    if (a->have_terms || !a->have_grad || reverse) {
        PyErr_SetString(PyExc_ValueError,
                        "without kl, only the forward gradient is computed (grad, no terms)");
        return -1;
    }
    return 1;
}

/* Release the buffers kl_rows_buffers holds. */
static inline void kl_rows_release(kl_rows_args *a)
{
    PyBuffer_Release(&a->s);
    PyBuffer_Release(&a->t);
    if (a->have_out) {
        PyBuffer_Release(&a->out);
    }
    if (a->have_grad) {
        PyBuffer_Release(&a->grad);
    }
    if (a->have_terms) {
        PyBuffer_Release(&a->terms);
    }
}

/* Hold the buffers: s and t (read), grad and terms (written; None: not asked) of
 * ``element`` values (float64 ones when ``float64``), and ``out`` (written), float64, one
 * per row, named ``out_name`` (None: not asked, unless ``out_required``); then check that
 * s, t, grad and terms hold rows * vocab values and out one per row. 0, or -1 with an
 * exception and nothing held. */
static inline int kl_rows_buffers(PyObject *const *args, kl_format element, int float64,
                                  const char *out_name, int out_required, kl_rows_args *a)
{
    if (kl_buffer(args[0], &a->s, 0, element, float64, "s") < 0) {
        return -1;
    }
    if (kl_buffer(args[1], &a->t, 0, element, float64, "t") < 0) {
        PyBuffer_Release(&a->s);
        return -1;
    }
    if (out_required || args[3] != Py_None) {
        if (kl_buffer(args[3], &a->out, 1, element, 1, out_name) < 0) {
            goto fail;
        }
        a->have_out = 1;
    }
    if (args[4] != Py_None) {
        if (kl_buffer(args[4], &a->grad, 1, element, float64, "grad") < 0) {
            goto fail;
        }
        a->have_grad = 1;
    }
    if (args[5] != Py_None) {
        if (kl_buffer(args[5], &a->terms, 1, element, float64, "terms") < 0) {
            goto fail;
        }
        a->have_terms = 1;
    }
    const Py_ssize_t size = float64 ? 8 : (Py_ssize_t)kl_format_size(element);
    const Py_ssize_t n = a->s.len / size;
    a->rows = n / a->vocab;
    if (a->t.len != a->s.len || n % a->vocab != 0 ||
        (a->have_grad && a->grad.len != a->s.len) ||
        (a->have_terms && a->terms.len != a->s.len) ||
        (a->have_out && a->out.len / 8 != a->rows)) {
        PyErr_Format(PyExc_ValueError,
                     "s, t, grad and terms must hold rows * vocab values, %s one per row",
                     out_name);
        goto fail;
    }
    return 0;
fail:
    kl_rows_release(a);
    return -1;
}

#endif /* KL_SIMD_H */
