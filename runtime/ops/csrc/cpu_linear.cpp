// bf16 linear layers for CPUs with AVX512-BF16: y = x W^T + b with fp32 accumulation.
//
// The weight is packed once into blocks of 16 output rows whose input pairs are interleaved,
// [ceil(O / 16), I / 2, 16, 2], so one vdpbf16ps multiplies a broadcast pair of x with the same pair
// of 16 outputs and no horizontal sums are needed. Each core streams a contiguous run of blocks, a
// few at a time, over every row of x; a decode step's matrix-vector products then read the weights
// at close to memory bandwidth, which oneDNN's bf16 path does not reach for a handful of rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 16;  // output rows per packed block

// Rows [0, M) of x against blocks [ob, ob + NB) of the packed weight, M <= 4.
template <int M, int NB>
inline void tile(const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs, int64_t ob, int64_t O,
                 uint16_t* out, int64_t ldo, const float* bias) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int32_t* wb = w + ob * pairs * kBlock;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(wb + (b * pairs + p) * kBlock);
    for (int m = 0; m < M; ++m) {
      const __m512i xb = _mm512_set1_epi32(x[m * ldx + p]);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)wv[b], (__m512bh)xb);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t col = (ob + b) * kBlock;
    const __mmask16 valid = O - col >= kBlock ? __mmask16(0xffff) : __mmask16((1u << (O - col)) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(valid, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][b], bv));
      _mm256_mask_storeu_epi16(out + m * ldo + col, valid, y);
    }
  }
}

template <int NB>
inline void rows_tile(int64_t rows, const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs, int64_t ob,
                      int64_t O, uint16_t* out, int64_t ldo, const float* bias) {
  switch (rows) {
    case 1: tile<1, NB>(x, ldx, w, pairs, ob, O, out, ldo, bias); break;
    case 2: tile<2, NB>(x, ldx, w, pairs, ob, O, out, ldo, bias); break;
    case 3: tile<3, NB>(x, ldx, w, pairs, ob, O, out, ldo, bias); break;
    default: tile<4, NB>(x, ldx, w, pairs, ob, O, out, ldo, bias); break;
  }
}

}  // namespace

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
  // each core takes a run of blocks; a group of blocks stays in cache while every row passes it
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    auto rows_over = [&](int64_t b, int64_t nb) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t r = std::min<int64_t>(4, M - m0);
        if (nb == 4)
          rows_tile<4>(r, xp + m0 * pairs, pairs, w, pairs, b, O, op + m0 * O, O, bp);
        else
          rows_tile<1>(r, xp + m0 * pairs, pairs, w, pairs, b, O, op + m0 * O, O, bp);
      }
    };
    int64_t b = begin;
    if (M == 1)  // one row: more weight streams in flight
      for (; b + 8 <= end; b += 8) tile<1, 8>(xp, pairs, w, pairs, b, O, op, O, bp);
    for (; b + 4 <= end; b += 4) rows_over(b, 4);
    for (; b < end; ++b) rows_over(b, 1);
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
