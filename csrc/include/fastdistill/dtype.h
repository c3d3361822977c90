// Host conversions between float32 and the 16-bit storage types, written with integer bit
// operations so that `#pragma omp simd` loops vectorise them (no libm, no branches).
// The device code uses cuda_fp16.h / cuda_bf16.h intrinsics instead (see csrc/cuda/).
#pragma once

#include <cstdint>

#include "fastdistill/config.h"
#include "fastdistill/fast_math.h"

namespace fastdistill {

// bfloat16 is the top half of a float32.
FD_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet), inf stays inf.
FD_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

// IEEE half -> float, all classes (zero, subnormal, normal, inf, NaN).
FD_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // Normal and subnormal: shift into float position and rescale by 2^112 (= 2^(127-15)).
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;
  // inf / NaN: exponent all ones.
  uint32_t infnan = 0x7f800000u | (uint32_t(em & 0x3ffu) << 13);
  uint32_t bits = em >= 0x7c00u ? infnan : float_to_bits(mag);
  return bits_to_float(bits | sign);
}

// float -> IEEE half, round to nearest even, overflow to inf, subnormals handled, NaN kept.
FD_HD uint16_t float_to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // Normal range: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
  uint32_t normal = ((a - 0x38000000u) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal range (|f| < 2^-14): adding 0.5 rounds the value into the low mantissa bits of
  // a float whose unit in the last place is 2^-24 (the half subnormal step).
  float sub = bits_to_float(a) + 0.5f;
  uint32_t subnormal = float_to_bits(sub) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;                       // rounds to >= 65520: inf
  r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;  // NaN
  return (uint16_t)(r | sign);
}

// Load element i of a row stored in `dtype`, as float32.
FD_HD float load_as_float(const void* base, int64_t i, int32_t dtype) {
  if (dtype == kFloat32) return static_cast<const float*>(base)[i];
  uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dtype == kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

}  // namespace fastdistill
