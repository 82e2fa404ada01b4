// Shared helpers of minibert's CPU kernels: the dropout bit stream and bf16 <-> fp32.
#pragma once
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

}  // namespace minibert
