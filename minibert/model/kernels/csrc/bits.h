// Shared helpers of minibert's CPU kernels: the dropout bit stream, bf16 <-> fp32, a vectorizable exp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace minibert {

// The dropout mask comes from a counter-based generator, not from a stateful one: element i keeps
// its value when 16 bits of word(i / 4) are >= cut, and word(j) is splitmix64's output function
// applied to seed + (j + 1) * golden ratio. Any element's bit can be recomputed from (seed, i)
// alone, so backward regenerates the mask instead of storing it, and threads need no shared state.
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// bits[k] = 16 random bits of element first + k, for k < n (little-endian: element 4j + t is bits
// 16t..16t+15 of word j). `words` is scratch of at least n / 4 + 2 entries.
inline void fill_bits(uint64_t seed, int64_t first, int64_t n, uint16_t* bits, uint64_t* words) {
  const int64_t w0 = first >> 2, w1 = (first + n + 3) >> 2;
  for (int64_t j = w0; j < w1; ++j) words[j - w0] = mix64(seed + uint64_t(j + 1) * kGolden);
  std::memcpy(bits, reinterpret_cast<const uint16_t*>(words) + (first & 3), n * sizeof(uint16_t));
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
}

// exp(x) for float lanes: Cephes' expf (range reduction by ln 2, degree-6 polynomial), ~1 ulp;
// written out so GCC vectorizes it (libm's expf does not vectorize without -ffast-math).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // plain compares, not fmin/fmax: those are libm calls here
  x = x > 88.0f ? 88.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

}  // namespace minibert
