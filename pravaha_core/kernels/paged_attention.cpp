// Decode attention straight from the paged KV cache, for CPUs: no gather, no padding.
// One task per sequence; it reads each token's keys and values once, through the block table.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// Dot product over head_dim with 8 independent lanes, so the compiler vectorizes it
// without reassociating floating-point sums.
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += q[i + j] * to_float(k[i + j]);
  float s = 0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < d; ++i) s += q[i] * to_float(k[i]);
  return s;
}

template <typename T>
void decode_kernel(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale,
                   int64_t window, torch::Tensor& out) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t slot = num_kv_heads * head_dim;  // elements of one token's K (or V), all KV heads

  // One task per sequence: each token's K and V slot (every KV head) is read once, in order.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;                        // [num_heads, n]
    std::vector<float> acc(num_heads * head_dim);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t ctx = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t n = ctx - first;
      scores.assign(num_heads * n, 0.f);
      const float* qb = qp + b * num_heads * head_dim;
      for (int64_t pos = first; pos < ctx; ++pos) {
        const T* key = kp + (tp[b * max_blocks + pos / block_size] * block_size + pos % block_size) * slot;
        for (int64_t h = 0; h < num_heads; ++h)
          scores[h * n + (pos - first)] =
              dot(qb + h * head_dim, key + (h / group) * head_dim, head_dim) * static_cast<float>(scale);
      }
      for (int64_t h = 0; h < num_heads; ++h) {  // softmax per head
        float* sc = scores.data() + h * n;
        const float mx = *std::max_element(sc, sc + n);
        float sum = 0;
        for (int64_t i = 0; i < n; ++i) { sc[i] = std::exp(sc[i] - mx); sum += sc[i]; }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) sc[i] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = first; pos < ctx; ++pos) {
        const T* value = vp + (tp[b * max_blocks + pos / block_size] * block_size + pos % block_size) * slot;
        for (int64_t h = 0; h < num_heads; ++h) {
          const float p = scores[h * n + (pos - first)];
          const T* v = value + (h / group) * head_dim;
          float* a = acc.data() + h * head_dim;
          for (int64_t i = 0; i < head_dim; ++i) a[i] += p * to_float(v[i]);
        }
      }
      std::copy(acc.begin(), acc.end(), op + b * num_heads * head_dim);
    }
  });
}

}  // namespace

// q: [B, H, D] float32; caches: [num_blocks, block_size, KVH, D]; block_tables: [B, M] int64;
// context_lens: [B] int64 (the query is the last position). Returns [B, H, D] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.scalar_type() == torch::kFloat32);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous());
  q = q.contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, k_cache.scalar_type(),
                                  "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, block_tables, context_lens, scale, window, out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)");
}
