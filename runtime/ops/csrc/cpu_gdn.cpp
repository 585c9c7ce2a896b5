// Gated DeltaNet on the CPU for packed chunks (prefill, chunked prefill and decode alike), from
// the stacked input projection to the gated norm, reading and writing the conv and recurrent state
// slots in place.
//
// Unfused, a GDN layer runs the short conv, two L2 norms, the gates, the delta rule and the gated
// RMSNorm as a few dozen PyTorch ops (a chunked WY form for prefill). Here one task per (sequence,
// head) runs the recurrence token by token: the head's fp32 state (D x D, 16 KB at D = 64) stays in
// L1 and each token is four vectorised passes over it, which on a CPU beats the chunked form's
// small products. It rounds where the unfused ops round (conv weight, conv output, normalised
// q/k, o and the norm in the activation dtype), as the CUDA decode kernel does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_common.h"

namespace {

using namespace hyla_cpu;

constexpr float kL2Eps = 1e-6f;  // as `l2_normalize`
// A (sequence, head) walks the packed rows token by token, a few KB apart: the hardware prefetcher
// does not follow, so each token's rows of the head are prefetched this many tokens ahead.
constexpr int64_t kAhead = 4;

// One delta-rule step on a head's state S [D, D] (row i: key dim, column j: value dim):
// u = beta (v - decay S^T k); S = decay S + k u^T; o = S^T q. Columns go in groups of C whose sums
// over rows stay in registers, split over even and odd rows so that two add chains run at once.
// The decay scales the first sum and is applied as the rows are rewritten: S is read twice and
// written once.
template <int C>
inline void delta_step(float* S, int64_t D, const float* q, const float* k, const float* v, float* u, float* o,
                       float decay, float beta) {
  for (int64_t j0 = 0; j0 < D; j0 += C) {
    float even[C] = {}, odd[C] = {};
    int64_t i = 0;
    for (; i + 1 < D; i += 2) {
      const float* r0 = S + i * D + j0;
      const float* r1 = r0 + D;
      const float k0 = k[i], k1 = k[i + 1];
#pragma omp simd
      for (int j = 0; j < C; ++j) {
        even[j] += k0 * r0[j];
        odd[j] += k1 * r1[j];
      }
    }
    for (; i < D; ++i) {
      const float* r0 = S + i * D + j0;
#pragma omp simd
      for (int j = 0; j < C; ++j) even[j] += k[i] * r0[j];
    }
#pragma omp simd
    for (int j = 0; j < C; ++j) u[j0 + j] = beta * (v[j0 + j] - decay * (even[j] + odd[j]));
  }
  for (int64_t j0 = 0; j0 < D; j0 += C) {
    float even[C] = {}, odd[C] = {};
    const float* uj = u + j0;
    int64_t i = 0;
    for (; i + 1 < D; i += 2) {
      float* r0 = S + i * D + j0;
      float* r1 = r0 + D;
      const float k0 = k[i], k1 = k[i + 1], q0 = q[i], q1 = q[i + 1];
#pragma omp simd
      for (int j = 0; j < C; ++j) {
        r0[j] = decay * r0[j] + k0 * uj[j];
        r1[j] = decay * r1[j] + k1 * uj[j];
        even[j] += q0 * r0[j];
        odd[j] += q1 * r1[j];
      }
    }
    for (; i < D; ++i) {
      float* r0 = S + i * D + j0;
#pragma omp simd
      for (int j = 0; j < C; ++j) {
        r0[j] = decay * r0[j] + k[i] * uj[j];
        even[j] += q[i] * r0[j];
      }
    }
#pragma omp simd
    for (int j = 0; j < C; ++j) o[j0 + j] = even[j] + odd[j];
  }
}

template <typename T, typename CS>
void gdn_impl(const at::Tensor& qkv, const at::Tensor& gate, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& conv_weight, at::Tensor& conv_state, at::Tensor& state, const at::Tensor& idx,
              const at::Tensor& cu, const at::Tensor& a_log, const at::Tensor& dt_bias, const at::Tensor& norm_weight,
              double norm_eps, double scale, at::Tensor& out) {
  const int64_t N = idx.numel(), H = a.size(1), D = gate.size(1) / H, W = conv_weight.size(1);
  const T* xp = ptr<T>(qkv);
  const T* gp = ptr<T>(gate);
  const T* ap = ptr<T>(a);
  const T* bp = ptr<T>(b);
  const T* nw = ptr<T>(norm_weight);
  CS* cs = ptr<CS>(conv_state);
  float* sp = state.data_ptr<float>();
  T* op = ptr<T>(out);
  const int64_t* slots = idx.data_ptr<int64_t>();
  const int64_t* offsets = cu.data_ptr<int64_t>();
  // conv weights rounded to the activation dtype, as `conv_weight.to(qkv.dtype)` does; tap-major
  // ([W, 3 H D]) so a head's channels are contiguous per tap
  at::Tensor w32 = conv_weight.to(qkv.scalar_type()).to(at::kFloat).t().contiguous();
  at::Tensor alog32 = a_log.to(at::kFloat).contiguous(), dtb32 = dt_bias.to(at::kFloat).contiguous();
  const float* wp = w32.data_ptr<float>();
  const float* alog = alog32.data_ptr<float>();
  const float* dtb = dtb32.data_ptr<float>();
  const int64_t C = conv_weight.size(0);
  const int64_t cs_n = conv_state.stride(0), cs_c = conv_state.stride(1), cs_w = conv_state.stride(2);
  const int64_t s_n = state.stride(0), s_h = state.stride(1), x_t = qkv.stride(0), g_t = gate.stride(0);
  const float fscale = static_cast<float>(scale), feps = static_cast<float>(norm_eps);
  T* nil = nullptr;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> window(3 * (W - 1) * D), q(D), k(D), v(D), u(D), o(D);  // window [part, tap, D]
    const float sc = fscale, eps = feps;  // locals: float stores cannot alias them, so they stay in registers
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / H, h = item % H, slot = slots[n];
      CS* cstate = cs + slot * cs_n;
      // the head's 3 D conv channels: past inputs, oldest first, in the activation dtype
      for (int64_t part = 0; part < 3; ++part)
        for (int64_t j = 0; j < W - 1; ++j)
          for (int64_t d = 0; d < D; ++d)
            window[(part * (W - 1) + j) * D + d] = round_to(load(cstate + ((part * H + h) * D + d) * cs_c, j * cs_w), nil);
      float* S = sp + slot * s_n + h * s_h;  // [K, V]
      const float neg_a = -std::exp(alog[h]);
      for (int64_t t = offsets[n]; t < offsets[n + 1]; ++t) {
        const T* x = xp + t * x_t;
        if (t + kAhead < offsets[n + 1]) {  // this head's rows a few tokens ahead
          const char* rows[4] = {reinterpret_cast<const char*>(x + kAhead * x_t + h * D),
                                 reinterpret_cast<const char*>(x + kAhead * x_t + (H + h) * D),
                                 reinterpret_cast<const char*>(x + kAhead * x_t + (2 * H + h) * D),
                                 reinterpret_cast<const char*>(gp + (t + kAhead) * g_t + h * D)};
          for (const char* row : rows)
            for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(row + byte);
        }
        float* qkv_f[3] = {q.data(), k.data(), v.data()};
        for (int64_t part = 0; part < 3; ++part) {  // SiLU(causal conv), rounded; the window takes x
          const int64_t c0 = (part * H + h) * D;
          float* win = window.data() + part * (W - 1) * D;
          float* dst = qkv_f[part];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] = wp[(W - 1) * C + c0 + d] * load(x, c0 + d);
          for (int64_t j = 0; j < W - 1; ++j) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[d] += win[j * D + d] * wp[j * C + c0 + d];
          }
          if (W > 1) {
            std::copy(win + D, win + (W - 1) * D, win);
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) win[(W - 2) * D + d] = load(x, c0 + d);
          }
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dst[d] = round_to(silu(dst[d]), nil);
        }
        for (float* vec : {q.data(), k.data()}) {  // x * dtype(rsqrt(sum x^2 + eps)), rounded
          float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
          for (int64_t d = 0; d < D; ++d) ss += vec[d] * vec[d];
          const float inv = round_to(1.0f / std::sqrt(ss + kL2Eps), nil);
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) vec[d] = round_to(vec[d] * inv, nil);
        }
        const float pre = load(ap, t * a.stride(0) + h) + dtb[h];
        const float softplus = pre > 20.0f ? pre : std::log1p(std::exp(pre));
        const float decay = std::exp(neg_a * softplus);
        const float beta = 1.0f / (1.0f + std::exp(-load(bp, t * b.stride(0) + h)));
        if (D % 64 == 0) {
          delta_step<64>(S, D, q.data(), k.data(), v.data(), u.data(), o.data(), decay, beta);
        } else if (D % 16 == 0) {
          delta_step<16>(S, D, q.data(), k.data(), v.data(), u.data(), o.data(), decay, beta);
        } else {
          delta_step<1>(S, D, q.data(), k.data(), v.data(), u.data(), o.data(), decay, beta);
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < D; ++j) {
          o[j] = round_to(sc * o[j], nil);
          ss += o[j] * o[j];
        }
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
        const T* g = gp + t * g_t + h * D;
        T* dst = op + t * H * D + h * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const float normed = round_to(load(nw, j) * round_to(o[j] * inv, nil), nil);
          store(dst, j, normed * round_to(silu(load(g, j)), nil));
        }
      }
      for (int64_t part = 0; part < 3; ++part)
        for (int64_t j = 0; j < W - 1; ++j)
          for (int64_t d = 0; d < D; ++d)
            store(cstate + ((part * H + h) * D + d) * cs_c, j * cs_w, window[(part * (W - 1) + j) * D + d]);
    }
  });
}

at::Tensor gdn_forward_(const at::Tensor& qkv, const at::Tensor& gate, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& conv_weight, at::Tensor conv_state, at::Tensor state,
                        const at::Tensor& state_idx, const at::Tensor& cu_seqlens, const at::Tensor& a_log,
                        const at::Tensor& dt_bias, const at::Tensor& norm_weight, double norm_eps, double scale) {
  const int64_t T = qkv.size(0), H = a.size(1);
  TORCH_CHECK(qkv.dim() == 2 && gate.dim() == 2 && a.dim() == 2 && b.sizes() == a.sizes(), "rows of qkv, gate, a, b");
  TORCH_CHECK(gate.size(1) % H == 0 && qkv.size(1) == 3 * gate.size(1), "qkv [T, 3 H D], gate [T, H D]");
  const int64_t D = gate.size(1) / H;
  for (const at::Tensor* t : {&qkv, &gate, &a, &b}) TORCH_CHECK(t->stride(1) == 1 && t->size(0) == T, "contiguous rows");
  TORCH_CHECK(qkv.scalar_type() == gate.scalar_type() && a.scalar_type() == qkv.scalar_type() &&
                  b.scalar_type() == qkv.scalar_type() && norm_weight.scalar_type() == qkv.scalar_type(),
              "one activation dtype");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.size(1) == H && state.size(2) == D &&
                  state.size(3) == D && state.stride(3) == 1 && state.stride(2) == D,
              "fp32 state [slots, H, D, D] with contiguous matrices");
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(1) == 3 * H * D && conv_state.size(2) == conv_weight.size(1) - 1,
              "conv state [slots, 3 H D, W - 1]");
  TORCH_CHECK(norm_weight.is_contiguous() && norm_weight.numel() == D, "norm weight [D]");
  at::Tensor idx = state_idx.to(at::kLong).contiguous(), cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t N = idx.numel();
  TORCH_CHECK(cu.numel() == N + 1, "one state slot per sequence");
  // a slot shared by several rows (the padding rows of a captured step) ends up holding one of them
  for (int64_t n = 0; n < N; ++n) {
    const int64_t slot = idx.data_ptr<int64_t>()[n];
    TORCH_CHECK(slot >= 0 && slot < state.size(0) && slot < conv_state.size(0), "state slot out of range");
    const int64_t* c = cu.data_ptr<int64_t>();
    TORCH_CHECK(c[n] <= c[n + 1] && c[n + 1] <= T, "cu_seqlens must rise within the packed rows");
  }
  at::Tensor out = at::empty({T, gate.size(1)}, qkv.options());
  const auto act = qkv.scalar_type(), cs = conv_state.scalar_type();
  if (act == at::kBFloat16 && cs == at::kBFloat16)
    gdn_impl<bf16_bits, bf16_bits>(qkv, gate, a, b, conv_weight, conv_state, state, idx, cu, a_log, dt_bias, norm_weight, norm_eps, scale, out);
  else if (act == at::kBFloat16 && cs == at::kFloat)
    gdn_impl<bf16_bits, float>(qkv, gate, a, b, conv_weight, conv_state, state, idx, cu, a_log, dt_bias, norm_weight, norm_eps, scale, out);
  else if (act == at::kFloat && cs == at::kFloat)
    gdn_impl<float, float>(qkv, gate, a, b, conv_weight, conv_state, state, idx, cu, a_log, dt_bias, norm_weight, norm_eps, scale, out);
  else
    TORCH_CHECK(false, "gdn_forward_: bfloat16 or float32 activations, conv state in either");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hyla_cpu, m) {
  m.def("gdn_forward_(Tensor qkv, Tensor gate, Tensor a, Tensor b, Tensor conv_weight, Tensor(a!) conv_state, "
        "Tensor(b!) state, Tensor state_idx, Tensor cu_seqlens, Tensor a_log, Tensor dt_bias, Tensor norm_weight, "
        "float norm_eps, float scale) -> Tensor",
        &gdn_forward_);
}
