// A float32 GEMM for linear layers, y = x @ w.T + bias, over weights packed once into column
// panels: w [N, K] -> panels [ceil(N/P), K, P], each panel the K x P slice of w.T that one
// micro-kernel streams front to back (rows past N are zero). P is 32 on AVX-512 hosts (a 12x32
// register tile: 24 zmm accumulators, two weight loads and twelve broadcasts per step of k) and
// 16 on AVX2 hosts (a 6x16 tile: 12 ymm accumulators, two loads, six broadcasts).
//
// Why our own: on 2-core hosts oneDNN's packed linear reads decode-sized weights well below the
// DRAM bandwidth (AVX2, a 1-row step over SmolLM2-135M's 30 layers: 49 ms for 425 MB; AVX-512:
// 27 ms, against 19 ms here), and MKL is slower still. Here each panel is read from memory once
// per chunk of rows and stays in L2 while every tile of x multiplies it. Rows are split evenly
// over the tiles, panels across threads. While one panel is multiplied, the next is prefetched a
// few lines per tile, so that streaming the weights overlaps the arithmetic instead of following
// it (AVX2: 10-17% at 16 to 2048 rows, except at one tile of rows, where the hardware prefetcher
// did better alone; AVX-512: a third faster at one tile of rows, 1-12).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <array>
#include <utility>

#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr int64_t kChunkBytes = 256 << 10;   // rows of x per pass over the panels: about half an L2

// A GLU panel's epilogue: out[j] = silu(gate[j]) * up[j], the same formula as silu_mul.
inline void glu_store(const float* gate, const float* up, float* out, int cols) {
  for (int j = 0; j < cols; ++j) out[j] = pravaha::silu(gate[j]) * up[j];
}

// One vector register of each ISA: the tile below is written once over these few operations.
#if defined(__AVX512F__)
struct Vec {                          // AVX-512: 16 floats; 12-row tiles (24 zmm accumulators)
  using T = __m512;
  static constexpr int W = 16, kRows = 12;
  static constexpr bool kSingleTilePrefetch = true;   // a third faster at one tile of rows
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static __mmask16 mask(int n) { return n >= W ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }
  static T load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_n(float* p, T v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static void store_aligned(float* p, T v) { _mm512_store_ps(p, v); }
};
#else
struct Vec {                          // AVX2: 8 floats; 6-row tiles (12 ymm accumulators)
  using T = __m256;
  static constexpr int W = 8, kRows = 6;
  static constexpr bool kSingleTilePrefetch = false;  // the hardware prefetcher did better alone
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static __m256i mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static T load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store_n(float* p, T v, int n) {
    if (n >= W) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, mask(n), v);
  }
  static void store_aligned(float* p, T v) { _mm256_store_ps(p, v); }
};
#endif

constexpr int64_t kPanel = 2 * Vec::W;
constexpr int kRows = Vec::kRows;
constexpr bool kSingleTilePrefetch = Vec::kSingleTilePrefetch;
constexpr int64_t kLinesPerStep = kPanel * 4 / 64;   // cache lines of a panel per step of k

// y[i, 0:nr] = x[i, :] . panel + bias for MR rows of x, two vectors of columns per row (with
// glu_cols > 0: silu(first vector) * second vector, glu_cols columns). GCC keeps the accumulator
// arrays in registers only when every loop over them is unrolled; called through a pointer, the
// tile is compiled on its own, which measured faster than inlined into the loops over panels.
// Meanwhile prefetch `pf_lines` cache lines from `pf`, one or two per step of k.
template <int MR>
void tile(const float* x, int64_t K, const float* panel, const float* bias, float* y, int64_t ldy, int nr,
          const char* pf, int64_t pf_lines, int glu_cols) {
  constexpr int W = Vec::W;
  typename Vec::T a0[MR], a1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) { a0[i] = Vec::zero(); a1[i] = Vec::zero(); }
  for (int64_t k = 0; k < K; ++k) {
    if (k < pf_lines) _mm_prefetch(pf + k * 64, _MM_HINT_T1);
    // A second line per step only where a panel is two lines wide per k (AVX-512): on AVX2 the
    // test alone, kept in the loop, cost a fifth of the speed (a general register spilled).
    if (kLinesPerStep > 1 && k + K < pf_lines) _mm_prefetch(pf + (k + K) * 64, _MM_HINT_T1);
    const auto w0 = Vec::load(panel + k * kPanel), w1 = Vec::load(panel + k * kPanel + W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const auto xv = Vec::bcast(x + i * K + k);
      a0[i] = Vec::fma(xv, w0, a0[i]);
      a1[i] = Vec::fma(xv, w1, a1[i]);
    }
  }
  if (bias != nullptr) {
    const auto b0 = Vec::load_n(bias, nr), b1 = Vec::load_n(bias + W, nr - W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) { a0[i] = Vec::add(a0[i], b0); a1[i] = Vec::add(a1[i], b1); }
  }
  if (glu_cols > 0) {            // a0: gate, a1: up -> silu(gate) * up
    alignas(64) float g[W], u[W];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      Vec::store_aligned(g, a0[i]);
      Vec::store_aligned(u, a1[i]);
      glu_store(g, u, y + i * ldy, glu_cols);
    }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    Vec::store_n(y + i * ldy, a0[i], nr);
    Vec::store_n(y + i * ldy + W, a1[i], nr - W);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int, const char*, int64_t, int);

template <size_t... I>
constexpr std::array<TileFn, sizeof...(I) + 1> tiles_up_to(std::index_sequence<I...>) {
  return {nullptr, tile<static_cast<int>(I) + 1>...};
}
constexpr auto kTiles = tiles_up_to(std::make_index_sequence<kRows>{});   // kTiles[rows]


}  // namespace

// glu: w is a fused gate/up weight [2I, K] (gate rows, then up rows); each panel holds P/2 gate
// columns, then the same P/2 up columns, so that its tile ends in silu(gate) * up.
torch::Tensor pack_panels(torch::Tensor w, bool glu) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "pack_panels: float32 [N, K]");
  if (glu) {
    TORCH_CHECK(w.size(0) % 2 == 0, "pack_panels: a GLU weight has an even number of rows (gate, then up)");
    const int64_t I = w.size(0) / 2, K = w.size(1), half = kPanel / 2, NP = (I + half - 1) / half;
    auto gate = torch::zeros({NP * half, K}, w.options()), up = torch::zeros({NP * half, K}, w.options());
    gate.narrow(0, 0, I).copy_(w.narrow(0, 0, I));
    up.narrow(0, 0, I).copy_(w.narrow(0, I, I));
    return torch::cat({gate.view({NP, half, K}), up.view({NP, half, K})}, 1).transpose(1, 2).contiguous();
  }
  const int64_t N = w.size(0), K = w.size(1), NP = (N + kPanel - 1) / kPanel;
  auto padded = torch::zeros({NP * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({NP, kPanel, K}).transpose(1, 2).contiguous();
}

// y = x @ w.T + bias: [M, N]; with glu (panels packed with glu, N = 2I), silu(gate) * up: [M, I].
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias, int64_t N,
                           bool glu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "panel_linear: x must be float32 [M, K]");
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.scalar_type() == torch::kFloat32 &&
              panels.size(2) == kPanel, "panel_linear: panels must come from pack_panels");
  const int64_t M = x.size(0), K = x.size(1), NP = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "panel_linear: x has ", K, " features, the weight ", panels.size(1));
  // Output columns per panel, and in all.
  const int64_t cols = glu ? kPanel / 2 : kPanel, out_n = glu ? N / 2 : N;
  TORCH_CHECK(!glu || N % 2 == 0, "panel_linear: a GLU weight has an even N");
  TORCH_CHECK(out_n > (NP - 1) * cols && out_n <= NP * cols, "panel_linear: N does not match the panels");
  x = x.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat32 && b.numel() == N, "panel_linear: bias must be float32 [N]");
    if (glu) {                  // laid out like the panels: P/2 gate biases, then P/2 up biases
      auto inter = torch::zeros({NP * kPanel}, b.options()).view({NP, 2, cols});
      auto pad = [&](const torch::Tensor& part) {
        return torch::constant_pad_nd(part, {0, NP * cols - out_n}).view({NP, cols});
      };
      inter.select(1, 0).copy_(pad(b.narrow(0, 0, out_n)));
      inter.select(1, 1).copy_(pad(b.narrow(0, out_n, out_n)));
      b = inter.view({-1});
    }
  }
  auto y = torch::empty({M, out_n}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* pp = panels.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Rows split evenly over tiles of at most kRows (64 rows: 11+11+11+11+10+10, not 12*5+4).
  const int64_t tiles = (M + kRows - 1) / kRows, base = M / tiles, extra = M % tiles;
  auto first_row = [&](int64_t t) { return t * base + std::min(t, extra); };
  // Tiles per pass over the panels: their rows of x stay in L2 while the panels stream by.
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(K * 4 * kRows, 1));
  at::parallel_for(0, NP, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t c0 = 0; c0 < tiles; c0 += chunk) {
      const int64_t c1 = std::min(tiles, c0 + chunk), ct = c1 - c0;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p * cols;              // the panel's first output column
        const int nr = glu ? static_cast<int>(kPanel) : static_cast<int>(std::min(kPanel, N - n));
        const int glu_cols = glu ? static_cast<int>(std::min(cols, out_n - n)) : 0;
        const float* panel = pp + p * K * kPanel;
        const float* bn = bp != nullptr ? bp + p * kPanel : nullptr;
        // The next panel's lines, spread evenly over this panel's tiles.
        const int64_t lines = p + 1 < p1 && (ct > 1 || kSingleTilePrefetch) ? K * kPanel * 4 / 64 : 0;
        const int64_t per_tile = (lines + ct - 1) / ct;
        const char* next = reinterpret_cast<const char*>(panel + K * kPanel);
        for (int64_t t = c0; t < c1; ++t) {
          const int64_t m = first_row(t), rows = first_row(t + 1) - m, l0 = std::min(lines, (t - c0) * per_tile);
          kTiles[rows](xp + m * K, K, panel, bn, yp + m * out_n + n, out_n, nr, next + l0 * 64,
                       std::min(per_tile, lines - l0), glu_cols);
        }
      }
    }
  });
  return y;
}

#endif  // __AVX2__ && __FMA__
