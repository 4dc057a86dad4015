// Small math helpers shared by the kernels, written so that loops over them vectorize (with
// -fno-trapping-math, which the kernels are built with; without it GCC vectorizes none of them).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pravaha {

// exp(x) for x <= 0 (softmax after subtracting the max), written so loops over it vectorize:
// Cody-Waite range reduction to r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial, 2^n by
// exponent bits. Relative error about 2e-7; exp(x) below 2^-126 flushes to 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// silu(x) = x * sigmoid(x), through exp of -|x| only (so exp_nonpositive applies).
inline float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float num = x >= 0 ? 1.0f : e;          // sigmoid(x) = num / (1 + e)
  return x * num / (1.0f + e);
}

}  // namespace pravaha
