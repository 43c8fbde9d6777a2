#ifndef SWIFTMOE_VECTOR_MATH_H
#define SWIFTMOE_VECTOR_MATH_H
// Vector operations Swift's SIMD types lack, as clang vector builtins (header only: they inline
// into the Swift callers and compile for the same target CPU). Swift imports these 16-lane
// ext_vector types as SIMD16<Float>, SIMD16<UInt32> and SIMD16<UInt16>.
//
// Why: SIMD16<Float>.squareRoot() runs libm's sqrtf once per lane (it keeps errno semantics),
// about 2 ns per element against 0.2 for one vsqrtps; and the lane-wise narrowing
// SIMD16<UInt16>(truncatingIfNeeded:) compiles to extracts and inserts instead of one vpmovdw.

typedef float swiftmoe_float16 __attribute__((ext_vector_type(16)));
typedef unsigned int swiftmoe_uint32x16 __attribute__((ext_vector_type(16)));
typedef unsigned short swiftmoe_uint16x16 __attribute__((ext_vector_type(16)));

/// IEEE square root of each lane (correctly rounded, as Float.squareRoot()).
static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_sqrt16(swiftmoe_float16 x) {
    return __builtin_elementwise_sqrt(x);
}

/// The low 16 bits of each lane.
static inline __attribute__((always_inline)) swiftmoe_uint16x16 swiftmoe_narrow16(swiftmoe_uint32x16 x) {
    return __builtin_convertvector(x, swiftmoe_uint16x16);
}

typedef int swiftmoe_int32x16 __attribute__((ext_vector_type(16)));

/// x where lane i stands for position first + i below `visible`, `fill` in the other lanes: a
/// row's partial block as whole-vector work (a compare and a blend; Swift's SIMDMask selects
/// compile lane by lane).
static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_keep_below16(swiftmoe_float16 x, int first, int visible,
                                                                                     float fill) {
    const swiftmoe_int32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    swiftmoe_int32x16 keep = (lane + first) < visible;   // all ones where kept
    swiftmoe_int32x16 bits = (__builtin_bit_cast(swiftmoe_int32x16, x) & keep)
        | (__builtin_bit_cast(swiftmoe_int32x16, (swiftmoe_float16)fill) & ~keep);
    return __builtin_bit_cast(swiftmoe_float16, bits);
}

static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_fma16(swiftmoe_float16 a, swiftmoe_float16 b, swiftmoe_float16 c) {
    return __builtin_elementwise_fma(a, b, c);
}

/// exp(x) = 2^n exp(r), n = round(x / ln 2) by the magic-number trick (adding 1.5 * 2^23 leaves n
/// in the low mantissa bits, so 2^n is built with integer operations), r = x - n ln 2 in two
/// parts (Cody-Waite), exp(r) by its degree-6 Taylor polynomial; x clamped to [-87, 88]. Fused
/// multiply-adds throughout: Swift never fuses a multiply and an add, and its SIMD types have no
/// vector FMA, so the same scheme in Swift took twice the instructions. Within 2 ulp of exp.
static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_exp16(swiftmoe_float16 x) {
    x = __builtin_elementwise_min(__builtin_elementwise_max(x, (swiftmoe_float16)-87.0f), (swiftmoe_float16)88.0f);
    const swiftmoe_float16 magic = 12582912.0f;
    swiftmoe_float16 shifted = swiftmoe_fma16(x, (swiftmoe_float16)1.44269504088896341f, magic);
    swiftmoe_float16 n = shifted - magic;
    swiftmoe_float16 r = swiftmoe_fma16(n, (swiftmoe_float16)-0.693145751953125f, x);
    r = swiftmoe_fma16(n, (swiftmoe_float16)-1.428606765330187045e-06f, r);
    swiftmoe_float16 p = 1.0f / 720.0f;
    p = swiftmoe_fma16(p, r, (swiftmoe_float16)(1.0f / 120.0f));
    p = swiftmoe_fma16(p, r, (swiftmoe_float16)(1.0f / 24.0f));
    p = swiftmoe_fma16(p, r, (swiftmoe_float16)(1.0f / 6.0f));
    p = swiftmoe_fma16(p, r, (swiftmoe_float16)0.5f);
    p = swiftmoe_fma16(p, r, (swiftmoe_float16)1.0f);
    p = swiftmoe_fma16(p, r, (swiftmoe_float16)1.0f);
    swiftmoe_int32x16 exponent = (__builtin_bit_cast(swiftmoe_int32x16, shifted) - __builtin_bit_cast(swiftmoe_int32x16, magic) + 127) << 23;
    return p * __builtin_bit_cast(swiftmoe_float16, exponent);
}

// GELU, tanh form: 0.5 x (1 + tanh(u)), u = s (x + c x^3), with Kernels.geluScale (s = sqrt(2/pi))
// and Kernels.geluCubic (c = 0.044715) passed in as Floats. With q = 1 / (exp(2u) + 1),
// tanh(u) = 1 - 2q, so GELU(x) = x - x q and GELU'(x) = (1 - q) (1 + 2 x q u'),
// u' = s (1 + 3 c x^2): one exponential and one division.
static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_gelu_q16(swiftmoe_float16 x, swiftmoe_float16 x2,
                                                                                float scale, float cubic) {
    swiftmoe_float16 twiceU = x * swiftmoe_fma16(x2, (swiftmoe_float16)(2 * scale * cubic), (swiftmoe_float16)(2 * scale));
    return 1.0f / (swiftmoe_exp16(twiceU) + 1.0f);
}

/// GELU (tanh form) of 16 lanes.
static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_gelu16(swiftmoe_float16 x, float scale, float cubic) {
    swiftmoe_float16 q = swiftmoe_gelu_q16(x, x * x, scale, cubic);
    return swiftmoe_fma16(-x, q, x);
}

/// GELU'(x) (tanh form) of 16 lanes.
static inline __attribute__((always_inline)) swiftmoe_float16 swiftmoe_gelu_derivative16(swiftmoe_float16 x, float scale, float cubic) {
    swiftmoe_float16 x2 = x * x;
    swiftmoe_float16 q = swiftmoe_gelu_q16(x, x2, scale, cubic);
    swiftmoe_float16 slope = swiftmoe_fma16(x2, (swiftmoe_float16)(3 * scale * cubic), (swiftmoe_float16)scale);
    return (1.0f - q) * swiftmoe_fma16(2.0f * x * q, slope, (swiftmoe_float16)1.0f);
}
#endif
