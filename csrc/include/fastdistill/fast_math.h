// exp2 and log2 that vectorise on the host and map to hardware intrinsics on the device. The
// divergence math works in the log2 domain (x log2(e) folded into the logit multipliers): one
// MUFU operation per exponential or logarithm on the device, and on the host a polynomial with
// no range reduction by ln 2.
//
// Device (the MUFU unit; ftz: subnormal inputs and results are flushed to 0):
//   fd_exp2  ex2.approx.ftz.f32   CUDA C++ Programming Guide (intrinsic functions): 2 ulp
//   fd_log2  lg2.approx.ftz.f32   absolute error 2^-22 for x in [0.5, 2], otherwise 2 ulp
//   (tests/test_fast_math.py measures both against float64 on a GPU; the host versions below
//   are measured on every run.)
// Host: branch-free, `#pragma omp simd` loops vectorise them. Their coefficients were fitted here
// (a minimax fit by iteratively reweighted least squares, then rounded to float32):
//   fd_exp2  x = n + f, |f| <= 1/2, 2^f = 1 + f P(f), P of degree 5: < 1 ulp, max relative
//            error 2^-23.6 (every float32 in [-126, 127], measured against float64)
//   fd_log2  x = 2^e (1 + r), r in [sqrt(1/2) - 1, sqrt(2) - 1], log2(1 + r) = r Q(r), Q of
//            degree 9: < 2 ulp, or absolute error 2^-18 at |log2 x| > 1 (1 ulp of the result)
//
// Special values are exact and the same on host and device: fd_exp2(-inf) = 0, fd_exp2(+inf) =
// +inf, fd_exp2(NaN) = NaN; results below 2^-126 (x < -126) are 0, as the device flushes them;
// fd_log2(0) = fd_log2(subnormal) = -inf, fd_log2(+inf) = +inf, fd_log2(x < 0) = NaN, NaN -> NaN.
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
  // without the instruction: the product of two floats is exact in double, the sum is rounded
  // twice (double, then float) where a fused multiply-add rounds once, which can differ only in
  // halfway cases
  return (float)((double)a * (double)b + (double)c);
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

constexpr float kLog2e = 1.44269504088896341f;  // log2(e)
constexpr float kLn2 = 0.693147180559945309f;    // ln(2) = 1 / log2(e)
constexpr float kFltMin = 1.17549435e-38f;       // 2^-126, the smallest normal float

FD_HD float fd_exp2(float x) {
#if FD_DEVICE_CODE
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  // Comparisons with NaN are false: NaN flows through the clamps to the result.
  const float lo = -126.0f, hi = 127.49998f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = round(x) with the 1.5 * 2^23 shifter: no float -> int conversion of NaN; n in [-126, 127]
  const float shifter = 12582912.0f;
  const float t = xc + shifter;
  const float n = t - shifter;
  const uint32_t tb = float_to_bits(t) - float_to_bits(shifter);  // n, two's complement
  const float f = xc - n;  // exact, |f| <= 1/2
  float p = 1.53533852e-4f;
  p = fd_fma(p, f, 1.33988785e-3f);
  p = fd_fma(p, f, 9.61843692e-3f);
  p = fd_fma(p, f, 5.55033237e-2f);
  p = fd_fma(p, f, 2.40226477e-1f);
  p = fd_fma(p, f, 6.93147182e-1f);
  p = fd_fma(p, f, 1.0f);
  float res = p * bits_to_float((tb + 127u) << 23);  // 2^n, a normal float
  res = x < lo ? 0.0f : res;
  res = x > hi ? fd_inf() : res;
  return res;
#endif
}

FD_HD float fd_log2(float x) {
#if FD_DEVICE_CODE
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const uint32_t u = float_to_bits(x);
  float e = (float)(int32_t)((u >> 23) & 0xff) - 127.0f;
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // mantissa in [1, 2)
  const bool big = m > 1.41421356f;
  e = big ? e + 1.0f : e;
  m = big ? m * 0.5f : m;  // exact; m in (sqrt(1/2), sqrt(2)]
  const float r = m - 1.0f;  // exact
  float q = -1.09751180e-1f;
  q = fd_fma(q, r, 1.88390240e-1f);
  q = fd_fma(q, r, -1.92352861e-1f);
  q = fd_fma(q, r, 2.04289451e-1f);
  q = fd_fma(q, r, -2.39392921e-1f);
  q = fd_fma(q, r, 2.88579166e-1f);
  q = fd_fma(q, r, -3.60708803e-1f);
  q = fd_fma(q, r, 4.80898142e-1f);
  q = fd_fma(q, r, -7.21347153e-1f);
  q = fd_fma(q, r, 1.44269502e+0f);
  float res = fd_fma(q, r, e);
  res = x < kFltMin ? -fd_inf() : res;  // 0 and subnormals (flushed, as on the device)
  res = x < 0.0f ? fd_nan() : res;
  res = x == fd_inf() ? fd_inf() : res;
  res = x != x ? x : res;
  return res;
#endif
}

// Natural exp and log (the top-k kernels): the device intrinsics __expf (ex2.approx of x log2 e:
// 2 + floor(|1.173 x|) ulp) and __logf; on the host branch-free polynomials (the single-precision
// minimax fits of the Cephes library, S. L. Moshier, expf.c / logf.c; 1-2 ulp on the normal
// range, exact special values; exp flushes results below 2^-126, x < -87.3, to zero).
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
