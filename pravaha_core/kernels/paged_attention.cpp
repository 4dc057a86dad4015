// Decode attention straight from the paged KV cache, for CPUs: no gather, no padding.
// One task per sequence; it reads each token's keys and values once, through the block table.
// head_dim 64 and 128 are compiled as constants, and for head_dim 64 with GQA groups of 1 to 4
// each KV head is done in one pass with its query heads in registers; softmax uses a
// vectorizable exp. Threads take sequences one at a time (lengths differ). Where the compiler
// targets AVX-512, head_dim 64 takes keys in tiles of 16 (attend_group64); on AVX2 hosts in
// tiles of 8.
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

using pravaha::exp_nonpositive;

// row[i] = exp(row[i] - max) in place (max: the row's maximum); returns 1 / the sum.
inline float exp_in_place(float* row, int64_t n, float max) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    row[i] = exp_nonpositive(row[i] - max);
    sum += row[i];
  }
  return 1.f / sum;
}

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Dot product with 16 independent lanes (vectorizes without reassociating sums).
template <int D, typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  const int64_t len = D > 0 ? D : d;
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += q[i + j] * to_float(k[i + j]);
  float s = 0;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < len; ++i) s += q[i] * to_float(k[i]);
  return s;
}

// One sequence, one KV head and its G query heads: the G queries and G output rows live in
// registers while the head's keys, then values, stream past once.
template <int D, int G, typename T>
void attend_group(const float* qg, const T* kp, const T* vp, const int64_t* offs, int64_t n, float scale,
                  float* sc, float* out) {
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t pos = 0; pos < n; ++pos) {
    const T* key = kp + offs[pos];
    for (int g = 0; g < G; ++g) {
      const float s = dot<D>(qg + g * D, key, D) * scale;
      sc[g * n + pos] = s;
      mx[g] = std::max(mx[g], s);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = exp_in_place(sc + g * n, n, mx[g]);
  float a[G][D];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < D; ++i) a[g][i] = 0.f;
  for (int64_t pos = 0; pos < n; ++pos) {
    const T* v = vp + offs[pos];
    for (int g = 0; g < G; ++g) {
      const float p = sc[g * n + pos];
#pragma omp simd
      for (int i = 0; i < D; ++i) a[g][i] += p * to_float(v[i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < D; ++i) out[g * D + i] = a[g][i] * inv[g];
}

#ifndef AHEAD
#define AHEAD 16
#endif
constexpr int64_t kAhead = AHEAD;   // positions

template <typename T>
inline void prefetch_row(const T* row, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + l, _MM_HINT_T0);
}

#if defined(__AVX512F__)
// AVX-512 version of attend_group for head_dim 64: keys go in tiles of 16 positions; each
// query head's 16 partial-sum vectors are reduced to 16 scores by one transpose-and-add tree
// (about 3 instructions per score instead of a full horizontal sum each), and the softmax max
// is kept as a vector. Values: G x 4 accumulators stay in registers.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// r[j] (j < 16) -> one vector whose lane j is the sum of r[j]'s 16 lanes.
inline __m512 reduce16(__m512* r) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

template <int G, typename T>
void attend_group64(const float* qg, const T* kp, const T* vp, const int64_t* offs, int64_t n, float scale,
                    float* sc, float* out) {
  constexpr int D = 64;
  __m512 q[G][4], mx[G];
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < 4; ++c) q[g][c] = _mm512_mul_ps(_mm512_loadu_ps(qg + g * D + 16 * c), _mm512_set1_ps(scale));
    mx[g] = _mm512_set1_ps(-INFINITY);
  }
  const T* rows[16];
  for (int64_t pos0 = 0; pos0 < n; pos0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n - pos0));
    for (int j = 0; j < 16; ++j) rows[j] = kp + offs[pos0 + std::min(j, cnt - 1)];
    const __mmask16 live = cnt == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cnt) - 1);
    // Keys a tile ahead; past the last key, the first values.
    for (int64_t pos = pos0 + kAhead; pos < std::min(2 * n, pos0 + kAhead + 16); ++pos)
      prefetch_row(pos < n ? kp + offs[pos] : vp + offs[pos - n], D * sizeof(T));
    for (int g = 0; g < G; ++g) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        __m512 acc = _mm512_mul_ps(q[g][0], load16(rows[j]));
        for (int c = 1; c < 4; ++c) acc = _mm512_fmadd_ps(q[g][c], load16(rows[j] + 16 * c), acc);
        r[j] = acc;
      }
      const __m512 s = reduce16(r);
      _mm512_mask_storeu_ps(sc + g * n + pos0, live, s);
      mx[g] = _mm512_mask_max_ps(mx[g], live, mx[g], s);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) inv[g] = exp_in_place(sc + g * n, n, _mm512_reduce_max_ps(mx[g]));
  __m512 a[G][4];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t pos = 0; pos < n; ++pos) {
    const T* v = vp + offs[pos];
    if (pos + kAhead < n) prefetch_row(vp + offs[pos + kAhead], D * sizeof(T));
    const __m512 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(sc[g * n + pos]);
      a[g][0] = _mm512_fmadd_ps(p, v0, a[g][0]);
      a[g][1] = _mm512_fmadd_ps(p, v1, a[g][1]);
      a[g][2] = _mm512_fmadd_ps(p, v2, a[g][2]);
      a[g][3] = _mm512_fmadd_ps(p, v3, a[g][3]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(a[g][c], _mm512_set1_ps(inv[g])));
}
template <typename T>
constexpr bool kLoads16 = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
#define PRAVAHA_GROUP_KERNEL(G) ([] { if constexpr (D == 64 && kLoads16<T>) return attend_group64<G, T>; \
                                      else return attend_group<D, G, T>; }())
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// AVX2 version for head_dim 64: keys in tiles of 8 positions, each query head's 8 partial-sum
// vectors reduced to 8 scores by one hadd tree (the scalar path spends a full horizontal sum
// per score). The query comes from L1 as a memory operand: 8 query vectors do not fit next to
// 8 accumulators in 16 registers. Values go in two passes of 32 dims (distinct cache lines,
// so no extra memory traffic), G x 4 accumulators in registers. Keys and values two tiles
// ahead are prefetched: blocks sit anywhere in the cache, beyond the hardware prefetcher's
// reach (64 sequences, 30 layers, contexts of 132 / 300 on a 2-core AMD EPYC: 66 -> 43 ms and
// 147 -> 106 ms against the scalar path; without the prefetch 47 and 119).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// r[j] (j < 8) -> one vector whose lane j is the sum of r[j]'s 8 lanes.
inline __m256 reduce8(const __m256* r) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <int G, typename T>
void attend_group64(const float* qg, const T* kp, const T* vp, const int64_t* offs, int64_t n, float scale,
                    float* sc, float* out) {
  constexpr int D = 64;
  alignas(32) float q[G][D];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < D; ++i) q[g][i] = qg[g * D + i] * scale;
  __m256 mx[G];
  for (int g = 0; g < G; ++g) mx[g] = _mm256_set1_ps(-INFINITY);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const T* rows[8];
  for (int64_t pos0 = 0; pos0 < n; pos0 += 8) {
    const int cnt = static_cast<int>(std::min<int64_t>(8, n - pos0));
    for (int j = 0; j < 8; ++j) rows[j] = kp + offs[pos0 + std::min(j, cnt - 1)];   // a partial tile repeats its last key: same max
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), lanes);
    for (int64_t pos = pos0 + kAhead; pos < std::min(n, pos0 + kAhead + 8); ++pos) prefetch_row(kp + offs[pos], D * sizeof(T));
    for (int g = 0; g < G; ++g) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        __m256 acc = _mm256_mul_ps(_mm256_load_ps(q[g]), load8(rows[j]));
#pragma GCC unroll 8
        for (int c = 1; c < 8; ++c) acc = _mm256_fmadd_ps(_mm256_load_ps(q[g] + 8 * c), load8(rows[j] + 8 * c), acc);
        r[j] = acc;
      }
      const __m256 s = reduce8(r);
      _mm256_maskstore_ps(sc + g * n + pos0, live, s);
      mx[g] = _mm256_max_ps(mx[g], s);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    alignas(32) float lane_max[8];
    _mm256_store_ps(lane_max, mx[g]);
    inv[g] = exp_in_place(sc + g * n, n, *std::max_element(lane_max, lane_max + 8));
  }
  for (int half = 0; half < 2; ++half) {
    __m256 a[G][4];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = _mm256_setzero_ps();
    for (int64_t pos = 0; pos < n; ++pos) {
      const T* v = vp + offs[pos] + 32 * half;
      if (pos + kAhead < n) prefetch_row(vp + offs[pos + kAhead] + 32 * half, 32 * sizeof(T));
      const __m256 v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m256 pg = _mm256_broadcast_ss(sc + g * n + pos);
        a[g][0] = _mm256_fmadd_ps(pg, v0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(pg, v1, a[g][1]);
        a[g][2] = _mm256_fmadd_ps(pg, v2, a[g][2]);
        a[g][3] = _mm256_fmadd_ps(pg, v3, a[g][3]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c)
        _mm256_storeu_ps(out + g * D + 32 * half + 8 * c, _mm256_mul_ps(a[g][c], _mm256_set1_ps(inv[g])));
  }
}
template <typename T>
constexpr bool kLoads8 = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
#define PRAVAHA_GROUP_KERNEL(G) ([] { if constexpr (D == 64 && kLoads8<T>) return attend_group64<G, T>; \
                                      else return attend_group<D, G, T>; }())
#else
#define PRAVAHA_GROUP_KERNEL(G) attend_group<D, G, T>
#endif

template <int D, typename T>
bool attend_grouped(const float* qb, const T* kp, const T* vp, const int64_t* offs, int64_t n, int64_t num_heads,
                    int64_t num_kv_heads, float scale, std::vector<float>& scores, float* out) {
  const int64_t group = num_heads / num_kv_heads;
  scores.resize(group * n);
  for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
    const float* qg = qb + kvh * group * D;
    float* og = out + kvh * group * D;
    const T* k0 = kp + kvh * D;
    const T* v0 = vp + kvh * D;
    switch (group) {
      case 1: PRAVAHA_GROUP_KERNEL(1)(qg, k0, v0, offs, n, scale, scores.data(), og); break;
      case 2: PRAVAHA_GROUP_KERNEL(2)(qg, k0, v0, offs, n, scale, scores.data(), og); break;
      case 3: PRAVAHA_GROUP_KERNEL(3)(qg, k0, v0, offs, n, scale, scores.data(), og); break;
      case 4: PRAVAHA_GROUP_KERNEL(4)(qg, k0, v0, offs, n, scale, scores.data(), og); break;
      default: return false;
    }
  }
  return true;
}

// One sequence, all heads: each token's K (then V) slot, every KV head, is read once, in order.
// D > 0: head_dim known at compile time (loops fully unrolled).
template <int D, typename T>
void attend_one(const float* qb, const T* kp, const T* vp, const int64_t* offs, int64_t n, int64_t num_heads,
                int64_t num_kv_heads, int64_t d, float scale, std::vector<float>& scores, std::vector<float>& acc,
                float* out) {
  const int64_t head_dim = D > 0 ? D : d;
  const int64_t group = num_heads / num_kv_heads;
  scores.resize(num_heads * n);
  acc.assign(num_heads * head_dim, 0.f);
  for (int64_t pos = 0; pos < n; ++pos) {
    const T* key = kp + offs[pos];
    for (int64_t h = 0; h < num_heads; ++h)
      scores[h * n + pos] = dot<D>(qb + h * head_dim, key + (h / group) * head_dim, head_dim) * scale;
  }
  std::vector<float> inv(num_heads);
  for (int64_t h = 0; h < num_heads; ++h) {
    float* sc = scores.data() + h * n;
    inv[h] = exp_in_place(sc, n, *std::max_element(sc, sc + n));
  }
  for (int64_t pos = 0; pos < n; ++pos) {
    const T* value = vp + offs[pos];
    for (int64_t h = 0; h < num_heads; ++h) {
      const float p = scores[h * n + pos];
      const T* v = value + (h / group) * head_dim;
      float* a = acc.data() + h * head_dim;
#pragma omp simd
      for (int64_t i = 0; i < head_dim; ++i) a[i] += p * to_float(v[i]);
    }
  }
  for (int64_t h = 0; h < num_heads; ++h)
    for (int64_t i = 0; i < head_dim; ++i) out[h * head_dim + i] = acc[h * head_dim + i] * inv[h];
}

template <typename T>
void decode_kernel(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
                   int64_t window, torch::Tensor& out) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2), q_row = q.stride(0);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2), max_blocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // Sequences differ in length, so threads take them one at a time (dynamic), not in halves.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores, acc;
    std::vector<int64_t> offs;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t ctx = lp[b], first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const float* qb = qp + b * q_row;
      float* ob = op + b * num_heads * head_dim;
      // Each position's slot (element offset of its K/V row), looked up once for every head.
      const int64_t* table = tp + b * max_blocks;
      const int64_t n = ctx - first, slot = num_kv_heads * head_dim;
      offs.resize(n);
      for (int64_t pos = first; pos < ctx; ++pos)
        offs[pos - first] = (table[pos / block_size] * block_size + pos % block_size) * slot;
      const float s = static_cast<float>(scale);
      if (head_dim == 64 && attend_grouped<64>(qb, kp, vp, offs.data(), n, num_heads, num_kv_heads, s, scores, ob))
        continue;
      if (head_dim == 64)
        attend_one<64>(qb, kp, vp, offs.data(), n, num_heads, num_kv_heads, 64, s, scores, acc, ob);
      else if (head_dim == 128)
        attend_one<128>(qb, kp, vp, offs.data(), n, num_heads, num_kv_heads, 128, s, scores, acc, ob);
      else
        attend_one<0>(qb, kp, vp, offs.data(), n, num_heads, num_kv_heads, head_dim, s, scores, acc, ob);
    }
  }
}

}  // namespace

namespace {

// q [B, H, D] with rows of any stride (e.g. a view of the fused qkv output), heads contiguous.
torch::Tensor rows_with_contiguous_heads(const torch::Tensor& x) {
  return x.stride(2) == 1 && x.stride(1) == x.size(2) ? x : x.contiguous();
}

torch::Tensor attend_cache(torch::Tensor q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
                           int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.scalar_type() == torch::kFloat32);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous());
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong &&
              block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "paged attention: int64 block_tables [B, M] and context_lens [B]");
  q = rows_with_contiguous_heads(q);
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, k_cache.scalar_type(),
                                  "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, block_tables, context_lens.contiguous(), scale, window, out);
  });
  return out;
}

}  // namespace

// q: [B, H, D] float32; caches: [num_blocks, block_size, KVH, D]; block_tables: [B, M] int64;
// context_lens: [B] int64 (the query is the last position). Returns [B, H, D] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window) {
  return attend_cache(q, k_cache, v_cache, block_tables, context_lens, scale, window);
}

// One layer's attention step in one call: write the step's float32 k, v [T, KVH, D] into their
// slots (slot_mapping [T]) of a float32, bfloat16 or float16 cache (rounded to nearest even, as
// Tensor.to does), then every row of q attends over its context. Rows of q, k and v may be
// strided views of the fused qkv output (no copies).
torch::Tensor paged_attention_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                                   torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_tables,
                                   torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
              k_cache.scalar_type() == v_cache.scalar_type(), "paged_attention_step: float32 k and v, one cache dtype");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) &&
              k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_attention_step: k, v [T, KVH, D] matching the caches");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.numel() == k.size(0),
              "paged_attention_step: int64 slot_mapping [T]");
  k = rows_with_contiguous_heads(k);
  v = rows_with_contiguous_heads(v);
  const auto slots = slot_mapping.contiguous();
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)     // all checked before anything is written
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "paged_attention_step: slot ", sp[t], " out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, k_cache.scalar_type(),
                                  "paged_attention_step", [&] {
    scalar_t *kc = k_cache.data_ptr<scalar_t>(), *vc = v_cache.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const float *ks = kp + t * k.stride(0), *vs = vp + t * v.stride(0);
      scalar_t *kd = kc + sp[t] * row, *vd = vc + sp[t] * row;
      for (int64_t i = 0; i < row; ++i) {
        kd[i] = static_cast<scalar_t>(ks[i]);
        vd[i] = static_cast<scalar_t>(vs[i]);
      }
    }
  });
  return attend_cache(q, k_cache, v_cache, block_tables, context_lens, scale, window);
}

// fused.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rotary_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
             int64_t num_rotated_heads, int64_t head_dim);

#if defined(__AVX2__) && defined(__FMA__)
// gemm.cpp
torch::Tensor pack_panels(torch::Tensor w, bool glu);
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias, int64_t N, bool glu);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)");
  m.def("paged_attention_step", &paged_attention_step,
        "write a step's K/V into a paged cache, then attend every row over its context (CPU)");
#if defined(__AVX512F__)
  m.attr("avx512") = true;     // head_dim 64 with GQA groups 1-4 takes the 16-key tile path
  m.attr("tile64") = true;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  m.attr("avx512") = false;
  m.attr("tile64") = true;     // the 8-key AVX2 tile path
#else
  m.attr("avx512") = false;
  m.attr("tile64") = false;
#endif
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (float32)");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x in place, then RMSNorm of residual (float32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] gate/up output (float32)");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding of q and k, in place in the fused qkv (float32)");
#if defined(__AVX2__) && defined(__FMA__)
  m.attr("panel_gemm") = true;
  m.def("pack_panels", &pack_panels,
        "a float32 [N, K] weight as [ceil(N/P), K, P] column panels (P: 32 on AVX-512, else 16); glu: a fused "
        "gate/up weight with gate and up columns paired in each panel", py::arg("w"), py::arg("glu") = false);
  m.def("panel_linear", &panel_linear,
        "x @ w.T + bias over packed panels (float32, AVX2 or AVX-512); glu: silu(gate) * up of it",
        py::arg("x"), py::arg("panels"), py::arg("bias"), py::arg("N"), py::arg("glu") = false);
#else
  m.attr("panel_gemm") = false;
#endif
}
