// FlashAttention-2 (Dao 2023) forward and backward for XLA:CPU, float32, as XLA FFI handlers.
//
// Why a kernel: XLA:CPU cannot fuse a matmul with the softmax around it, so the pure-JAX blockwise
// attention (flash_attention.py) writes every score tile to memory and reads it back several times,
// and runs each tile's small matmuls as separate thunks. Here a tile's scores, probabilities and their
// gradients stay in thread-local buffers that fit in L2 (a 64 x 128 tile is 32 KiB) and the tile
// matmuls are register-blocked loops the compiler vectorises for the machine it is built on
// (-march=native: the module is compiled on first use by cpu_kernels.py).
//
// Semantics are flash_attention.blockwise_attention's: query i sees key j when j < S, (not causal or
// j <= i), (window == 0 or i - j < window) and (no segment ids or seg[i] == seg[j]); scores are
// scale * q.k; grouped-query heads (query head n reads KV head n / (N / K)).
// Layouts: q, out, dout, dq [B, T, N, H]; k, v, dk, dv [B, S, K, H]; lse [B, N, T]; segment ids
// [B, T] int32 (a [1, 1] dummy when has_segments is false); RoPE cos and sin [B, T, H / 2] (dummies
// when has_rope is false): q and k are then rotated in the tiles (rotary.rotate), and dq, dk rotated back.
// Work is split over (batch, KV head) pairs: one task owns every output row it writes (dq rows of the
// KV head's query heads, dk and dv rows of the KV head), so the backward needs no atomics.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lmjax::ParallelFor;

namespace {

// Vector lanes, and vectors per micro-kernel row: 6 rows x kPanelVecs accumulators, the panel's
// vectors and a broadcast must fit the register file (32 zmm with AVX-512, 16 ymm without).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kPanelVecs = 4;
#else
constexpr int kLanes = 8, kPanelVecs = 2;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// A broadcast, which the compiler folds into the FMA's memory operand ({1to16}); `Vec{} + x` would
// cost an add and a shuffle on the FMA ports per use.
#if defined(__AVX512F__)
inline Vec Splat(float x) { return (Vec)_mm512_set1_ps(x); }
#elif defined(__AVX__)
inline Vec Splat(float x) { return (Vec)_mm256_set1_ps(x); }
#else
inline Vec Splat(float x) { return Vec{} + x; }
#endif

// C[m, n] (+)= alpha * sum_k A(m, k) B[k, n] for m < M, n < N. B is row-major (ldb); A(m, k) is
// A[m * lda + k], or A[k * lda + m] when TransA (the A^T B products of the backward).
// The micro-kernel keeps MR x NV vector accumulators in registers over the whole k loop.
template <bool TransA, int MR, int NV>
inline void MicroKernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int64_t Kd, float alpha, bool accumulate) {
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < Kd; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Load(B + k * ldb + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const Vec a = Splat(TransA ? A[k * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  const Vec va = Splat(alpha);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + v * kLanes;
      Store(c, accumulate ? Load(c) + va * acc[r][v] : va * acc[r][v]);
    }
}

template <bool TransA, int MR>
inline void RowPanel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     int64_t N, int64_t Kd, float alpha, bool accumulate) {
  auto a_at = [&](int64_t r) { return TransA ? A + r : A + r * lda; };
  int64_t n = 0;
  for (; n + kPanelVecs * kLanes <= N; n += kPanelVecs * kLanes)
    MicroKernel<TransA, MR, kPanelVecs>(A, lda, B + n, ldb, C + n, ldc, Kd, alpha, accumulate);
  for (; n + kLanes <= N; n += kLanes)
    MicroKernel<TransA, MR, 1>(A, lda, B + n, ldb, C + n, ldc, Kd, alpha, accumulate);
  for (; n < N; ++n)  // columns past the last full vector
    for (int r = 0; r < MR; ++r) {
      const float* a = a_at(r);
      float s = 0.0f;
      for (int64_t k = 0; k < Kd; ++k) s += (TransA ? a[k * lda] : a[k]) * B[k * ldb + n];
      float* c = C + r * ldc + n;
      *c = accumulate ? *c + alpha * s : alpha * s;
    }
}

template <bool TransA>
void Gemm(int64_t M, int64_t N, int64_t Kd, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6)
    RowPanel<TransA, 6>(TransA ? A + m : A + m * lda, lda, B, ldb, C + m * ldc, ldc, N, Kd, alpha, accumulate);
  for (; m + 4 <= M; m += 4)
    RowPanel<TransA, 4>(TransA ? A + m : A + m * lda, lda, B, ldb, C + m * ldc, ldc, N, Kd, alpha, accumulate);
  for (; m < M; ++m)
    RowPanel<TransA, 1>(TransA ? A + m : A + m * lda, lda, B, ldb, C + m * ldc, ldc, N, Kd, alpha, accumulate);
}

// exp(x) for float32, Cephes' polynomial after the usual 2^n reduction (error ~1 ulp), on a scalar
// (T = float, n = int32_t) or a vector (T = Vec, n = VecI). exp(-inf) and anything below -87 give 0.
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

template <typename T, typename I>
inline T ExpT(T x) {
  const T lo = T{} - 87.0f, hi = T{} + 88.0f;
  T xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = round(x / ln 2): truncation toward zero of (x / ln 2 + 0.5), corrected downwards for negatives.
  const T y = xc * 1.44269504088896341f + 0.5f;
  I ni;
  T n;
  if constexpr (std::is_same_v<T, float>) {
    ni = static_cast<int32_t>(y);
    n = static_cast<float>(ni);
    if (n > y) { n -= 1.0f; ni -= 1; }
  } else {
    ni = __builtin_convertvector(y, VecI);
    n = __builtin_convertvector(ni, Vec);
    const VecI above = n > y;  // -1 where truncation rounded up
    ni += above;
    n = __builtin_convertvector(ni, Vec);
  }
  const T r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (ni + 127) << 23;
  T scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? T{} : p * scale;
}

inline float Exp(float x) { return ExpT<float, int32_t>(x); }
inline Vec Exp(Vec x) { return ExpT<Vec, VecI>(x); }

inline float HorizontalSum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline float HorizontalMax(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// max(init, x[0..n)).
inline float RowMax(const float* x, int64_t n, float init) {
  Vec m = Splat(init);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const Vec v = Load(x + c);
    m = v > m ? v : m;
  }
  float r = HorizontalMax(m);
  for (; c < n; ++c) r = std::max(r, x[c]);
  return r;
}

// x[c] = exp(x[c] - shift) for c < n; returns their sum when Sum.
template <bool Sum>
inline float ExpShift(float* x, int64_t n, float shift) {
  const Vec vs = Splat(shift);
  Vec acc = Vec{};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const Vec e = Exp(Load(x + c) - vs);
    Store(x + c, e);
    if constexpr (Sum) acc += e;
  }
  float r = HorizontalSum(acc);
  for (; c < n; ++c) {
    x[c] = Exp(x[c] - shift);
    r += x[c];
  }
  return r;
}

struct Problem {
  int64_t B, T, S, N, K, H;
  bool causal;
  float scale;
  int64_t window;  // 0: none
  const int32_t* seg;  // [B, T] or nullptr
  int64_t block_q, block_k;
  const float* rope_cos = nullptr;  // [B, T, H / 2] each, or nullptr: q and k are rotated by them first
  const float* rope_sin = nullptr;

  int64_t G() const { return N / K; }
  // Whether tile [i0, i1) x [j0, j1) holds any entry visible by position.
  bool TileVisible(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (causal && j0 > i1 - 1) return false;
    if (window && i0 - (j1 - 1) >= window) return false;
    return true;
  }
  // Whether every entry of the tile is visible (no per-entry mask needed). `run_end[x]` (with
  // segment ids) is the end of the run of equal ids holding position x in this batch row.
  bool TileFull(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const int64_t* run_end) const {
    if (causal && j1 - 1 > i0) return false;
    if (window && (i1 - 1) - j0 >= window) return false;
    return !seg || run_end[std::min(i0, j0)] >= std::max(i1, j1);
  }
};


// The transpose of a [rows, H] slab (row stride ld), cut into blocks of `block` rows, each stored
// contiguously as [H, width] at out + r0 * H: a tile's operand is then one contiguous panel, not rows
// S floats apart (which at S = 2,048 fall into the same few L1 sets).
void TransposeBlocks(const float* x, int64_t ld, int64_t rows, int64_t H, int64_t block, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t width = std::min(block, rows - r0);
    float* o = out + r0 * H;
    for (int64_t r = 0; r < width; ++r)
      for (int64_t h = 0; h < H; ++h) o[h * width + r] = x[(r0 + r) * ld + h];
  }
}

// Row t of batch b rotated as rotary.rotate does: out[:h] = x1 cos - x2 sin, out[h:] = x2 cos + x1 sin.
void Rotate(const Problem& p, int64_t b, int64_t t, const float* x, float* out) {
  const int64_t h = p.H / 2;
  const float* c = p.rope_cos + (b * p.T + t) * h;
  const float* s = p.rope_sin + (b * p.T + t) * h;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    out[i] = x1 * c[i] - x2 * s[i];
    out[i + h] = x2 * c[i] + x1 * s[i];
  }
}

// The transpose of Rotate (its inverse): a gradient with respect to the rotated row, back to the row.
// In place is fine.
void Unrotate(const Problem& p, int64_t b, int64_t t, const float* g, float* out) {
  const int64_t h = p.H / 2;
  const float* c = p.rope_cos + (b * p.T + t) * h;
  const float* s = p.rope_sin + (b * p.T + t) * h;
  for (int64_t i = 0; i < h; ++i) {
    const float g1 = g[i], g2 = g[i + h];
    out[i] = g1 * c[i] + g2 * s[i];
    out[i + h] = g2 * c[i] - g1 * s[i];
  }
}

// The rows [rows, H] (stride ld) of batch b, rotated into `buffer` when the problem has RoPE tables:
// returns (rows, their stride).
std::pair<const float*, int64_t> RotatedRows(const Problem& p, int64_t b, int64_t first, int64_t rows, const float* x,
                                             int64_t ld, std::vector<float>& buffer) {
  if (!p.rope_cos) return {x, ld};
  buffer.resize(rows * p.H);
  for (int64_t r = 0; r < rows; ++r) Rotate(p, b, first + r, x + r * ld, buffer.data() + r * p.H);
  return {buffer.data(), p.H};
}

// run_end[x] for batch row b: the first position after x with another segment id (nullptr without ids).
std::vector<int64_t> SegmentRunEnds(const Problem& p, int64_t b) {
  std::vector<int64_t> run_end(p.seg ? p.T : 0);
  for (int64_t x = static_cast<int64_t>(run_end.size()) - 1; x >= 0; --x)
    run_end[x] = (x + 1 < p.T && p.seg[b * p.T + x + 1] == p.seg[b * p.T + x]) ? run_end[x + 1] : x + 1;
  return run_end;
}

// Scores of tile (i0.., j0..) into s[bq, bk] (ld = bk), masked entries -inf. q_block: the tile's query
// rows (stride ldq); kT: the keys as TransposeBlocks(block_k) leaves them.
void TileScores(const Problem& p, int64_t b, const int64_t* run_end, const float* q_block, int64_t ldq, const float* kT,
                int64_t i0, int64_t bq, int64_t j0, int64_t bk, float* s) {
  Gemm<false>(bq, bk, p.H, p.scale, q_block, ldq, kT + j0 * p.H, bk, s, bk, false);
  if (p.TileFull(i0, i0 + bq, j0, j0 + bk, run_end)) return;
  const int32_t* seg = p.seg ? p.seg + b * p.T : nullptr;
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r;
    // Visible by position: columns [lo, hi) of the tile.
    const int64_t lo = std::clamp<int64_t>(p.window ? i - p.window + 1 - j0 : 0, 0, bk);
    const int64_t hi = std::clamp<int64_t>(p.causal ? i + 1 - j0 : bk, lo, bk);
    float* sr = s + r * bk;
    std::fill(sr, sr + lo, -INFINITY);
    std::fill(sr + hi, sr + bk, -INFINITY);
    if (seg && run_end[std::min(i, j0 + lo)] < std::max(i + 1, j0 + hi)) {
      const int32_t si = seg[i];
      for (int64_t c = lo; c < hi; ++c) sr[c] = seg[j0 + c] == si ? sr[c] : -INFINITY;
    }
  }
}

void Forward(const Problem& p, const float* q, const float* k, const float* v, float* out, float* lse, ffi::ThreadPool& pool) {
  const int64_t ldq = p.N * p.H, ldk = p.K * p.H, G = p.G(), H = p.H;
  ParallelFor(pool, p.B * p.K, [&](int64_t task) {
    const int64_t b = task / p.K, kh = task % p.K;
    std::vector<float> kT(H * p.S), s(p.block_q * p.block_k), acc(p.block_q * H), m(p.block_q), l(p.block_q), k_rot, q_rot;
    const auto [k_rows, ld_k_rows] = RotatedRows(p, b, 0, p.S, k + b * p.S * ldk + kh * H, ldk, k_rot);
    TransposeBlocks(k_rows, ld_k_rows, p.S, H, p.block_k, kT.data());
    const std::vector<int64_t> run_end = SegmentRunEnds(p, b);
    const float* v_bk = v + b * p.S * ldk + kh * H;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      const float* q_bn = q + b * p.T * ldq + n * H;
      for (int64_t i0 = 0; i0 < p.T; i0 += p.block_q) {
        const int64_t bq = std::min(p.block_q, p.T - i0);
        const auto [q_block, ld_q_block] = RotatedRows(p, b, i0, bq, q_bn + i0 * ldq, ldq, q_rot);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.0f);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j0 = 0; j0 < p.S; j0 += p.block_k) {
          const int64_t bk = std::min(p.block_k, p.S - j0);
          if (!p.TileVisible(i0, i0 + bq, j0, j0 + bk)) continue;
          TileScores(p, b, run_end.data(), q_block, ld_q_block, kT.data(), i0, bq, j0, bk, s.data());
          for (int64_t r = 0; r < bq; ++r) {
            float* sr = s.data() + r * bk;
            const float mx = RowMax(sr, bk, m[r]);
            if (mx == -INFINITY) {  // nothing visible in this row yet: its probabilities are all 0
              std::fill(sr, sr + bk, 0.0f);
              continue;
            }
            const float alpha = Exp(m[r] - mx);
            l[r] = alpha * l[r] + ExpShift<true>(sr, bk, mx);
            m[r] = mx;
            float* ar = acc.data() + r * H;
            for (int64_t h = 0; h < H; ++h) ar[h] *= alpha;
          }
          Gemm<false>(bq, H, bk, 1.0f, s.data(), bk, v_bk + j0 * ldk, ldk, acc.data(), H, true);
        }
        for (int64_t r = 0; r < bq; ++r) {
          const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
          float* o = out + (b * p.T + i0 + r) * ldq + n * H;
          for (int64_t h = 0; h < H; ++h) o[h] = acc[r * H + h] * inv;
          lse[(b * p.N + n) * p.T + i0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : INFINITY;
        }
      }
    }
  });
}

void Backward(const Problem& p, const float* q, const float* k, const float* v, const float* out, const float* lse,
              const float* dout, float* dq, float* dk, float* dv, ffi::ThreadPool& pool) {
  const int64_t ldq = p.N * p.H, ldk = p.K * p.H, G = p.G(), H = p.H, bq_max = p.block_q, bk_max = p.block_k;
  ParallelFor(pool, p.B * p.K, [&](int64_t task) {
    const int64_t b = task / p.K, kh = task % p.K;
    std::vector<float> kT(H * p.S), vT(H * p.S), delta(G * p.T), s(bq_max * bk_max), dp(bq_max * bk_max),
        dk_acc(bk_max * H), dv_acc(bk_max * H), k_rot, q_rot;
    // With RoPE everything below is in rotated coordinates; dq and dk are rotated back at the end.
    const auto [k_bk, ld_k] = RotatedRows(p, b, 0, p.S, k + b * p.S * ldk + kh * H, ldk, k_rot);
    const float* v_bk = v + b * p.S * ldk + kh * H;
    TransposeBlocks(k_bk, ld_k, p.S, H, bk_max, kT.data());
    TransposeBlocks(v_bk, ldk, p.S, H, bk_max, vT.data());
    const std::vector<int64_t> run_end = SegmentRunEnds(p, b);
    // delta_i = dO_i . O_i (FA-2's softmax-backward row term) per query head of the group; dq zeroed.
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < p.T; ++i) {
        const int64_t row = (b * p.T + i) * ldq + (kh * G + g) * H;
        float d = 0.0f;
        for (int64_t h = 0; h < H; ++h) d += dout[row + h] * out[row + h];
        delta[g * p.T + i] = d;
        std::fill(dq + row, dq + row + H, 0.0f);
      }
    for (int64_t j0 = 0; j0 < p.S; j0 += bk_max) {
      const int64_t bk = std::min(bk_max, p.S - j0);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n = kh * G + g;
        const float* q_bn = q + b * p.T * ldq + n * H;
        const float* do_bn = dout + b * p.T * ldq + n * H;
        float* dq_bn = dq + b * p.T * ldq + n * H;
        const float* lse_bn = lse + (b * p.N + n) * p.T;
        for (int64_t i0 = 0; i0 < p.T; i0 += bq_max) {
          const int64_t bq = std::min(bq_max, p.T - i0);
          if (!p.TileVisible(i0, i0 + bq, j0, j0 + bk)) continue;
          const auto [q_block, ld_q_block] = RotatedRows(p, b, i0, bq, q_bn + i0 * ldq, ldq, q_rot);
          TileScores(p, b, run_end.data(), q_block, ld_q_block, kT.data(), i0, bq, j0, bk, s.data());
          for (int64_t r = 0; r < bq; ++r) {  // the forward's probabilities, recomputed from lse
            ExpShift<false>(s.data() + r * bk, bk, lse_bn[i0 + r]);
          }
          Gemm<true>(bk, H, bq, 1.0f, s.data(), bk, do_bn + i0 * ldq, ldq, dv_acc.data(), H, true);  // dV += P^T dO
          Gemm<false>(bq, bk, H, 1.0f, do_bn + i0 * ldq, ldq, vT.data() + j0 * H, bk, dp.data(), bk, false);  // dP = dO V^T
          for (int64_t r = 0; r < bq; ++r) {  // dS = P * (dP - delta) * scale, into dp
            const float* pr = s.data() + r * bk;
            float* dr = dp.data() + r * bk;
            const float d = delta[g * p.T + i0 + r];
            for (int64_t c = 0; c < bk; ++c) dr[c] = pr[c] * (dr[c] - d) * p.scale;
          }
          Gemm<false>(bq, H, bk, 1.0f, dp.data(), bk, k_bk + j0 * ld_k, ld_k, dq_bn + i0 * ldq, ldq, true);  // dQ += dS K
          Gemm<true>(bk, H, bq, 1.0f, dp.data(), bk, q_block, ld_q_block, dk_acc.data(), H, true);  // dK += dS^T Q
        }
      }
      for (int64_t c = 0; c < bk; ++c) {
        const int64_t row = (b * p.S + j0 + c) * ldk + kh * H;
        if (p.rope_cos)
          Unrotate(p, b, j0 + c, dk_acc.data() + c * H, dk + row);
        else
          std::memcpy(dk + row, dk_acc.data() + c * H, H * sizeof(float));
        std::memcpy(dv + row, dv_acc.data() + c * H, H * sizeof(float));
      }
    }
    if (p.rope_cos)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < p.T; ++i) {
          float* row = dq + (b * p.T + i) * ldq + (kh * G + g) * H;
          Unrotate(p, b, i, row, row);
        }
  });
}

ffi::Error MakeProblem(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::S32>& seg,
                       ffi::Buffer<ffi::F32>& cos, ffi::Buffer<ffi::F32>& sin, bool causal, float scale, int64_t window,
                       bool has_segments, bool has_rope, int64_t block_q, int64_t block_k, Problem* p) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[3] != kd[3] || kd[2] == 0 || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument("attention_cpu: q [B, T, N, H] and k, v [B, S, K, H] with K dividing N");
  if (block_q < 1 || block_k < 1) return ffi::Error::InvalidArgument("attention_cpu: blocks must be positive");
  *p = Problem{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], causal, scale, window,
               has_segments ? seg.typed_data() : nullptr, block_q, block_k};
  if (has_segments && (p->S != p->T || seg.element_count() != p->B * p->T))
    return ffi::Error::InvalidArgument("attention_cpu: segment ids need self-attention and shape [B, T]");
  if (has_rope) {
    if (p->S != p->T || p->H % 2 || cos.element_count() != p->B * p->T * (p->H / 2) ||
        sin.element_count() != cos.element_count())
      return ffi::Error::InvalidArgument("attention_cpu: RoPE tables need self-attention, an even H and shape [B, T, H/2]");
    p->rope_cos = cos.typed_data();
    p->rope_sin = sin.typed_data();
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, bool causal, float scale,
                       int64_t window, bool has_segments, bool has_rope, int64_t block_q, int64_t block_k) {
  Problem p;
  if (auto e = MakeProblem(q, k, seg, cos, sin, causal, scale, window, has_segments, has_rope, block_q, block_k, &p);
      e.failure())
    return e;
  Forward(p, q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data(), pool);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                        ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                        bool causal, float scale, int64_t window, bool has_segments, bool has_rope, int64_t block_q,
                        int64_t block_k) {
  Problem p;
  if (auto e = MakeProblem(q, k, seg, cos, sin, causal, scale, window, has_segments, has_rope, block_q, block_k, &p);
      e.failure())
    return e;
  Backward(p, q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(), lse.typed_data(), dout.typed_data(),
           dq->typed_data(), dk->typed_data(), dv->typed_data(), pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE sin
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("has_segments")
                                  .Attr<bool>("has_rope")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmjaxAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // RoPE sin
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<bool>("has_segments")
                                  .Attr<bool>("has_rope")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));
