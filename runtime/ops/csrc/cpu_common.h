// Loads, stores and roundings shared by hyla's CPU kernels: fp32 and bf16 (as raw bits), fp32
// arithmetic rounded to the tensor dtype exactly where PyTorch's ops round, and a vectorisable exp.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace hyla_cpu {

using bf16_bits = uint16_t;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const bf16_bits* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float round_to(float x, float*) { return x; }
inline float round_to(float x, bf16_bits*) {  // round to nearest even, as torch does; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  float f;
  std::memcpy(&f, &rounded, 4);
  return x != x ? x : f;  // branch-free, so loops around it vectorise
}

inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(bf16_bits* p, int64_t i, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  p[i] = x != x ? bf16_bits(0x7fc0) : static_cast<bf16_bits>(rounded);
}

// e^x for x <= 0 (softmax after the max is taken): 2^n * p(r), relative error ~2e-7.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest, vectorisable
  float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// x / (1 + e^-x) in fp32, without overflow (branch-free, one division)
inline float silu(float x) {
  const float e = exp_nonpositive(x < 0.0f ? x : -x);  // e^-|x|
  return (x < 0.0f ? x * e : x) / (1.0f + e);
}

}  // namespace hyla_cpu
