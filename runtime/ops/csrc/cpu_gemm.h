// The bf16 matrix-product tile shared by hyla's CPU kernels (AVX512-BF16 only): rows of x against a
// weight packed in blocks of 16 output rows whose input pairs are interleaved, [blocks, I / 2, 16, 2],
// so one vdpbf16ps multiplies a broadcast pair of x with the same pair of 16 outputs, fp32 sums.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HYLA_GEMM_BF16 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace hyla_cpu {

constexpr int64_t kBlock = 16;  // output rows per packed block

inline void store_row(float* out, __m512 v, __mmask16 valid) { _mm512_mask_storeu_ps(out, valid, v); }
inline void store_row(uint16_t* out, __m512 v, __mmask16 valid) {
  _mm256_mask_storeu_epi16(out, valid, (__m256i)_mm512_cvtneps_pbh(v));
}

// Rows [0, M) of x (bf16 pairs, row stride ldx) against blocks [ob, ob + NB) of the packed weight,
// whose blocks hold `stride` pairs of which the first `pairs` are used; outputs past O are not
// written. M <= 4.
template <int M, int NB, typename Out>
inline void gemm_tile(const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs, int64_t stride, int64_t ob,
                      int64_t O, Out* out, int64_t ldo, const float* bias) {
  __m512 acc[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int32_t* wb = w + ob * stride * kBlock;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(wb + (b * stride + p) * kBlock);
    for (int m = 0; m < M; ++m) {
      const __m512i xb = _mm512_set1_epi32(x[m * ldx + p]);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)wv[b], (__m512bh)xb);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t col = (ob + b) * kBlock;
    const __mmask16 valid = O - col >= kBlock ? __mmask16(0xffff) : __mmask16((1u << (O - col)) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(valid, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) store_row(out + m * ldo + col, _mm512_add_ps(acc[m][b], bv), valid);
  }
}

template <int NB, typename Out>
inline void gemm_rows_tile(int64_t rows, const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs,
                           int64_t stride, int64_t ob, int64_t O, Out* out, int64_t ldo, const float* bias) {
  switch (rows) {
    case 1: gemm_tile<1, NB>(x, ldx, w, pairs, stride, ob, O, out, ldo, bias); break;
    case 2: gemm_tile<2, NB>(x, ldx, w, pairs, stride, ob, O, out, ldo, bias); break;
    case 3: gemm_tile<3, NB>(x, ldx, w, pairs, stride, ob, O, out, ldo, bias); break;
    default: gemm_tile<4, NB>(x, ldx, w, pairs, stride, ob, O, out, ldo, bias); break;
  }
}

// out[m, :O] = x[m] . W^T (+ bias) for every row m < M, over weight blocks [b0, b1) of `stride`
// pairs (the first `pairs` used), on this thread: a group of blocks stays in cache while every row
// passes it.
template <typename Out>
void gemm_blocks(int64_t M, const int32_t* x, int64_t ldx, const int32_t* w, int64_t pairs, int64_t stride,
                 int64_t b0, int64_t b1, int64_t O, Out* out, int64_t ldo, const float* bias) {
  auto rows_over = [&](int64_t b, bool four) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t r = std::min<int64_t>(4, M - m0);
      if (four)
        gemm_rows_tile<4>(r, x + m0 * ldx, ldx, w, pairs, stride, b, O, out + m0 * ldo, ldo, bias);
      else
        gemm_rows_tile<1>(r, x + m0 * ldx, ldx, w, pairs, stride, b, O, out + m0 * ldo, ldo, bias);
    }
  };
  int64_t b = b0;
  if (M == 1)  // one row: more weight streams in flight
    for (; b + 8 <= b1; b += 8) gemm_tile<1, 8>(x, ldx, w, pairs, stride, b, O, out, ldo, bias);
  for (; b + 4 <= b1; b += 4) rows_over(b, true);
  for (; b < b1; ++b) rows_over(b, false);
}

}  // namespace hyla_cpu

#endif
