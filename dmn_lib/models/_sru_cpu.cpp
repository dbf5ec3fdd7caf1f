// The SRU recurrence (paper §3.3, eq. 5-6, with the sru package's v ⊙ c_{t-1} terms) on the CPU:
// forward and hand-written backward, parallel over the batch, the time loop inside.
// Compiled once per environment by dmn_lib/models/_sru_cpu.py; the maths (and the readable Python
// loop this equals) are taught in notebook 03. Registered as torch.ops.dmn_sru.{forward,backward}.
//
// Layouts (all contiguous): U (L, B, d, k) with per unit j the columns [candidate, forget, reset(,
// skip)]; x (L, B, d) the skip term when k == 3; weight_c = [v_f; v_r], bias = [b_f; b_r] (2d);
// cells (L + 1, B, d) with cells[0] = c0 and cells[t + 1] = c_t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// g of eq. 6 (0 identity, 1 tanh, 2 sigmoid), and dg/dc written from g itself.
template <typename T>
inline T activation(T c, int64_t kind) {
  return kind == 1 ? std::tanh(c) : kind == 2 ? sigmoid(c) : c;
}
template <typename T>
inline T activation_grad(T g, int64_t kind) {
  return kind == 1 ? T(1) - g * g : kind == 2 ? g * (T(1) - g) : T(1);
}

struct Sizes {
  int64_t L, B, d, k;
};

// Rows b0..b1-1 of the batch: c_t and h_t for every t.
template <typename T>
void forward_rows(const T* U, const T* x, const T* wc, const T* bias, T* h, T* cells, Sizes s,
                  int64_t act, int64_t b0, int64_t b1) {
  const int64_t d = s.d, k = s.k;
  const T *v_f = wc, *v_r = wc + d, *b_f = bias, *b_r = bias + d;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t = 0; t < s.L; ++t) {
      const int64_t row = t * s.B + b;  // (t, b)
      const T* u = U + row * d * k;
      const T* skip = x + row * d;  // read only when k == 3
      const T* c_prev = cells + row * d;
      T* c = cells + (row + s.B) * d;
      T* out = h + row * d;
      for (int64_t j = 0; j < d; ++j) {
        const T cand = u[j * k];
        const T f = sigmoid(u[j * k + 1] + v_f[j] * c_prev[j] + b_f[j]);
        const T r = sigmoid(u[j * k + 2] + v_r[j] * c_prev[j] + b_r[j]);
        const T c_t = cand + (c_prev[j] - cand) * f;
        const T x_t = k == 4 ? u[j * k + 3] : skip[j];
        c[j] = c_t;
        out[j] = x_t + (activation(c_t, act) - x_t) * r;
      }
    }
  }
}

// Rows b0..b1-1, t from L-1 down to 0. dc carries dLoss/dc_t back in time; the weight_c and bias
// gradients are summed over t per row (the caller sums the rows).
template <typename T>
void backward_rows(const T* U, const T* x, const T* wc, const T* bias, const T* cells, const T* grad_h,
                   const T* grad_c_last, T* grad_U, T* grad_x, T* grad_c0, T* grad_wc_rows, T* grad_bias_rows,
                   Sizes s, int64_t act, int64_t b0, int64_t b1) {
  const int64_t d = s.d, k = s.k;
  const T *v_f = wc, *v_r = wc + d, *b_f = bias, *b_r = bias + d;
  for (int64_t b = b0; b < b1; ++b) {
    T* dc = grad_c0 + b * d;
    T *gv_f = grad_wc_rows + b * 2 * d, *gv_r = gv_f + d;
    T *gb_f = grad_bias_rows + b * 2 * d, *gb_r = gb_f + d;
    for (int64_t j = 0; j < d; ++j) {
      dc[j] = grad_c_last[b * d + j];
      gv_f[j] = gv_r[j] = gb_f[j] = gb_r[j] = T(0);
    }
    for (int64_t t = s.L - 1; t >= 0; --t) {
      const int64_t row = t * s.B + b;
      const T* u = U + row * d * k;
      const T* c_prev = cells + row * d;
      const T* c = cells + (row + s.B) * d;
      const T* gh = grad_h + row * d;
      T* gu = grad_U + row * d * k;
      for (int64_t j = 0; j < d; ++j) {
        const T cand = u[j * k];
        const T f = sigmoid(u[j * k + 1] + v_f[j] * c_prev[j] + b_f[j]);
        const T r = sigmoid(u[j * k + 2] + v_r[j] * c_prev[j] + b_r[j]);
        const T g = activation(c[j], act);
        const T x_t = k == 4 ? u[j * k + 3] : x[row * d + j];
        // h_t = x'_t + (g(c_t) - x'_t) r_t
        const T g_reset = gh[j] * (g - x_t) * r * (T(1) - r);  // through σ of eq. 4
        const T g_skip = gh[j] * (T(1) - r);
        const T g_c = dc[j] + gh[j] * r * activation_grad(g, act);
        // c_t = cand + (c_{t-1} - cand) f_t
        const T g_forget = g_c * (c_prev[j] - cand) * f * (T(1) - f);  // through σ of eq. 3
        gu[j * k] = g_c * (T(1) - f);
        gu[j * k + 1] = g_forget;
        gu[j * k + 2] = g_reset;
        if (k == 4) {
          gu[j * k + 3] = g_skip;
        } else {
          grad_x[row * d + j] = g_skip;
        }
        dc[j] = g_c * f + g_forget * v_f[j] + g_reset * v_r[j];
        gv_f[j] += g_forget * c_prev[j];
        gv_r[j] += g_reset * c_prev[j];
        gb_f[j] += g_forget;
        gb_r[j] += g_reset;
      }
    }
  }
}

Sizes check(const at::Tensor& U, const at::Tensor& x, const at::Tensor& wc, const at::Tensor& bias,
            const at::Tensor& cells_or_c0, bool has_time) {
  TORCH_CHECK(U.dim() == 3, "U must be (L, B, d * k), got ", U.sizes());
  const int64_t d = cells_or_c0.size(-1);
  Sizes s{U.size(0), U.size(1), d, d > 0 ? U.size(2) / d : 0};
  TORCH_CHECK(s.k == 3 || s.k == 4, "U's last size must be 3 or 4 times the hidden size ", d);
  TORCH_CHECK(wc.numel() == 2 * d && bias.numel() == 2 * d, "weight_c and bias must have 2 * ", d, " entries");
  TORCH_CHECK(s.k == 4 || x.sizes() == at::IntArrayRef({s.L, s.B, d}), "x must be (L, B, d) when k == 3");
  TORCH_CHECK(!has_time || cells_or_c0.size(0) == s.L + 1, "cells must be (L + 1, B, d)");
  for (const at::Tensor* t : {&U, &x, &wc, &bias, &cells_or_c0}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "dmn_sru: CPU contiguous tensors only");
    TORCH_CHECK(t->scalar_type() == U.scalar_type(), "dmn_sru: all tensors must have U's dtype");
  }
  return s;
}

int64_t grain(Sizes s) {  // rows per task: at least ~32k elements of work each
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.L * s.d));
}

std::vector<at::Tensor> sru_forward(const at::Tensor& U, const at::Tensor& x, const at::Tensor& weight_c,
                                    const at::Tensor& bias, const at::Tensor& c0, int64_t act) {
  const Sizes s = check(U, x, weight_c, bias, c0, false);
  at::Tensor h = at::empty({s.L, s.B, s.d}, U.options());
  at::Tensor cells = at::empty({s.L + 1, s.B, s.d}, U.options());
  cells[0].copy_(c0);
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "dmn_sru_forward", [&] {
    at::parallel_for(0, s.B, grain(s), [&](int64_t b0, int64_t b1) {
      forward_rows<scalar_t>(U.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight_c.data_ptr<scalar_t>(),
                             bias.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), s,
                             act, b0, b1);
    });
  });
  return {h, cells};
}

// -> grad_U, grad_x (zeros-sized when k == 4), grad_weight_c per row (B, 2d), grad_bias per row, grad_c0.
std::vector<at::Tensor> sru_backward(const at::Tensor& U, const at::Tensor& x, const at::Tensor& weight_c,
                                     const at::Tensor& bias, const at::Tensor& cells, const at::Tensor& grad_h,
                                     const at::Tensor& grad_c_last, int64_t act) {
  const Sizes s = check(U, x, weight_c, bias, cells, true);
  TORCH_CHECK(grad_h.is_contiguous() && grad_h.numel() == s.L * s.B * s.d, "grad_h must be (L, B, d)");
  TORCH_CHECK(grad_c_last.is_contiguous() && grad_c_last.numel() == s.B * s.d, "grad_c must be (B, d)");
  at::Tensor grad_U = at::empty_like(U);
  at::Tensor grad_x = s.k == 3 ? at::empty_like(x) : at::empty({0}, U.options());
  at::Tensor grad_wc_rows = at::empty({s.B, 2 * s.d}, U.options());
  at::Tensor grad_bias_rows = at::empty({s.B, 2 * s.d}, U.options());
  at::Tensor grad_c0 = at::empty({s.B, s.d}, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "dmn_sru_backward", [&] {
    at::parallel_for(0, s.B, grain(s), [&](int64_t b0, int64_t b1) {
      backward_rows<scalar_t>(U.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight_c.data_ptr<scalar_t>(),
                              bias.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(),
                              grad_c_last.data_ptr<scalar_t>(), grad_U.data_ptr<scalar_t>(),
                              s.k == 3 ? grad_x.data_ptr<scalar_t>() : nullptr, grad_c0.data_ptr<scalar_t>(),
                              grad_wc_rows.data_ptr<scalar_t>(), grad_bias_rows.data_ptr<scalar_t>(), s, act, b0,
                              b1);
    });
  });
  return {grad_U, grad_x, grad_wc_rows, grad_bias_rows, grad_c0};
}

}  // namespace

TORCH_LIBRARY(dmn_sru, m) {
  m.def("forward", &sru_forward);
  m.def("backward", &sru_backward);
}
