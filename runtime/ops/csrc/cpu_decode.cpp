// CPU kernels for the small ops of a decode step: paged decode attention, RMSNorm (with the
// residual add before it), rotary embedding, the KV-cache store and SiLU-and-mul.
//
// Each replaces a chain of PyTorch ops whose per-op overhead, not arithmetic, bounds a decode step
// of a small model on a few cores. They compute in fp32 and round to the tensor dtype exactly where
// the PyTorch layers round (bf16 intermediates included), so only summation order differs from them.
// Loops over the head dimension are written for the compiler to vectorise (-O3 -march=native).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace hyla_cpu;

// ---- paged decode attention ----

constexpr int64_t kPartition = 256;  // context tokens per work item; items are combined afterwards

// Scores of G query heads (already scaled, fp32 [G, D]) against one key row.
template <typename T>
inline void score_row(const float* qf, const T* key, int64_t D, int64_t G, float* out) {
  float row[512];
  for (int64_t d = 0; d < D; ++d) row[d] = load(key, d);
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * row[d];
    out[g] = s;
  }
}

// acc[g] += p[g] * value for G heads.
template <typename T>
inline void accumulate_row(float* acc, const float* p, const T* value, int64_t D, int64_t G) {
  for (int64_t g = 0; g < G; ++g) {
    float* ag = acc + g * D;
    const float pg = p[g];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ag[d] += pg * load(value, d);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HYLA_BF16_DOT 1

// bf16 heads whose width is a multiple of 32: bf16 pair products summed in fp32 (vdpbf16ps), the
// scale applied after, as a bf16 attention product does.
inline void score_row_bf16(const __m512bh* qv, const bf16_bits* key, int64_t chunks, int64_t G, float* out, float scale) {
  __m512bh kv[8];
  for (int64_t c = 0; c < chunks; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(key + 32 * c);
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) acc = _mm512_dpbf16_ps(acc, qv[g * chunks + c], kv[c]);
    out[g] = _mm512_reduce_add_ps(acc) * scale;
  }
}

inline void accumulate_row_bf16(float* acc, const float* p, const bf16_bits* value, int64_t D, int64_t G) {
  for (int64_t c = 0; c < D; c += 16) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(value + c)));
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    for (int64_t g = 0; g < G; ++g) {
      float* a = acc + g * D + c;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[g]), v, _mm512_loadu_ps(a)));
    }
  }
}
#endif

// Scratch of one thread's work items, sized once per parallel chunk.
struct Scratch {
  std::vector<float> qf, scores, out, row;
#ifdef HYLA_BF16_DOT
  std::vector<__m512bh> qv;
#endif
  Scratch(int64_t Hq, int64_t D) : qf(Hq * D), scores(Hq * kPartition), out(Hq * D), row(Hq) {
#ifdef HYLA_BF16_DOT
    qv.resize(Hq * (D / 32 + 1));
#endif
  }
};

// Blocks of a sequence lie anywhere in the pool, and the hardware prefetcher stops at page edges:
// each token's row of all KV heads is prefetched one block ahead.
template <typename T>
inline void prefetch_ahead(const T* pool, const int32_t* table, int64_t block_size, int64_t t, int64_t t1, int64_t row) {
  const int64_t ahead = t + block_size;
  if (ahead >= t1) return;
  const char* p = reinterpret_cast<const char*>(
      pool + (static_cast<int64_t>(table[ahead / block_size]) * block_size + ahead % block_size) * row);
  for (int64_t b = 0; b < row * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

// One work item: every head of sequence n over context tokens [t0, t1), so each token's K/V row of
// all KV heads (contiguous in the pool) is read once, whole. Writes per query head the unnormalised
// output, the running max m and the sum of exponentials l: [Hq, D + 2].
template <typename T>
void attend_part(const T* q, int64_t q_h, const T* kp, const T* vp, const int32_t* table, int64_t block_size,
                 int64_t Hkv, int64_t D, int64_t G, int64_t t0, int64_t t1, float scale, Scratch& w, float* part) {
  const int64_t len = t1 - t0, Hq = Hkv * G;
  float* qf = w.qf.data();
  float* scores = w.scores.data();
  float* row = w.row.data();
#ifdef HYLA_BF16_DOT
  const bool fast = std::is_same<T, bf16_bits>::value && D % 32 == 0 && D <= 256;
  __m512bh* qv = w.qv.data();
  if (fast)
    for (int64_t hq = 0; hq < Hq; ++hq)
      for (int64_t c = 0; c < D / 32; ++c)
        qv[hq * (D / 32) + c] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const bf16_bits*>(q + hq * q_h) + 32 * c);
#endif
  for (int64_t hq = 0; hq < Hq; ++hq)
    for (int64_t d = 0; d < D; ++d) qf[hq * D + d] = load(q, hq * q_h + d) * scale;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    prefetch_ahead(kp, table, block_size, t, t1, Hkv * D);
    for (int64_t h = 0; h < Hkv; ++h) {
      const T* key = kp + (slot * Hkv + h) * D;
#ifdef HYLA_BF16_DOT
      if (fast)
        score_row_bf16(qv + h * G * (D / 32), reinterpret_cast<const bf16_bits*>(key), D / 32, G, row + h * G, scale);
      else
#endif
        score_row(qf + h * G * D, key, D, G, row + h * G);
    }
    for (int64_t hq = 0; hq < Hq; ++hq) scores[hq * kPartition + (t - t0)] = row[hq];
  }
  for (int64_t hq = 0; hq < Hq; ++hq) {
    float* sg = scores + hq * kPartition;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) mx = sg[i] > mx ? sg[i] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      sg[i] = exp_nonpositive(sg[i] - mx);
      sum += sg[i];
    }
    part[hq * (D + 2) + D] = mx;
    part[hq * (D + 2) + D + 1] = sum;
  }
  float* out = w.out.data();
  std::fill(out, out + Hq * D, 0.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    prefetch_ahead(vp, table, block_size, t, t1, Hkv * D);
    for (int64_t hq = 0; hq < Hq; ++hq) row[hq] = scores[hq * kPartition + (t - t0)];
    for (int64_t h = 0; h < Hkv; ++h) {
      const T* value = vp + (slot * Hkv + h) * D;
#ifdef HYLA_BF16_DOT
      if (fast) {
        accumulate_row_bf16(out + h * G * D, row + h * G, reinterpret_cast<const bf16_bits*>(value), D, G);
        continue;
      }
#endif
      accumulate_row(out + h * G * D, row + h * G, value, D, G);
    }
  }
  for (int64_t hq = 0; hq < Hq; ++hq) std::copy(out + hq * D, out + (hq + 1) * D, part + hq * (D + 2));
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                           int64_t block_size, at::Tensor& out) {
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1), G = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1), bt_n = block_tables.stride(0);
  const T* qp = ptr<T>(q);
  const T* kp = ptr<T>(k_cache);
  const T* vp = ptr<T>(v_cache);
  T* op = ptr<T>(out);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const float fscale = static_cast<float>(scale);
  // work items: (sequence, partition of its context)
  std::vector<int64_t> item_seq, item_part;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = std::min<int64_t>(lens[n], max_blocks * block_size);
    for (int64_t p = 0; p * kPartition < len; ++p) {
      item_seq.push_back(n);
      item_part.push_back(p);
    }
  }
  const int64_t items = static_cast<int64_t>(item_seq.size()), width = Hq * (D + 2);
  std::vector<float> parts(items * width);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch w(Hq, D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = item_seq[i], len = std::min<int64_t>(lens[n], max_blocks * block_size);
      const int64_t t0 = item_part[i] * kPartition, t1 = std::min(len, t0 + kPartition);
      attend_part<T>(qp + n * q.stride(0), q.stride(1), kp, vp, tables + n * bt_n, block_size, Hkv, D, G, t0, t1,
                     fscale, w, parts.data() + i * width);
    }
  });
  // combine the partitions of each sequence (log-sum-exp), in sequence order
  std::vector<float> res(D);
  int64_t first = 0;
  for (int64_t n = 0; n < N; ++n) {
    int64_t count = 0;
    while (first + count < items && item_seq[first + count] == n) ++count;
    for (int64_t hq = 0; hq < Hq; ++hq) {
      T* o = op + n * out.stride(0) + hq * out.stride(1);
      float mx = -INFINITY, total = 0.0f;
      for (int64_t c = 0; c < count; ++c) mx = std::max(mx, parts[(first + c) * width + hq * (D + 2) + D]);
      std::fill(res.begin(), res.end(), 0.0f);
      for (int64_t c = 0; c < count; ++c) {
        const float* pc = parts.data() + (first + c) * width + hq * (D + 2);
        const float f = exp_nonpositive(pc[D] - mx);
        total += f * pc[D + 1];
        for (int64_t d = 0; d < D; ++d) res[d] += f * pc[d];
      }
      const float inv = count ? 1.0f / total : 0.0f;  // an empty context gives zeros
      for (int64_t d = 0; d < D; ++d) store(o, d, res[d] * inv);
    }
    first += count;
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t block_size) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "q [N, Hq, D], pools [slots, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && q.stride(2) == 1, "contiguous pools and head rows");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the pools must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0, "head shapes do not match");
  TORCH_CHECK(q.size(2) <= 512, "head width <= 512");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, "int32 tables and lengths");
  at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kBFloat16)
    decode_attention_impl<bf16_bits>(q, k_cache, v_cache, tables, lens, scale, block_size, out);
  else if (q.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q, k_cache, v_cache, tables, lens, scale, block_size, out);
  else
    TORCH_CHECK(false, "decode_attention: bfloat16 or float32 only");
  return out;
}

// ---- RMSNorm, optionally after the residual add ----

// y = w * dtype(x * rsqrt(mean(x^2) + eps)) over rows of width H; with `a`, x is first rounded(x + a)
// and also written to `h`.
template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor* a, const at::Tensor& w, double eps, at::Tensor* h, at::Tensor& y) {
  const int64_t H = x.size(-1), rows = x.numel() / H;
  const T* xp = ptr<T>(x);
  const T* ap = a ? ptr<T>(*a) : nullptr;
  const T* wp = ptr<T>(w);
  T* hp = h ? ptr<T>(*h) : nullptr;
  T* yp = ptr<T>(y);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(H);
    float* __restrict buf = storage.data();
    T* nil = nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict xr = xp + r * H;
      float ss = 0.0f;
      if (ap) {  // two loops: a load under a condition would vectorise as a gather
        const T* __restrict ar = ap + r * H;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; ++i) {
          buf[i] = round_to(load(xr, i) + load(ar, i), nil);
          ss += buf[i] * buf[i];
        }
      } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; ++i) {
          buf[i] = load(xr, i);
          ss += buf[i] * buf[i];
        }
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + feps);
      if (hp) {
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) store(hp, r * H + i, buf[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) store(yp, r * H + i, load(wp, i) * round_to(buf[i] * inv, nil));
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 1 && w.size(0) == x.size(-1), "contiguous x [..., H], w [H]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and the weight must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "bfloat16 or float32 only");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm(x, w);
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    norm_rows<bf16_bits>(x, nullptr, w, eps, nullptr, y);
  else
    norm_rows<float>(x, nullptr, w, eps, nullptr, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& w, double eps) {
  check_norm(x, w);
  TORCH_CHECK(a.is_contiguous() && a.sizes() == x.sizes() && a.scalar_type() == x.scalar_type(), "x and a must match");
  at::Tensor h = at::empty_like(x), y = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    norm_rows<bf16_bits>(x, &a, w, eps, &h, y);
  else
    norm_rows<float>(x, &a, w, eps, &h, y);
  return {h, y};
}

// ---- rotary embedding (rotate-half layout), in place ----

template <typename T>
void rotate_heads(at::Tensor& x, const T* cp, const T* sp, int64_t cs_t) {
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const int64_t x_t = x.stride(0), x_h = x.stride(1);
  T* xp = ptr<T>(x);
  T* nil = nullptr;
  at::parallel_for(0, T_ * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / H, hh = item % H;
      T* row = xp + t * x_t + hh * x_h;
      const T* c = cp + t * cs_t;
      const T* s = sp + t * cs_t;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {  // x * cos + rotate_half(x) * sin, each product rounded
        const float a = load(row, i), b = load(row, i + half);
        const float lo = round_to(a * load(c, i), nil) + round_to(-b * load(s, i), nil);
        const float hi = round_to(b * load(c, i + half), nil) + round_to(a * load(s, i + half), nil);
        store(row, i, lo);
        store(row, i + half, hi);
      }
    }
  });
}

void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "q, k [T, H, D] with unit stride over D");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) && cos.size(1) == q.size(2), "cos, sin [T, D]");
  TORCH_CHECK(q.size(2) % 2 == 0 && k.size(2) == q.size(2) && k.size(0) == q.size(0), "q and k shapes do not match");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(), "one dtype");
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  if (q.scalar_type() == at::kBFloat16) {
    rotate_heads<bf16_bits>(q, ptr<bf16_bits>(c), ptr<bf16_bits>(s), c.stride(0));
    rotate_heads<bf16_bits>(k, ptr<bf16_bits>(c), ptr<bf16_bits>(s), c.stride(0));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "bfloat16 or float32 only");
    rotate_heads<float>(q, ptr<float>(c), ptr<float>(s), c.stride(0));
    rotate_heads<float>(k, ptr<float>(c), ptr<float>(s), c.stride(0));
  }
}

// ---- KV-cache store ----

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1, "k, v [T, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3, "contiguous pools [slots, Hkv, D]");
  TORCH_CHECK(k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(2), "head shapes do not match");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(), "cache dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), "int64 slot per token");
  const int64_t T_ = k.size(0), H = k.size(1), D = k.size(2), num_slots = k_cache.size(0);
  const int64_t bytes = D * k.element_size();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::Tensor sl = slots.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
  const int64_t es = k.element_size();
  at::parallel_for(0, T_, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = (sp[t] * H + h) * bytes;
        std::memcpy(kc + dst, kp + (t * k.stride(0) + h * k.stride(1)) * es, bytes);
        std::memcpy(vc + dst, vp + (t * v.stride(0) + h * v.stride(1)) * es, bytes);
      }
  });
}

// ---- SiLU(gate) * up ----

template <typename T>
void silu_mul_impl(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const int64_t rows = gate.size(0), M = gate.size(1), g_r = gate.stride(0), u_r = up.stride(0);
  const T* gp = ptr<T>(gate);
  const T* upp = ptr<T>(up);
  T* op = ptr<T>(out);
  T* nil = nullptr;
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < M; ++i) {
        const float g = load(gp, r * g_r + i);
        store(op, r * M + i, round_to(silu(g), nil) * load(upp, r * u_r + i));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && gate.stride(1) == 1 && up.stride(1) == 1, "gate, up [rows, M]");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "one dtype");
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  if (gate.scalar_type() == at::kBFloat16)
    silu_mul_impl<bf16_bits>(gate, up, out);
  else if (gate.scalar_type() == at::kFloat)
    silu_mul_impl<float>(gate, up, out);
  else
    TORCH_CHECK(false, "silu_mul: bfloat16 or float32 only");
  return out;
}

}  // namespace

TORCH_LIBRARY(hyla_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale, int block_size) -> Tensor",
        &decode_attention);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor a, Tensor w, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()", &rotary_);
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()", &store_kv);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", &silu_mul);
}
