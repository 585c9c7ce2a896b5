// A decoder layer's two halves as one op each on the CPU, for the packed passes of the engine:
// the mixer half (norm, input product, then rotary, KV store and paged attention for softmax
// attention, or the Gated DeltaNet op, then the output product) and the MLP half (residual add,
// norm, gate/up product, SiLU-and-mul, down product, residual add). They chain hyla's own CPU ops
// in C++, so a layer costs two calls from Python instead of a dozen module calls, checks and views:
// at batch 1 a small model's decode step is bound by those. Each op is the one its layer module would call, so the results are the same.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Tensor linear(const Tensor& x, const Tensor& packed, const OptTensor& bias, int64_t out) {
  static auto handle = op<Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t)>("hyla_cpu::packed_linear");
  return handle.call(x, packed, bias, out);
}

Tensor mlp_residual(const Tensor& x, const Tensor& a, const Tensor& norm_weight, double eps, const Tensor& gate_up,
                    const OptTensor& gate_up_bias, int64_t inter, const Tensor& down, const OptTensor& down_bias) {
  static auto add_norm = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>(
      "hyla_cpu::add_rms_norm");
  static auto silu_mul = op<Tensor(const Tensor&, const Tensor&)>("hyla_cpu::silu_mul");
  auto [h, y] = add_norm.call(x, a, norm_weight, eps);
  const Tensor gu = linear(y, gate_up, gate_up_bias, 2 * inter).view({-1, 2 * inter});
  const Tensor act = silu_mul.call(gu.narrow(1, 0, inter), gu.narrow(1, inter, inter));
  return h.add_(linear(act, down, down_bias, x.size(-1)).view(h.sizes()));
}

Tensor attention_half(const Tensor& x, const Tensor& norm_weight, double eps, const Tensor& qkv_packed,
                      const OptTensor& qkv_bias, int64_t heads, int64_t kv_heads, int64_t head_dim, const Tensor& cos,
                      const Tensor& sin, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping,
                      const Tensor& block_tables, const Tensor& context_lens, const Tensor& cu_seqlens, bool decode,
                      double scale, int64_t block_size, const Tensor& o_packed, const OptTensor& o_bias) {
  static auto norm = op<Tensor(const Tensor&, const Tensor&, double)>("hyla_cpu::rms_norm");
  static auto rotary = op<void(Tensor, Tensor, const Tensor&, const Tensor&)>("hyla_cpu::rotary_");
  static auto store = op<void(const Tensor&, const Tensor&, Tensor, Tensor, const Tensor&)>("hyla_cpu::store_kv");
  static auto decode_attn = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                      int64_t)>("hyla_cpu::decode_attention");
  static auto prefill_attn = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, double, int64_t)>("hyla_cpu::prefill_attention");
  const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
  const Tensor qkv = linear(norm.call(x, norm_weight, eps), qkv_packed, qkv_bias, q_width + 2 * kv_width)
                         .view({-1, q_width + 2 * kv_width});
  const int64_t T = qkv.size(0);
  const Tensor q = qkv.narrow(1, 0, q_width).view({T, heads, head_dim});
  const Tensor k = qkv.narrow(1, q_width, kv_width).view({T, kv_heads, head_dim});
  const Tensor v = qkv.narrow(1, q_width + kv_width, kv_width).view({T, kv_heads, head_dim});
  rotary.call(q, k, cos.view({T, head_dim}), sin.view({T, head_dim}));
  store.call(k, v, k_cache, v_cache, slot_mapping);
  const Tensor o = decode ? decode_attn.call(q, k_cache, v_cache, block_tables, context_lens, scale, block_size)
                          : prefill_attn.call(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, block_size);
  return linear(o.view({1, T, q_width}), o_packed, o_bias, x.size(-1));
}

Tensor gdn_half(const Tensor& x, const Tensor& norm_weight, double eps, const Tensor& proj_packed,
                const OptTensor& proj_bias, int64_t heads, int64_t head_dim, const Tensor& conv_weight, Tensor conv_state,
                Tensor state, const Tensor& state_idx, const Tensor& cu_seqlens, const Tensor& a_log,
                const Tensor& dt_bias, const Tensor& o_norm_weight, double o_norm_eps, double scale,
                const Tensor& o_packed, const OptTensor& o_bias) {
  static auto norm = op<Tensor(const Tensor&, const Tensor&, double)>("hyla_cpu::rms_norm");
  static auto gdn = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor, Tensor,
                              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double)>(
      "hyla_cpu::gdn_forward_");
  const int64_t width = heads * head_dim, total = 4 * width + 2 * heads;
  const Tensor p = linear(norm.call(x, norm_weight, eps), proj_packed, proj_bias, total).view({-1, total});
  const Tensor o = gdn.call(p.narrow(1, 0, 3 * width), p.narrow(1, 3 * width, width), p.narrow(1, 4 * width, heads),
                            p.narrow(1, 4 * width + heads, heads), conv_weight, conv_state, state, state_idx,
                            cu_seqlens, a_log, dt_bias, o_norm_weight, o_norm_eps, scale);
  return linear(o.view({1, p.size(0), width}), o_packed, o_bias, x.size(-1));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hyla_cpu, m) {
  m.def("gdn_half(Tensor x, Tensor norm_weight, float eps, Tensor proj_packed, Tensor? proj_bias, int heads, "
        "int head_dim, Tensor conv_weight, Tensor(a!) conv_state, Tensor(b!) state, Tensor state_idx, "
        "Tensor cu_seqlens, Tensor a_log, Tensor dt_bias, Tensor o_norm_weight, float o_norm_eps, float scale, "
        "Tensor o_packed, Tensor? o_bias) -> Tensor",
        &gdn_half);
  m.def("mlp_residual(Tensor x, Tensor a, Tensor norm_weight, float eps, Tensor gate_up, Tensor? gate_up_bias, "
        "int inter, Tensor down, Tensor? down_bias) -> Tensor",
        &mlp_residual);
  m.def("attention_half(Tensor x, Tensor norm_weight, float eps, Tensor qkv_packed, Tensor? qkv_bias, int heads, "
        "int kv_heads, int head_dim, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor cu_seqlens, bool decode, float scale, "
        "int block_size, Tensor o_packed, Tensor? o_bias) -> Tensor",
        &attention_half);
}
