// The MLM loss's vocabulary softmax as one kernel: for each row of logits z (in place), the decoder
// bias added in fp32, logp[label] exactly (z[label] - max - log sum exp, in fp32: no probability
// underflows to a -inf loss), z overwritten with the loss gradient softmax(z) - onehot(label), and
// that gradient's column sums (dL/dbias) accumulated; rows at or past n_real (padding) become zeros.
// Eager torch needs a broadcast add, softmax, a gather, a log, a scatter, a fill and a column sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "bits.h"

namespace minibert {

inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_float(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16(v); }

constexpr int64_t kRows = 32;  // rows per task; the bias gradient is summed per task, in task order

// z (rows, V): logits without the decoder bias; bias (V,) fp32 or null. partial (tasks, V): each
// task's sum of its gradient rows (the bias gradient's share), or null.
template <typename T>
void softmax_xent_impl(T* __restrict z, const int64_t* __restrict labels, float* __restrict logp,
                       const float* __restrict bias, float* __restrict partial, int64_t rows, int64_t V,
                       int64_t n_real) {
  const int64_t tasks = (rows + kRows - 1) / kRows;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> e_(V);
    float* __restrict e = e_.data();
    for (int64_t t = t0; t < t1; ++t) {
      float* __restrict acc = partial ? partial + t * V : nullptr;
      for (int64_t r = t * kRows; r < std::min(rows, (t + 1) * kRows); ++r) {
        T* __restrict row = z + r * V;
        if (r >= n_real) {
          for (int64_t c = 0; c < V; ++c) store(row + c, 0.0f);
          continue;
        }
        float m = -INFINITY;
        if (bias) {
#pragma omp simd reduction(max : m)
          for (int64_t c = 0; c < V; ++c) {
            const float v = load(row[c]) + bias[c];  // the bias is added in fp32, after the GEMM's rounding
            e[c] = v;
            m = v > m ? v : m;
          }
        } else {
#pragma omp simd reduction(max : m)
          for (int64_t c = 0; c < V; ++c) {
            const float v = load(row[c]);
            e[c] = v;
            m = v > m ? v : m;
          }
        }
        const int64_t lab = labels[r];
        const float z_lab = e[lab];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t c = 0; c < V; ++c) {
          e[c] = fast_exp(e[c] - m);
          sum += e[c];
        }
        logp[r] = z_lab - m - std::log(sum);
        const float inv = 1.0f / sum;
        e[lab] -= sum;  // (e - sum) / sum = p - 1 at the label
        if (acc) {
#pragma omp simd
          for (int64_t c = 0; c < V; ++c) {
            const float g = e[c] * inv;
            store(row + c, g);
            acc[c] += g;
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < V; ++c) store(row + c, e[c] * inv);
        }
      }
    }
  });
}

// logits (rows, V) float32/bfloat16, changed in place; labels (rows,) int64 -> logp (rows,) float32.
// bias (V,) float32 is added to the logits first; grad_bias (V,) float32 gets the gradient's column sums
// added (dL/db of the summed loss). Either may be absent.
at::Tensor softmax_xent_(at::Tensor& logits, const at::Tensor& labels, int64_t n_real,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& grad_bias) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(),
              "minibert::softmax_xent_: contiguous CPU (rows, V) logits expected");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == logits.size(0),
              "minibert::softmax_xent_: int64 labels, one per row, expected");
  const int64_t rows = logits.size(0), V = logits.size(1), tasks = (rows + kRows - 1) / kRows;
  for (const auto* t : {&bias, &grad_bias})
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() &&
                                    (*t)->numel() == V),
                "minibert::softmax_xent_: bias and grad_bias must be contiguous float32 (V,)");
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t r = 0; r < std::min(rows, n_real); ++r)
    TORCH_CHECK(lab[r] >= 0 && lab[r] < V, "minibert::softmax_xent_: label ", lab[r], " outside [0, ", V, ")");
  auto logp = at::zeros({rows}, logits.options().dtype(at::kFloat));
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::Tensor part = grad_bias.has_value() ? at::zeros({tasks, V}, logp.options()) : at::Tensor();
  float* pp = grad_bias.has_value() ? part.data_ptr<float>() : nullptr;
  if (logits.scalar_type() == at::kFloat)
    softmax_xent_impl(logits.data_ptr<float>(), lab, logp.data_ptr<float>(), b, pp, rows, V, n_real);
  else if (logits.scalar_type() == at::kBFloat16)
    softmax_xent_impl(reinterpret_cast<uint16_t*>(logits.data_ptr()), lab, logp.data_ptr<float>(), b, pp, rows,
                      V, n_real);
  else
    TORCH_CHECK(false, "minibert::softmax_xent_: float32 or bfloat16 logits expected");
  if (pp) {  // per-task sums added in task order: the same bits whatever the thread count
    float* gb = grad_bias->data_ptr<float>();
    at::parallel_for(0, V, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t t = 0; t < tasks; ++t)
        for (int64_t c = c0; c < c1; ++c) gb[c] += pp[t * V + c];
    });
  }
  return logp;
}

}  // namespace minibert

TORCH_LIBRARY_FRAGMENT(minibert, m) {
  m.def("softmax_xent_(Tensor(a!) logits, Tensor labels, int n_real, Tensor? bias=None, Tensor(b!)? grad_bias=None)"
        " -> Tensor");
}

// CPU only: torch refuses any other device (CUDA, meta, ...) before this code could read its memory
TORCH_LIBRARY_IMPL(minibert, CPU, m) {
  m.impl("softmax_xent_", &minibert::softmax_xent_);
}
