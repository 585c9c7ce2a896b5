// Causal prefill attention over the paged KV pool on CPUs with AVX512-BF16 (bf16, head width a
// multiple of 16): packed chunks whose queries are the last positions of their sequences, cached
// prefix included.
//
// Per (sequence, KV head) the keys and values are gathered once from their blocks into the packed
// layout of `cpu_gemm.h` (keys as a [positions, D] weight, values transposed as [D, positions]).
// Per group of query rows (the G query heads of the KV head at a few positions), the scores come
// from one tile product against the keys a causal row can see, the softmax runs in fp32 and its
// bf16 probabilities go through a second product against the values. Work items are taken
// dynamically: causal rows late in a sequence cost more than early ones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "cpu_gemm.h"

#ifdef HYLA_GEMM_BF16

namespace {

using namespace hyla_cpu;

constexpr int64_t kPositions = 8;  // query positions per work item (times G rows)

struct Head {
  int64_t n, h, ctx, qlen, q0;  // sequence, KV head, context length, query count, first packed row
  std::vector<uint16_t> keys, values;  // packed [ceil(ctx/16), D/2, 16, 2] and [D/16, ceil(ctx/2), 16, 2]
};

void pack_head(Head& hd, const uint16_t* kc, const uint16_t* vc, const int32_t* table, int64_t block_size,
               int64_t Hkv, int64_t D) {
  // Runs once per (sequence, KV head) and layer, over the whole context however few the queries
  // (a short suffix after a long cached prefix): written as 32-bit moves the compiler vectorises.
  const int64_t kblocks = (hd.ctx + kBlock - 1) / kBlock, vpairs = (hd.ctx + 1) / 2, words = D / 2;
  hd.keys.resize(kblocks * kBlock * D);
  hd.values.resize(D * vpairs * 2);
  auto row = [&](const uint16_t* pool, int64_t t) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    return reinterpret_cast<const uint32_t*>(pool + (slot * Hkv + hd.h) * D);
  };
  static const uint32_t kZeros[256] = {};  // the rows past the context (D <= 512)
  uint32_t* keys = reinterpret_cast<uint32_t*>(hd.keys.data());
  for (int64_t b = 0; b < kblocks; ++b) {  // a block of 16 key rows, transposed to [D/2, 16] words
    const uint32_t* rows[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) rows[j] = b * kBlock + j < hd.ctx ? row(kc, b * kBlock + j) : kZeros;
    uint32_t* dst = keys + b * words * kBlock;
    for (int64_t p = 0; p < words; ++p)
      for (int64_t j = 0; j < kBlock; ++j) dst[p * kBlock + j] = rows[j][p];
  }
  uint32_t* values = reinterpret_cast<uint32_t*>(hd.values.data());
  for (int64_t pair = 0; pair < vpairs; ++pair) {  // two positions interleaved per 32-bit word
    const uint16_t* a = reinterpret_cast<const uint16_t*>(row(vc, 2 * pair));
    const uint16_t* b = 2 * pair + 1 < hd.ctx ? reinterpret_cast<const uint16_t*>(row(vc, 2 * pair + 1))
                                               : reinterpret_cast<const uint16_t*>(kZeros);
    for (int64_t blk = 0; blk < D / kBlock; ++blk) {
      uint32_t* dst = values + (blk * vpairs + pair) * kBlock;
      for (int64_t i = 0; i < kBlock; ++i)
        dst[i] = static_cast<uint32_t>(a[blk * kBlock + i]) | static_cast<uint32_t>(b[blk * kBlock + i]) << 16;
    }
  }
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                             const at::Tensor& context_lens, double scale, int64_t block_size) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.scalar_type() == at::kBFloat16, "bf16 q [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "bf16 pools [slots, Hkv, D]");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), G = Hq / Hkv;
  TORCH_CHECK(D % kBlock == 0 && D <= 512 && k_cache.size(2) == D && Hq % Hkv == 0,
              "head width a multiple of 16, at most 512");
  at::Tensor cu = cu_seqlens_q.to(at::kLong).contiguous(), lens = context_lens.to(at::kLong).contiguous();
  at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const int64_t N = lens.numel(), max_blocks = tables.size(1);
  const int64_t* cup = cu.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  std::vector<Head> heads;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t qlen = cup[n + 1] - cup[n];
    TORCH_CHECK(qlen <= lp[n] && lp[n] <= max_blocks * block_size, "context shorter than its queries or its table");
    for (int64_t h = 0; h < Hkv && qlen > 0; ++h) heads.push_back({n, h, lp[n], qlen, cup[n], {}, {}});
  }
  TORCH_CHECK(N == 0 || cup[N] <= T, "cu_seqlens past the packed queries");
  const uint16_t* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const uint16_t* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const int32_t* tp = tables.data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(heads.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) pack_head(heads[i], kc, vc, tp + heads[i].n * max_blocks, block_size, Hkv, D);
  });
  std::vector<std::pair<int64_t, int64_t>> items;  // (head, first query position of the group)
  for (int64_t i = 0; i < static_cast<int64_t>(heads.size()); ++i)
    for (int64_t p = 0; p < heads[i].qlen; p += kPositions) items.push_back({i, p});
  at::Tensor out = at::zeros(q.sizes(), q.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t q_t = q.stride(0), q_h = q.stride(1), o_t = out.stride(0), o_h = out.stride(1);
  const float fscale = static_cast<float>(scale);
  const int64_t count = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<uint16_t> xq, probs;
    std::vector<float> scores, acc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < count; ++it) {
      const Head& hd = heads[items[it].first];
      const int64_t p0 = items[it].second, positions = std::min(kPositions, hd.qlen - p0), rows = positions * G;
      const int64_t first_pos = hd.ctx - hd.qlen + p0, visible = first_pos + positions;  // keys the last row sees
      const int64_t kblocks = (visible + kBlock - 1) / kBlock, width = kblocks * kBlock;
      const int64_t vpairs = (hd.ctx + 1) / 2, used_pairs = (visible + 1) / 2;
      xq.resize(rows * D);
      for (int64_t pos = 0; pos < positions; ++pos)
        for (int64_t g = 0; g < G; ++g)
          std::copy_n(qp + (hd.q0 + p0 + pos) * q_t + (hd.h * G + g) * q_h, D, xq.data() + (pos * G + g) * D);
      scores.resize(rows * width);
      gemm_blocks(rows, reinterpret_cast<const int32_t*>(xq.data()), D / 2,
                  reinterpret_cast<const int32_t*>(hd.keys.data()), D / 2, D / 2, 0, kblocks, width, scores.data(),
                  width, nullptr);
      probs.assign(rows * used_pairs * 2, 0);
      std::vector<float> inv(rows);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t seen = first_pos + r / G + 1;
        float* s = scores.data() + r * width;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t t = 0; t < seen; ++t) mx = s[t] > mx ? s[t] : mx;
        float sum = 0.0f;
        uint16_t* pr = probs.data() + r * used_pairs * 2;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < seen; ++t) {
          const float e = exp_nonpositive((s[t] - mx) * fscale);
          sum += e;
          store(pr, t, e);
        }
        inv[r] = 1.0f / sum;
      }
      acc.resize(rows * D);
      gemm_blocks(rows, reinterpret_cast<const int32_t*>(probs.data()), used_pairs,
                  reinterpret_cast<const int32_t*>(hd.values.data()), used_pairs, vpairs, 0, D / kBlock, D, acc.data(),
                  D, nullptr);
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* dst = op + (hd.q0 + p0 + r / G) * o_t + (hd.h * G + r % G) * o_h;
        for (int64_t d = 0; d < D; ++d) store(dst, d, acc[r * D + d] * inv[r]);
      }
    }
  }
  return out;
}

#else

at::Tensor prefill_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}

#endif

TORCH_LIBRARY_FRAGMENT(hyla_cpu, m) {
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_seqlens_q, "
        "Tensor context_lens, float scale, int block_size) -> Tensor",
        &prefill_attention);
}
