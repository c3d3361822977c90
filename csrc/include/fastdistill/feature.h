// Feature (hidden-state) losses, defined once for the host and the device. Torch-free.
//
// Per token, with student row s and teacher row t of D features:
//   mse             L = 1/D sum_j (s_j - t_j)^2
//   cosine          L = 1 - s.t / (max(|s|, eps) max(|t|, eps)),            eps = 1e-8
//   normalized_mse  L = 1/D sum_j (s^_j - t^_j)^2, x^ = (x - mean x) / sqrt(var x + eps), eps = 1e-5
//                   (layer normalisation without affine terms, biased variance, as F.layer_norm)
//
// In all three the student gradient is affine in the row:
//     dL/ds_j = cs * (s_j - ms) + ct * (t_j - mt)
// (ms, mt the row means for normalized_mse, 0 otherwise), so a kernel needs the row sums below
// (pass 1) and then one pass that writes the gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdistill/config.h"

namespace fastdistill {

// Same numbering as fastdistill/functional.py (FEATURE_KINDS).
enum FeatureKind : int32_t { kMSE = 0, kCosine = 1, kNormalizedMSE = 2 };

constexpr double kCosineEps = 1e-8;
constexpr double kLayerNormEps = 1e-5;

// Row sums in double. For mse: d2 = sum (s - t)^2. For cosine: ss, tt, st (raw).
// For normalized_mse: mean_s, mean_t and the centred ss, tt, st (sum of (s - mean)(t - mean)...).
struct FeatureSums {
  double d2, ss, tt, st, mean_s, mean_t;
};

struct FeatureCoef {
  double loss, cs, ct, ms, mt;
};

FD_HD FeatureCoef feature_coef(int32_t kind, const FeatureSums& r, int64_t dim) {
  const double D = (double)dim;
  FeatureCoef c{0.0, 0.0, 0.0, 0.0, 0.0};
  if (kind == kMSE) {
    c.loss = r.d2 / D;
    c.cs = 2.0 / D;
    c.ct = -2.0 / D;
  } else if (kind == kCosine) {
    const double ns = sqrt(r.ss), nt = sqrt(r.tt);
    const double ns_c = ns > kCosineEps ? ns : kCosineEps;
    const double nt_c = nt > kCosineEps ? nt : kCosineEps;
    const double cosv = r.st / (ns_c * nt_c);
    c.loss = 1.0 - cosv;
    // d(1 - cos)/ds = cos s / |s|^2 - t / (|s| |t|); the first term vanishes when |s| <= eps
    // because the clamped norm no longer depends on s.
    c.cs = ns > kCosineEps ? cosv / (ns_c * ns_c) : 0.0;
    c.ct = -1.0 / (ns_c * nt_c);
  } else {  // kNormalizedMSE; ss, tt, st are centred sums
    const double vs = r.ss / D + kLayerNormEps, vt = r.tt / D + kLayerNormEps;
    const double sig_s = sqrt(vs), sig_t = sqrt(vt);
    const double shat2 = r.ss / (D * vs);             // mean of s^2 (hat)
    const double that2 = r.tt / (D * vt);
    const double sthat = r.st / (D * sig_s * sig_t);  // mean of s^ t^
    c.loss = shat2 + that2 - 2.0 * sthat;
    c.loss = c.loss < 0.0 ? 0.0 : c.loss;  // rounding can go below 0; NaN stays NaN
    // With d = 2/D (s^ - t^): dL/ds = (d - mean(d) - s^ mean(d s^)) / sigma_s, mean(d) = 0.
    const double md = 2.0 / D * (shat2 - sthat);
    c.cs = (2.0 / D - md) / vs;
    c.ct = -2.0 / D / (sig_s * sig_t);
    c.ms = r.mean_s;
    c.mt = r.mean_t;
  }
  if (c.loss != c.loss) {  // a NaN in the row: its whole gradient is NaN (RELIABILITY.md)
    c.cs = c.loss;
    c.ct = c.loss;
  }
  return c;
}

}  // namespace fastdistill
