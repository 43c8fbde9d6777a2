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
#endif
