// Dropout as one pass over memory: y = x * keep(i) / (1 - p), keep from (seed, i) (bits.h).
// The backward pass is the same function applied to the incoming gradient with the same seed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "bits.h"

namespace minibert {

constexpr int64_t kGrain = 8192;  // elements per task: a multiple of 4, fits the L1 cache

inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_float(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16(v); }

// T: float, or uint16_t holding bfloat16 bits
template <typename T>
void dropout_impl(const T* __restrict src, T* __restrict dst, int64_t n, uint64_t seed, uint32_t cut,
                  float scale) {
  const int64_t tasks = (n + kGrain - 1) / kGrain;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> bits_(kGrain);
    std::vector<uint64_t> words(kGrain / 4 + 2);
    uint16_t* __restrict bits = bits_.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t first = t * kGrain, len = std::min(kGrain, n - first);
      fill_bits(seed, first, len, bits, words.data());
      const T* __restrict x = src + first;
      T* __restrict y = dst + first;
      for (int64_t k = 0; k < len; ++k) store(y + k, load(x[k]) * scale * float(uint32_t(bits[k]) >= cut));
    }
  });
}

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "minibert::dropout: contiguous CPU tensor expected");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "minibert::dropout: p must be in [0, 1), got ", p);
  auto out = at::empty_like(x);
  const uint32_t cut = uint32_t(std::llround(p * 65536.0));
  const float scale = float(1.0 / (1.0 - p));
  if (x.scalar_type() == at::kFloat) {
    dropout_impl(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), uint64_t(seed), cut, scale);
  } else if (x.scalar_type() == at::kBFloat16) {
    dropout_impl(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                 x.numel(), uint64_t(seed), cut, scale);
  } else {
    TORCH_CHECK(false, "minibert::dropout: float32 or bfloat16 expected, got ", x.scalar_type());
  }
  return out;
}

// The raw 16-bit draws of elements [first, first + n): what the tests compare with a plain reference.
at::Tensor dropout_bits(int64_t seed, int64_t first, int64_t n) {
  auto out = at::empty({n}, at::kInt);
  std::vector<uint16_t> bits(n);
  std::vector<uint64_t> words(n / 4 + 2);
  fill_bits(uint64_t(seed), first, n, bits.data(), words.data());
  int32_t* dst = out.data_ptr<int32_t>();
  for (int64_t k = 0; k < n; ++k) dst[k] = bits[k];
  return out;
}

}  // namespace minibert

TORCH_LIBRARY_FRAGMENT(minibert, m) {
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("dropout_bits(int seed, int first, int n) -> Tensor", &minibert::dropout_bits);
}

// CPU only: torch refuses any other device (CUDA, meta, ...) before this code could read its memory
TORCH_LIBRARY_IMPL(minibert, CPU, m) {
  m.impl("dropout", &minibert::dropout);
}
