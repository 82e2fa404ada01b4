// Post-LN AddNorm as one pass per row: out = LayerNorm(x + dropout(y)), the residual sum in fp32.
// Eager torch makes five passes over memory for this (mask, scale, add, two for LayerNorm) and
// as many again backward; here forward reads y and x once and writes s (saved for backward) and
// out, and backward reads dout and s once and writes dx and dy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "bits.h"

namespace minibert {

constexpr int64_t kRows = 32;  // rows per task; dweight/dbias are summed per task in a fixed order

// y and dy are float32 (stored as float) or bfloat16 (stored as its 16 bits)
inline float load(float v) { return v; }
inline float load(uint16_t v) { return bf16_to_float(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16(v); }

template <typename T>
T* raw(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

static void check(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 2 && y.sizes() == x.sizes(), "minibert::add_norm: y and x must be the same (N, H)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "minibert::add_norm: x, weight, bias must be float32");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16,
              "minibert::add_norm: y must be float32 or bfloat16");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && w.is_contiguous() && b.is_contiguous() &&
              w.numel() == x.size(1) && b.numel() == x.size(1), "minibert::add_norm: contiguous tensors expected");
}

template <typename YT>
void add_norm_impl(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   double p, int64_t seed, double eps, at::Tensor& out, at::Tensor& s, at::Tensor& mean,
                   at::Tensor& rstd) {
  const int64_t N = x.size(0), H = x.size(1);
  const uint32_t cut = uint32_t(std::llround(p * 65536.0));
  const float scale = float(1.0 / (1.0 - p));
  const YT* yr = raw<const YT>(y);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = s.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> bits(kRows * H);
    std::vector<uint64_t> words(kRows * H / 4 + 2);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRows, r1 = std::min(N, r0 + kRows);
      fill_bits(uint64_t(seed), r0 * H, (r1 - r0) * H, bits.data(), words.data());
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* __restrict keep = bits.data() + (r - r0) * H;
        const YT* __restrict yrow = yr + r * H;
        const float* __restrict xrow = xp + r * H;
        float* __restrict srow = sp + r * H;
        float* __restrict orow = op + r * H;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < H; ++c) {
          const float v = xrow[c] + load(yrow[c]) * scale * float(uint32_t(keep[c]) >= cut);
          srow[c] = v;
          sum += v;
        }
        const float mu = sum / H;
        float var = 0.f;
#pragma omp simd reduction(+ : var)
        for (int c = 0; c < H; ++c) var += (srow[c] - mu) * (srow[c] - mu);
        const float rs = 1.0f / std::sqrt(var / H + float(eps));
        for (int c = 0; c < H; ++c) orow[c] = (srow[c] - mu) * rs * wp[c] + bp[c];
        mp[r] = mu;
        rp[r] = rs;
      }
    }
  });
}

// -> out (N, H) fp32, s = x + dropout(y) (N, H) fp32, mean (N,), rstd (N,)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm(
    const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    double p, int64_t seed, double eps) {
  check(y, x, weight, bias);
  TORCH_CHECK(p >= 0.0 && p < 1.0, "minibert::add_norm: p must be in [0, 1), got ", p);
  const int64_t N = x.size(0), H = x.size(1);
  auto out = at::empty({N, H}, x.options()), s = at::empty({N, H}, x.options());
  auto mean = at::empty({N}, x.options()), rstd = at::empty({N}, x.options());
  if (y.scalar_type() == at::kBFloat16) add_norm_impl<uint16_t>(y, x, weight, bias, p, seed, eps, out, s, mean, rstd);
  else add_norm_impl<float>(y, x, weight, bias, p, seed, eps, out, s, mean, rstd);
  return {out, s, mean, rstd};
}

template <typename YT>
void add_norm_backward_impl(const at::Tensor& dout, const at::Tensor& s, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& weight, double p, int64_t seed,
                            at::Tensor& dy, at::Tensor& dx, at::Tensor& dw_part, at::Tensor& db_part) {
  const int64_t N = s.size(0), H = s.size(1), tasks = (N + kRows - 1) / kRows;
  const uint32_t cut = uint32_t(std::llround(p * 65536.0));
  const float scale = float(1.0 / (1.0 - p));
  const float *gp = dout.data_ptr<float>(), *sp = s.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dwp = dw_part.data_ptr<float>(), *dbp = db_part.data_ptr<float>();
  YT* dyp = raw<YT>(dy);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> bits(kRows * H);
    std::vector<uint64_t> words(kRows * H / 4 + 2);
    std::vector<float> xhat_(H);
    float* __restrict xhat = xhat_.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRows, r1 = std::min(N, r0 + kRows);
      fill_bits(uint64_t(seed), r0 * H, (r1 - r0) * H, bits.data(), words.data());
      float* __restrict dw = dwp + t * H;
      float* __restrict db = dbp + t * H;
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* __restrict keep = bits.data() + (r - r0) * H;
        const float* __restrict grow = gp + r * H;
        const float* __restrict srow = sp + r * H;
        float* __restrict dxrow = dxp + r * H;
        YT* __restrict dyrow = dyp + r * H;
        const float mu = mp[r], rs = rp[r];
        float c1 = 0.f, c2 = 0.f;  // mean of g * xhat and of g, g = dout * weight
#pragma omp simd reduction(+ : c1, c2)
        for (int c = 0; c < H; ++c) {
          const float xh = (srow[c] - mu) * rs, g = grow[c] * wp[c];
          xhat[c] = xh;
          c1 += g * xh;
          c2 += g;
        }
        for (int c = 0; c < H; ++c) {
          dw[c] += grow[c] * xhat[c];
          db[c] += grow[c];
        }
        c1 /= H;
        c2 /= H;
        for (int c = 0; c < H; ++c) {
          const float ds = rs * (grow[c] * wp[c] - c2 - xhat[c] * c1);
          dxrow[c] = ds;
          store(dyrow + c, ds * scale * float(uint32_t(keep[c]) >= cut));
        }
      }
    }
  });
}

// -> dy (N, H) in y's dtype, dx (N, H) fp32, dweight (H,), dbias (H,)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_backward(
    const at::Tensor& dout, const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, int64_t y_dtype, double p, int64_t seed) {
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.is_contiguous() && dout.sizes() == s.sizes(),
              "minibert::add_norm_backward: contiguous float32 gradient of out's shape expected");
  const int64_t N = s.size(0), H = s.size(1), tasks = (N + kRows - 1) / kRows;
  const auto yt = at::ScalarType(y_dtype);
  TORCH_CHECK(yt == at::kFloat || yt == at::kBFloat16, "minibert::add_norm_backward: y_dtype float32 or bfloat16");
  auto dx = at::empty({N, H}, s.options()), dy = at::empty({N, H}, s.options().dtype(yt));
  auto dw_part = at::zeros({tasks, H}, s.options()), db_part = at::zeros({tasks, H}, s.options());
  if (yt == at::kBFloat16) add_norm_backward_impl<uint16_t>(dout, s, mean, rstd, weight, p, seed, dy, dx, dw_part, db_part);
  else add_norm_backward_impl<float>(dout, s, mean, rstd, weight, p, seed, dy, dx, dw_part, db_part);
  // per-task partial sums added in task order: the same bits whatever the thread count
  auto dw = at::zeros({H}, s.options()), db = at::zeros({H}, s.options());
  float *w = dw.data_ptr<float>(), *b = db.data_ptr<float>();
  const float *wq = dw_part.data_ptr<float>(), *bq = db_part.data_ptr<float>();
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t c = 0; c < H; ++c) {
      w[c] += wq[t * H + c];
      b[c] += bq[t * H + c];
    }
  return {dy, dx, dw, db};
}

}  // namespace minibert

TORCH_LIBRARY_FRAGMENT(minibert, m) {
  m.def("add_norm(Tensor y, Tensor x, Tensor weight, Tensor bias, float p, int seed, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("add_norm_backward(Tensor dout, Tensor s, Tensor mean, Tensor rstd, Tensor weight, int y_dtype,"
        " float p, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
}

// CPU only: torch refuses any other device (CUDA, meta, ...) before this code could read its memory
TORCH_LIBRARY_IMPL(minibert, CPU, m) {
  m.impl("add_norm", &minibert::add_norm);
  m.impl("add_norm_backward", &minibert::add_norm_backward);
}
