// exp and log that vectorise on the host and map to hardware intrinsics on the device.
//
// A scalar libm expf call per element makes the CPU kernels compute-bound at a fraction of
// memory speed; these branch-free polynomial versions let `#pragma omp simd` loops vectorise.
// Coefficients are the single-precision minimax fits of the Cephes library (S. L. Moshier,
// expf.c / logf.c); relative error about 1-2 ulp on the normal range.
//
// Special values are exact: fd_exp(-inf) = 0, fd_exp(+inf) = +inf, fd_exp(NaN) = NaN,
// fd_log(0) = -inf, fd_log(+inf) = +inf, fd_log(x < 0) = NaN, fd_log(NaN) = NaN.
// fd_exp flushes results below 2^-126 (x < -87.3) to zero: such terms are invisible next to the
// row maximum, whose exponential is 1.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "fastdistill/config.h"

namespace fastdistill {

FD_HD float bits_to_float(uint32_t u) {
#if FD_DEVICE_CODE
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FD_HD uint32_t float_to_bits(float f) {
#if FD_DEVICE_CODE
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// Fused multiply-add where the hardware has it. The host build uses -ffp-contract=off so that
// a product is rounded the same way everywhere it is used (z * (1/T) in a max and in an exp
// argument must agree bitwise); the polynomials below ask for FMA explicitly instead.
FD_HD float fd_fma(float a, float b, float c) {
#if FD_DEVICE_CODE || defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// a / b for a divisor b in [2^-126, 2^126] (the callers guarantee it: shifted sums of
// exponentials are >= 1, mixtures are clamped at FLT_MIN). The device uses the approximate
// division (2 ulp), which avoids the IEEE slow path: a subroutine call that costs registers and
// stack in every kernel that contains one.
FD_HD float fd_div(float a, float b) {
#if FD_DEVICE_CODE
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

FD_HD float fd_inf() { return std::numeric_limits<float>::infinity(); }
FD_HD float fd_nan() { return std::numeric_limits<float>::quiet_NaN(); }

FD_HD float fd_exp(float x) {
#if FD_DEVICE_CODE
  return __expf(x);  // ex2.approx: 2 ulp, exact at +-inf and NaN
#else
  // Branch-free: comparisons with NaN are false, so NaN flows through to the result.
  const float lo = -87.3f, hi = 88.72283905206835f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = round(x / ln 2) with the 1.5 * 2^23 trick: no float->int conversion of NaN.
  const float shifter = 12582912.0f;
  float t = xc * 1.44269504088896341f + shifter;
  float n = t - shifter;
  uint32_t tb = float_to_bits(t) - float_to_bits(shifter);  // low bits hold n (two's complement)
  // r = x - n * ln 2 in two steps (Cody-Waite), |r| <= ln2 / 2
  float r = fd_fma(n, -0.693359375f, xc);
  r = fd_fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fd_fma(p, r, 1.3981999507e-3f);
  p = fd_fma(p, r, 8.3334519073e-3f);
  p = fd_fma(p, r, 4.1665795894e-2f);
  p = fd_fma(p, r, 1.6666665459e-1f);
  p = fd_fma(p, r, 5.0000001201e-1f);
  p = fd_fma(p * r, r, r) + 1.0f;
  // 2^n as 2^(n-1) * 2 so n = 128 still has a finite scale; n = -126 gives scale 0 (flush).
  uint32_t e = (tb + 126u) << 23;
  float res = p * bits_to_float(e) * 2.0f;
  res = x < lo ? 0.0f : res;
  res = x > hi ? fd_inf() : res;
  return res;
#endif
}

FD_HD float fd_log(float x) {
#if FD_DEVICE_CODE
  return __logf(x);  // lg2.approx based; -inf at 0, NaN below
#else
  // Scale denormals into the normal range first.
  const bool tiny = x < 1.17549435e-38f;
  float xs = tiny ? x * 8388608.0f : x;  // 2^23
  uint32_t u = float_to_bits(xs);
  float e = (float)(int32_t)((u >> 23) & 0xff) - 126.0f - (tiny ? 23.0f : 0.0f);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = fd_fma(y, m, -1.1514610310e-1f);
  y = fd_fma(y, m, 1.1676998740e-1f);
  y = fd_fma(y, m, -1.2420140846e-1f);
  y = fd_fma(y, m, 1.4249322787e-1f);
  y = fd_fma(y, m, -1.6668057665e-1f);
  y = fd_fma(y, m, 2.0000714765e-1f);
  y = fd_fma(y, m, -2.4999993993e-1f);
  y = fd_fma(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = fd_fma(e, -2.12194440e-4f, y);
  y = fd_fma(-0.5f, z, y);
  float res = fd_fma(e, 0.693359375f, m + y);
  res = x == 0.0f ? -fd_inf() : res;
  res = x < 0.0f ? fd_nan() : res;
  res = x == fd_inf() ? fd_inf() : res;
  res = x != x ? x : res;
  return res;
#endif
}

}  // namespace fastdistill
