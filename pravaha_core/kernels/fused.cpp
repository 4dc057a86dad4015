// Fused float32 element-wise steps of a Llama layer, each one pass over memory instead of the
// five to eight torch ops (and temporaries) it replaces: RMSNorm, SiLU(gate) * up, and rotary
// embedding applied in place to the fused qkv output. Rows run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "vec_math.h"

namespace {

int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

}  // namespace

namespace {

// out[t] = weight * (r / sqrt(mean(r^2) + eps)) for each row r of x; with `residual`, first
// residual[t] += x[t] in place and r is that sum (a residual add and the next norm in one pass).
torch::Tensor norm_rows(torch::Tensor x, torch::Tensor* residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32,
              "rms_norm: float32 [T, H]");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.numel() == H, "rms_norm: weight size");
  float* rp = nullptr;
  if (residual != nullptr) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                residual->scalar_type() == torch::kFloat32, "add_rms_norm_: residual must be a contiguous float32 [T, H]");
    rp = residual->data_ptr<float>();
  }
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * H;
      if (rp != nullptr) {
        float* r = rp + t * H;
        for (int64_t h = 0; h < H; ++h) r[h] += row[h];
        row = r;
      }
      float lanes[16] = {0};
      int64_t i = 0;
      for (; i + 16 <= H; i += 16)
        for (int j = 0; j < 16; ++j) lanes[j] += row[i + j] * row[i + j];
      float ss = 0;
      for (int j = 0; j < 16; ++j) ss += lanes[j];
      for (; i < H; ++i) ss += row[i] * row[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      float* o = op + t * H;
      for (int64_t h = 0; h < H; ++h) o[h] = wp[h] * (row[h] * inv);
    }
  });
  return out;
}

}  // namespace

// x: [T, H]; weight: [H]. weight * (x / sqrt(mean(x^2) + eps)), like HF's LlamaRMSNorm in float32.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) { return norm_rows(x, nullptr, weight, eps); }

// residual += x (in place), then rms_norm(residual): the residual add that ends one sublayer and
// the norm that starts the next.
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  return norm_rows(x, &residual, weight, eps);
}

// gate_up: [T, 2I] (gate, then up) -> [T, I] = silu(gate) * up.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.scalar_type() == torch::kFloat32,
              "silu_mul: float32 [T, 2I]");
  gate_up = gate_up.contiguous();
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      float* o = op + t * I;
      for (int64_t i = 0; i < I; ++i) o[i] = pravaha::silu(g[i]) * u[i];
    }
  });
  return out;
}

// qkv: [T, (H + 2 KVH) * D], contiguous; the first (H + KVH) heads (q, then k) are rotated in
// place with the rotate-half layout: for i < D/2, (a, b) = (x[i], x[i + D/2]) becomes
// (a cos[i] - b sin[i], b cos[i + D/2] + a sin[i + D/2]). cos/sin: [max_len, D]; positions: [T].
void rotary_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
             int64_t num_rotated_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat32, "rotary_: qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32 &&
              cos.size(1) == head_dim && head_dim % 2 == 0, "rotary_: tables");
  TORCH_CHECK(qkv.size(1) >= num_rotated_heads * head_dim, "rotary_: heads");
  positions = positions.to(torch::kLong).contiguous();
  const int64_t T = qkv.size(0), S = qkv.size(1), half = head_dim / 2, max_len = cos.size(0);
  float* xp = qkv.data_ptr<float>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pp[t] >= 0 && pp[t] < max_len, "rotary_: position out of range");
  at::parallel_for(0, T, grain(num_rotated_heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pp[t] * head_dim;
      const float* s = sp + pp[t] * head_dim;
      for (int64_t h = 0; h < num_rotated_heads; ++h) {
        float* x = xp + t * S + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] - b * s[i];
          x[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}
