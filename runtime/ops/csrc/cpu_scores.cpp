// Log-probability and rank of one target token per row of logits, without the `[rows, vocabulary]`
// log-softmax PyTorch would write: per row one pass for the max and the count of logits above the
// target's, one for the sum of exponentials. What scoring prompt tokens (lm-eval's log-likelihoods)
// needs for every continuation token.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu_common.h"

namespace {

using namespace hyla_cpu;

template <typename T>
void score_impl(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& chosen, at::Tensor& ranks) {
  const int64_t rows = logits.size(0), V = logits.size(1);
  const T* lp = ptr<T>(logits);
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* cp = chosen.data_ptr<float>();
  int64_t* rp = ranks.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict row = lp + r * V;
      const float target = load(row, tp[r]);
      float mx = -INFINITY;
      int64_t above = 0;
#pragma omp simd reduction(max : mx) reduction(+ : above)
      for (int64_t i = 0; i < V; ++i) {
        const float v = load(row, i);
        mx = v > mx ? v : mx;
        above += v > target ? 1 : 0;
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < V; ++i) sum += exp_nonpositive(load(row, i) - mx);
      cp[r] = target - mx - std::log(sum);
      rp[r] = above + 1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> score_rows(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "score_rows: contiguous logits [rows, V]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong,
              "score_rows: int64 targets [rows]");
  const auto targets_c = targets.contiguous();
  if (targets_c.numel() > 0) {
    TORCH_CHECK(targets_c.min().item<int64_t>() >= 0 && targets_c.max().item<int64_t>() < logits.size(1),
                "score_rows: a target outside the vocabulary of ", logits.size(1));
  }
  auto chosen = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  auto ranks = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.scalar_type() == at::kBFloat16)
    score_impl<bf16_bits>(logits, targets_c, chosen, ranks);
  else if (logits.scalar_type() == at::kFloat)
    score_impl<float>(logits, targets_c, chosen, ranks);
  else
    TORCH_CHECK(false, "score_rows: bfloat16 or float32 only");
  return {chosen, ranks};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hyla_cpu, m) {
  m.def("score_rows(Tensor logits, Tensor targets) -> (Tensor, Tensor)", &score_rows);
}
