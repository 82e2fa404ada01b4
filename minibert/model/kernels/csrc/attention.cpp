// Training attention around the two batched GEMMs (Q K^T and P V), as single passes over memory:
//
// - to_heads: the unpadded rows of the fused projection, qkv (N, 3H), written straight into three
//   head-major padded tensors q, v (B*h, T, dh) and k transposed (B*h, dh, T), zeros at pad positions. Eager torch needs a zero
//   fill, an index_copy into (B*T, 3H), a permute copy per tensor, and backward a stack and a gather.
// - from_heads: the context (B*h, T, dh) read back into rows (N, H) (eager: a transpose copy and an
//   index_select; backward a zero fill and an index_copy).
// - softmax_dropout: the key-padding mask, the 1/sqrt(dh) scale, the softmax in fp32 and dropout of
//   the weights in one pass per row; backward is one pass too (dropout's mask regenerated from the
//   seed, bits.h, at the same element index as minibert::dropout would use on the weights).
//   Pad query rows (t >= valid_len) are written as zeros: nothing downstream reads them into a loss.
// Layout ops copy dh-element runs whatever the dtype; the softmax takes float32 or bfloat16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "bits.h"

namespace minibert {

namespace {

inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_float(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16(v); }

// row_of[b * T + t]: the row of qkv holding padded position (b, t), or -1 for a pad position.
std::vector<int64_t> rows_of(const at::Tensor& idx, int64_t BT) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
              "minibert attention: idx must be a contiguous int64 (N,) tensor");
  std::vector<int64_t> row_of(BT, -1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < BT && row_of[ip[r]] < 0, "minibert attention: idx ", ip[r],
                " outside [0, ", BT, ") or repeated");
    row_of[ip[r]] = r;
  }
  return row_of;
}

// Every idx entry a position of the padded (B, T) batch.
const int64_t* checked_idx(const at::Tensor& idx, int64_t BT, const char* who) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(), who,
              ": idx must be a contiguous int64 (N,) tensor");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r)
    TORCH_CHECK(ip[r] >= 0 && ip[r] < BT, who, ": idx ", ip[r], " outside [0, ", BT, ")");
  return ip;
}

}  // namespace

// n elements of es bytes (2 or 4): dst[i * dst_stride] = src[i * src_stride] (strides in elements).
inline void copy_run(char* dst, int64_t dst_stride, const char* src, int64_t src_stride, int64_t n, int64_t es) {
  if (dst_stride == 1 && src_stride == 1) {
    std::memcpy(dst, src, n * es);
  } else if (es == 2) {
    auto* d = reinterpret_cast<uint16_t*>(dst);
    auto* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) d[i * dst_stride] = s[i * src_stride];
  } else {
    auto* d = reinterpret_cast<uint32_t*>(dst);
    auto* s = reinterpret_cast<const uint32_t*>(src);
    for (int64_t i = 0; i < n; ++i) d[i * dst_stride] = s[i * src_stride];
  }
}

// qkv (N, 3H) rows -> q, k, v (B*h, T, dh); zeros at pad positions (pad keys and values are masked, but
// 0 * NaN is NaN: they must be finite).
std::tuple<at::Tensor, at::Tensor, at::Tensor> to_heads(const at::Tensor& qkv, const at::Tensor& idx, int64_t B,
                                                        int64_t T, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) % (3 * heads) == 0 &&
              qkv.size(0) == idx.numel(), "minibert::to_heads: contiguous (N, 3H) rows, one per idx entry, expected");
  TORCH_CHECK(qkv.element_size() == 2 || qkv.element_size() == 4, "minibert::to_heads: 16- or 32-bit elements");
  const int64_t H = qkv.size(1) / 3, dh = H / heads, es = qkv.element_size();
  const auto row_of = rows_of(idx, B * T);
  auto q = at::empty({B * heads, T, dh}, qkv.options()), k = at::empty({B * heads, T, dh}, qkv.options());
  auto v = at::empty({B * heads, T, dh}, qkv.options());
  const char* src = static_cast<const char*>(qkv.data_ptr());
  char *qp = static_cast<char*>(q.data_ptr()), *kp = static_cast<char*>(k.data_ptr());
  char* vp = static_cast<char*>(v.data_ptr());
  const std::vector<char> zeros(dh * es, 0);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = row_of[b * T + t];
        for (int64_t j = 0; j < heads; ++j) {
          const int64_t bh = b * heads + j;
          const char* row = r < 0 ? nullptr : src + (r * 3 * H + j * dh) * es;
          copy_run(qp + ((bh * T + t) * dh) * es, 1, row ? row : zeros.data(), 1, dh, es);
          copy_run(kp + ((bh * T + t) * dh) * es, 1, row ? row + H * es : zeros.data(), 1, dh, es);
          copy_run(vp + ((bh * T + t) * dh) * es, 1, row ? row + 2 * H * es : zeros.data(), 1, dh, es);
        }
      }
  });
  return {q, k, v};
}

// The gradient of to_heads: rows (N, 3H) gathered from dq, dk transposed (B*h, dh, T) and dv: autograd
// hands dK of Q K^T over as the transpose of a contiguous (B*h, dh, T) product, read here as it is.
at::Tensor to_heads_backward(const at::Tensor& dq, const at::Tensor& dkt, const at::Tensor& dv,
                             const at::Tensor& idx, int64_t heads) {
  TORCH_CHECK(dq.dim() == 3 && dq.size(0) % heads == 0 && dv.sizes() == dq.sizes() &&
              dkt.sizes() == at::IntArrayRef({dq.size(0), dq.size(2), dq.size(1)}),
              "minibert::to_heads_backward: dq, dv (B*h, T, dh) and dk transposed (B*h, dh, T) expected");
  for (const auto* g : {&dq, &dkt, &dv})
    TORCH_CHECK(g->is_contiguous() && g->scalar_type() == dq.scalar_type(),
                "minibert::to_heads_backward: contiguous gradients of one dtype expected");
  const int64_t T = dq.size(1), dh = dq.size(2), B = dq.size(0) / heads, H = heads * dh, N = idx.numel();
  const int64_t es = dq.element_size();
  const int64_t* ip = checked_idx(idx, B * T, "minibert::to_heads_backward");
  auto out = at::empty({N, 3 * H}, dq.options());
  char* dst = static_cast<char*>(out.data_ptr());
  const char *qp = static_cast<const char*>(dq.data_ptr()), *kp = static_cast<const char*>(dkt.data_ptr());
  const char* vp = static_cast<const char*>(dv.data_ptr());
  at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = ip[r] / T, t = ip[r] % T;
      for (int64_t j = 0; j < heads; ++j) {
        const int64_t bh = b * heads + j;
        char* row = dst + (r * 3 * H + j * dh) * es;
        copy_run(row, 1, qp + ((bh * T + t) * dh) * es, 1, dh, es);
        copy_run(row + H * es, 1, kp + (bh * dh * T + t) * es, T, dh, es);
        copy_run(row + 2 * H * es, 1, vp + ((bh * T + t) * dh) * es, 1, dh, es);
      }
    }
  });
  return out;
}

// ctx (B*h, T, dh) -> rows (N, H): row r is padded position idx[r], its heads side by side.
at::Tensor from_heads(const at::Tensor& ctx, const at::Tensor& idx, int64_t heads) {
  TORCH_CHECK(ctx.dim() == 3 && ctx.is_contiguous() && ctx.size(0) % heads == 0,
              "minibert::from_heads: contiguous (B*h, T, dh) expected");
  const int64_t T = ctx.size(1), dh = ctx.size(2), B = ctx.size(0) / heads, H = heads * dh, N = idx.numel();
  const int64_t es = ctx.element_size();
  const int64_t* ip = checked_idx(idx, B * T, "minibert::from_heads");
  auto out = at::empty({N, H}, ctx.options());
  char* dst = static_cast<char*>(out.data_ptr());
  const char* src = static_cast<const char*>(ctx.data_ptr());
  at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = ip[r] / T, t = ip[r] % T;
      for (int64_t j = 0; j < heads; ++j)
        std::memcpy(dst + (r * H + j * dh) * es, src + (((b * heads + j) * T + t) * dh) * es, dh * es);
    }
  });
  return out;
}

// The gradient of from_heads: rows (N, H) back into (B*h, T, dh), zeros at positions no row came from.
at::Tensor from_heads_backward(const at::Tensor& grad, const at::Tensor& idx, int64_t B, int64_t T, int64_t heads) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.size(1) % heads == 0 && grad.size(0) == idx.numel(),
              "minibert::from_heads_backward: contiguous (N, H) rows, one per idx entry, expected");
  const int64_t H = grad.size(1), dh = H / heads, es = grad.element_size();
  const auto row_of = rows_of(idx, B * T);
  auto out = at::empty({B * heads, T, dh}, grad.options());
  char* dst = static_cast<char*>(out.data_ptr());
  const char* src = static_cast<const char*>(grad.data_ptr());
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = row_of[b * T + t];
        for (int64_t j = 0; j < heads; ++j) {
          char* d = dst + (((b * heads + j) * T + t) * dh) * es;
          if (r < 0) std::memset(d, 0, dh * es);
          else std::memcpy(d, src + (r * H + j * dh) * es, dh * es);
        }
      }
  });
  return out;
}

namespace {

constexpr int64_t kRowsPerTask = 64;

// Every row of (B*h, Tq, Tk) weights, in parallel: real(row, L, scratch, bits) for a real query
// (index < its pair's valid length L), with the row's 16-bit dropout draws in bits and Tk floats of
// scratch; pad(row) for a pad query.
template <typename Real, typename Pad>
void for_rows(int64_t Bh, int64_t heads, int64_t Tq, int64_t Tk, const int64_t* __restrict valid, uint64_t seed,
              const Real& real, const Pad& pad) {
  const int64_t rows = Bh * Tq;
  at::parallel_for(0, (rows + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(Tk);
    std::vector<uint16_t> bits(Tk);
    std::vector<uint64_t> words(Tk / 4 + 2);
    for (int64_t task = t0; task < t1; ++task)
      for (int64_t row = task * kRowsPerTask; row < std::min(rows, (task + 1) * kRowsPerTask); ++row) {
        const int64_t L = valid[row / Tq / heads];
        if (row % Tq >= L) {
          pad(row);
          continue;
        }
        fill_bits(seed, row * Tk, Tk, bits.data(), words.data());  // element index of the (B, h, T, T) weights
        real(row, L, scratch.data(), bits.data());
      }
  });
}

template <typename T>
void softmax_dropout_impl(const T* __restrict s, T* __restrict prob, T* __restrict dropped,
                          const int64_t* __restrict valid, int64_t Bh, int64_t heads, int64_t Tq, int64_t Tk,
                          float scale, uint64_t seed, uint32_t cut, float keep_scale) {
  auto zero_from = [&](int64_t row, int64_t j0) {  // pad keys (and whole pad queries) get weight 0
    for (int64_t j = j0; j < Tk; ++j) store(prob + row * Tk + j, 0.f), store(dropped + row * Tk + j, 0.f);
  };
  auto real = [&](int64_t row, int64_t L, float* __restrict e, const uint16_t* __restrict bits) {
    const T* __restrict srow = s + row * Tk;
    T* __restrict prow = prob + row * Tk;
    T* __restrict drow = dropped + row * Tk;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < L; ++j) {
      e[j] = load(srow[j]) * scale;
      m = e[j] > m ? e[j] : m;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < L; ++j) {
      e[j] = fast_exp(e[j] - m);
      sum += e[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < L; ++j) {
      const float pj = e[j] * inv;
      store(prow + j, pj);
      store(drow + j, pj * keep_scale * float(uint32_t(bits[j]) >= cut));
    }
    zero_from(row, L);
  };
  for_rows(Bh, heads, Tq, Tk, valid, seed, real, [&](int64_t row) { zero_from(row, 0); });
}

template <typename T>
void softmax_dropout_backward_impl(const T* __restrict dd, const T* __restrict prob, T* __restrict ds,
                                   const int64_t* __restrict valid, int64_t Bh, int64_t heads, int64_t Tq,
                                   int64_t Tk, float scale, uint64_t seed, uint32_t cut, float keep_scale) {
  auto zero_from = [&](int64_t row, int64_t j0) {
    for (int64_t j = j0; j < Tk; ++j) store(ds + row * Tk + j, 0.f);
  };
  auto real = [&](int64_t row, int64_t L, float* __restrict dp, const uint16_t* __restrict bits) {
    const T* __restrict drow = dd + row * Tk;
    const T* __restrict prow = prob + row * Tk;
    T* __restrict out = ds + row * Tk;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < L; ++j) {
      dp[j] = load(drow[j]) * keep_scale * float(uint32_t(bits[j]) >= cut);  // d(loss)/d(softmax)
      dot += dp[j] * load(prow[j]);
    }
    for (int64_t j = 0; j < L; ++j) store(out + j, scale * load(prow[j]) * (dp[j] - dot));
    zero_from(row, L);
  };
  for_rows(Bh, heads, Tq, Tk, valid, seed, real, [&](int64_t row) { zero_from(row, 0); });
}

void check_scores(const at::Tensor& s, const at::Tensor& valid, int64_t heads, const char* who) {
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous() && s.size(0) % heads == 0, who,
              ": contiguous (B*h, T, T) scores expected");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16, who,
              ": float32 or bfloat16 scores expected");
  TORCH_CHECK(valid.scalar_type() == at::kLong && valid.is_contiguous() && valid.numel() * heads == s.size(0), who,
              ": int64 valid_lens (B,) expected");
  const int64_t* v = valid.data_ptr<int64_t>();
  for (int64_t b = 0; b < valid.numel(); ++b)
    TORCH_CHECK(v[b] >= 1 && v[b] <= s.size(2), who, ": valid_len ", v[b], " outside [1, ", s.size(2), "]");
}

}  // namespace

// scores (B*h, T, T) = Q K^T unscaled -> (softmax weights, their dropout), pad keys masked by valid_lens.
std::tuple<at::Tensor, at::Tensor> softmax_dropout(const at::Tensor& scores, const at::Tensor& valid, int64_t heads,
                                                   double scale, double p, int64_t seed) {
  check_scores(scores, valid, heads, "minibert::softmax_dropout");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "minibert::softmax_dropout: p must be in [0, 1), got ", p);
  auto prob = at::empty_like(scores), dropped = at::empty_like(scores);
  const uint32_t cut = uint32_t(std::llround(p * 65536.0));
  const float keep_scale = float(1.0 / (1.0 - p));
  const int64_t Bh = scores.size(0), Tq = scores.size(1), Tk = scores.size(2);
  if (scores.scalar_type() == at::kFloat)
    softmax_dropout_impl(scores.data_ptr<float>(), prob.data_ptr<float>(), dropped.data_ptr<float>(),
                         valid.data_ptr<int64_t>(), Bh, heads, Tq, Tk, float(scale), uint64_t(seed), cut, keep_scale);
  else
    softmax_dropout_impl(static_cast<const uint16_t*>(scores.data_ptr()), static_cast<uint16_t*>(prob.data_ptr()),
                         static_cast<uint16_t*>(dropped.data_ptr()), valid.data_ptr<int64_t>(), Bh, heads, Tq, Tk,
                         float(scale), uint64_t(seed), cut, keep_scale);
  return {prob, dropped};
}

// d(loss)/d(dropped weights) and the saved softmax weights -> d(loss)/d(scores).
at::Tensor softmax_dropout_backward(const at::Tensor& grad, const at::Tensor& prob, const at::Tensor& valid,
                                    int64_t heads, double scale, double p, int64_t seed) {
  check_scores(prob, valid, heads, "minibert::softmax_dropout_backward");
  TORCH_CHECK(grad.sizes() == prob.sizes() && grad.scalar_type() == prob.scalar_type() && grad.is_contiguous(),
              "minibert::softmax_dropout_backward: grad must match the saved weights");
  auto out = at::empty_like(prob);
  const uint32_t cut = uint32_t(std::llround(p * 65536.0));
  const float keep_scale = float(1.0 / (1.0 - p));
  const int64_t Bh = prob.size(0), Tq = prob.size(1), Tk = prob.size(2);
  if (prob.scalar_type() == at::kFloat)
    softmax_dropout_backward_impl(grad.data_ptr<float>(), prob.data_ptr<float>(), out.data_ptr<float>(),
                                  valid.data_ptr<int64_t>(), Bh, heads, Tq, Tk, float(scale), uint64_t(seed), cut,
                                  keep_scale);
  else
    softmax_dropout_backward_impl(static_cast<const uint16_t*>(grad.data_ptr()),
                                  static_cast<const uint16_t*>(prob.data_ptr()), static_cast<uint16_t*>(out.data_ptr()),
                                  valid.data_ptr<int64_t>(), Bh, heads, Tq, Tk, float(scale), uint64_t(seed), cut,
                                  keep_scale);
  return out;
}

}  // namespace minibert

TORCH_LIBRARY_FRAGMENT(minibert, m) {
  m.def("to_heads(Tensor qkv, Tensor idx, int B, int T, int heads) -> (Tensor, Tensor, Tensor)");
  m.def("to_heads_backward(Tensor dq, Tensor dk, Tensor dv, Tensor idx, int heads) -> Tensor");
  m.def("from_heads(Tensor ctx, Tensor idx, int heads) -> Tensor");
  m.def("from_heads_backward(Tensor grad, Tensor idx, int B, int T, int heads) -> Tensor");
  m.def("softmax_dropout(Tensor scores, Tensor valid_lens, int heads, float scale, float p, int seed)"
        " -> (Tensor, Tensor)");
  m.def("softmax_dropout_backward(Tensor grad, Tensor prob, Tensor valid_lens, int heads, float scale, float p,"
        " int seed) -> Tensor");
}

// CPU only: torch refuses any other device (CUDA, meta, ...) before this code could read its memory
TORCH_LIBRARY_IMPL(minibert, CPU, m) {
  m.impl("to_heads", &minibert::to_heads);
  m.impl("to_heads_backward", &minibert::to_heads_backward);
  m.impl("from_heads", &minibert::from_heads);
  m.impl("from_heads_backward", &minibert::from_heads_backward);
  m.impl("softmax_dropout", &minibert::softmax_dropout);
  m.impl("softmax_dropout_backward", &minibert::softmax_dropout_backward);
}
