// bf16 linear layers for CPUs with AVX512-BF16: y = x W^T + b with fp32 accumulation.
//
// The weight is packed once into the blocks of `cpu_gemm.h` ([ceil(O / 16), I / 2, 16, 2]). Each
// core streams a contiguous run of blocks, a few at a time, over every row of x; a decode step's
// matrix-vector products then read the weights at close to memory bandwidth, which oneDNN's bf16
// path does not reach for a handful of rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu_gemm.h"

#ifdef HYLA_GEMM_BF16

using hyla_cpu::kBlock;

at::Tensor pack_linear(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) % 2 == 0, "bf16 [O, I] weight with I even");
  const int64_t O = w.size(0), I = w.size(1), blocks = (O + kBlock - 1) / kBlock;
  at::Tensor padded = at::zeros({blocks * kBlock, I}, w.options());
  padded.narrow(0, 0, O).copy_(w);
  return padded.view({blocks, kBlock, I / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                         int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "bf16 input and weight");
  const int64_t I = x.size(-1), pairs = I / 2, blocks = packed.size(0), O = out_features;
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) == pairs && packed.size(2) == kBlock && blocks * kBlock >= O,
              "weight not packed for this input width");
  at::Tensor rows = x.reshape({-1, I}).contiguous();
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == O, "bias size");
    b32 = bias->to(at::kFloat).contiguous();
  }
  const int64_t M = rows.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  at::Tensor out = at::empty(shape, x.options());
  const int32_t* xp = reinterpret_cast<const int32_t*>(rows.data_ptr());
  const int32_t* w = reinterpret_cast<const int32_t*>(packed.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  if (M == 0) return out;
  // each core takes a run of blocks
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    hyla_cpu::gemm_blocks(M, xp, pairs, w, pairs, pairs, begin, end, O, op, O, bp);
  });
  return out;
}

bool linear_supported() { return true; }

#else  // no AVX512-BF16: the Python side keeps oneDNN

at::Tensor pack_linear(const at::Tensor&) { TORCH_CHECK(false, "built without AVX512-BF16"); }
at::Tensor packed_linear(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}
bool linear_supported() { return false; }

#endif

TORCH_LIBRARY_FRAGMENT(hyla_cpu, m) {
  m.def("pack_linear(Tensor w) -> Tensor", &pack_linear);
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &packed_linear);
  m.def("linear_supported() -> bool", &linear_supported);
}
