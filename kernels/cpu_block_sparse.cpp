// Block-sparse flash-attention forward and backward for the CPU (fp32; the forward also in bf16).
//
// Each (batch, head, query block) walks its own KV-block index list. Per group of up to kGroup listed blocks
// (one score tile): the blocks' K and V rows side by side (read in place when the blocks are consecutive,
// else copied into a per-worker buffer), S = scale * Q K^T as one MKL GEMM, an online softmax over the
// tile, then O += P V as one GEMM. Query rows stay whole blocks (64/128) so the GEMMs run at MKL's full
// rate; SDPA's own CPU kernel picks a smaller query tile for a 64-row query, which held the
// gather-then-SDPA path at ~0.6 of the ideal speedup (benchmarks/RESULTS.md).
//
// bf16 inputs (forward only) keep Q, K, V in bf16 and run both GEMMs as MKL's bf16 x bf16 -> fp32 GEMM; the
// scores, the softmax and the output accumulator stay fp32 and P is rounded to bf16 for P V, as
// FlashAttention does on GPUs. Only used where the caller checked that GEMM on this CPU (cpu_block_sparse.py).
//
// Work items are (b, h, q-block) triples claimed from one atomic counter by torch's intra-op threads, in the
// order the caller gives (cpu_block_sparse.py: head by head, longest KV list first within a head).
//
// The backward walks the same lists from each query block (FlashAttention-2's formula, probabilities
// recomputed from the saved LSE): dQ is private to the block, while dK/dV of a listed KV block are shared by
// every query block listing it. Rather than transposed lists and a second recompute pass, each worker owns
// whole heads (dK/dV of a head are touched by that head's query blocks only), or, with fewer heads than
// twice the workers, each fixed range of items accumulates into its own dK/dV copy, summed at the end.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count (returns the previous one): each worker's GEMMs must run on that worker
// alone, or MKL spreads every 64x64 GEMM over all threads and the workers oversubscribe the cores.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads);

// bf16 values as their bit patterns. MKL's mixed GEMM (C fp32 = A bf16 x B bf16) is weak: a torch build whose
// BLAS lacks it still loads the extension, and has_bf16_gemm() says so.
typedef uint16_t bf16;
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const bf16* a, int lda, const bf16* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

namespace {

constexpr int kGroup = 8;  // listed KV blocks per score tile: 8 x 64 keys = one 512-wide tile, as SDPA uses

// 16 fp32 lanes as a GCC/Clang vector type: the compiler lowers it to AVX-512, AVX2 pairs or NEON for the
// build machine (-march=native). Auto-vectorising the scalar loops failed for the exp below (gcc 12 kept
// them scalar, and the softmax then cost as much as both GEMMs).
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x) for x <= 0 as 2^(x log2 e): round-to-nearest by the 1.5 * 2^23 trick, a degree-6 polynomial for
// 2^f on [-0.5, 0.5] (relative error ~2e-7), the exponent added to the bits. Inputs below -80 (e^-80 ~ 2e-35)
// give exactly 0, so a masked key's -inf score carries no weight at all.
inline vfloat exp_nonpositive(vfloat x) {
  const vfloat magic = splat(12582912.0f);
  const auto underflow = x < -80.0f;
  x = underflow ? splat(-80.0f) : x;
  const vfloat t = x * 1.4426950408889634f;
  const vfloat shifted = t + magic;
  const vfloat n = shifted - magic;
  const vfloat f = t - n;
  vfloat p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vint exponent = (reinterpret_cast<const vint&>(shifted) - reinterpret_cast<const vint&>(magic)) << 23;
  const vint bits = reinterpret_cast<const vint&>(p) + exponent;
  const vfloat e = reinterpret_cast<const vfloat&>(bits);
  return underflow ? splat(0.0f) : e;
}

inline float exp_nonpositive(float x) {
  float lanes[kLanes] = {x};
  return exp_nonpositive(load(lanes))[0];
}

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

float max_of(const float* x, int n, float init) {
  // Four running maxima: one would chain every comparison on the one before.
  vfloat m0 = splat(init), m1 = m0, m2 = m0, m3 = m0;
  int i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    m0 = vmax(m0, load(x + i));
    m1 = vmax(m1, load(x + i + kLanes));
    m2 = vmax(m2, load(x + i + 2 * kLanes));
    m3 = vmax(m3, load(x + i + 3 * kLanes));
  }
  for (; i + kLanes <= n; i += kLanes) m0 = vmax(m0, load(x + i));
  const vfloat m = vmax(vmax(m0, m1), vmax(m2, m3));
  float out = init;
  for (int l = 0; l < kLanes; ++l) out = std::max(out, m[l]);
  for (; i < n; ++i) out = std::max(out, x[i]);
  return out;
}

typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vbf16 __attribute__((vector_size(32)));

// x rounded to bf16 (nearest, ties to even); x finite (softmax weights in [0, 1]).
inline vbf16 to_bf16(vfloat x) {
  const vuint bits = reinterpret_cast<const vuint&>(x);
  return __builtin_convertvector((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16, vbf16);
}

inline bf16 to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<bf16>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// exp(x[i] - shift) (every x[i] <= shift) into x in place, or, with `low` given, rounded to bf16 into low
// instead (x untouched); returns the sum of the fp32 values.
float exp_shift_sum(float* x, int n, float shift, bf16* low = nullptr) {
  vfloat sum0 = splat(0.0f), sum1 = sum0;
  const vfloat s = splat(shift);
  int i = 0;
  auto put = [&](int at, vfloat p) {
    if (low != nullptr) {
      const vbf16 h = to_bf16(p);
      std::memcpy(low + at, &h, sizeof(h));
    } else {
      store(x + at, p);
    }
  };
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vfloat p0 = exp_nonpositive(load(x + i) - s);
    const vfloat p1 = exp_nonpositive(load(x + i + kLanes) - s);
    put(i, p0);
    put(i + kLanes, p1);
    sum0 += p0;
    sum1 += p1;
  }
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat p = exp_nonpositive(load(x + i) - s);
    put(i, p);
    sum0 += p;
  }
  const vfloat sum = sum0 + sum1;
  float out = 0.0f;
  for (int l = 0; l < kLanes; ++l) out += sum[l];
  for (; i < n; ++i) {
    const float p = exp_nonpositive(x[i] - shift);
    if (low != nullptr) {
      low[i] = to_bf16(p);
    } else {
      x[i] = p;
    }
    out += p;
  }
  return out;
}

void scale_row(float* x, int n, float factor) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) store(x + i, load(x + i) * factor);
  for (; i < n; ++i) x[i] *= factor;
}

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) * B^T, B (n x k, ldb); beta * C added.
inline void gemm_abt(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                     float beta, float* c, int ldc) {
  // Column-major view: C^T (n x m) = B (n x k) * A^T (k x m).
  sgemm_("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-major C (m x n, ldc) += A (m x k, lda) * B (k x n, ldb).
inline void gemm_ab_acc(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
                        int ldc) {
  const float one = 1.0f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc);
}

inline void gemm_abt(int m, int n, int k, float alpha, const bf16* a, int lda, const bf16* b, int ldb,
                     float beta, float* c, int ldc) {
  cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasNoTrans, kCblasTrans, m, n, k, alpha, a, lda, b, ldb, beta, c,
                         ldc);
}

inline void gemm_ab_acc(int m, int n, int k, const bf16* a, int lda, const bf16* b, int ldb, float* c,
                        int ldc) {
  cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasNoTrans, kCblasNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 1.0f, c,
                         ldc);
}

// Row-major C (m x n, ldc) += alpha * A (m x k, lda) * B (k x n, ldb).
inline void gemm_ab_scaled(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                           float* c, int ldc) {
  const float one = 1.0f;
  sgemm_("N", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &one, c, &ldc);
}

// Row-major C (m x n, ldc) += alpha * A^T B, A (k x m, lda), B (k x n, ldb).
inline void gemm_atb_acc(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                         float* c, int ldc) {
  // Column-major view: C^T (n x m) = B^T (n x k) * A (k x m).
  const float one = 1.0f;
  sgemm_("N", "T", &n, &m, &k, &alpha, b, &ldb, a, &lda, &one, c, &ldc);
}

// Per worker, for inputs of element type T. partial / partial_max: only when block sums are asked for; per
// row and listed block the sum of exp(s - m) and, per row and score tile, the running max m it was taken
// against. weights: the score tile's probabilities in bf16 (bf16 inputs only). k_rows / v_rows: a score
// tile's listed K and V blocks side by side, so each tile is one wide GEMM rather than one small GEMM per
// block (MKL runs a 64-row GEMM over 512 keys at over twice the rate of eight over 64).
template <typename T>
struct Workspace {
  std::vector<float> scores, acc, row_max, row_sum, partial, partial_max;
  std::vector<bf16> weights;
  std::vector<T> k_rows, v_rows;
  Workspace(int bs, int d, int max_count, bool sums)
      : scores(static_cast<size_t>(bs) * bs * kGroup), acc(static_cast<size_t>(bs) * d), row_max(bs),
        row_sum(bs), partial(sums ? static_cast<size_t>(bs) * max_count : 0),
        partial_max(sums ? static_cast<size_t>(bs) * (max_count + kGroup - 1) / kGroup : 0),
        weights(std::is_same_v<T, bf16> ? static_cast<size_t>(bs) * bs * kGroup : 0),
        k_rows(static_cast<size_t>(bs) * kGroup * d), v_rows(static_cast<size_t>(bs) * kGroup * d) {}
};

// The rows of `g_n` listed blocks of a (seq_k, d) matrix side by side: in place when the blocks are
// consecutive, else copied into `buffer`. widths: each block's row count (the tail block holds fewer).
template <typename T>
const T* tile_rows(const T* base, const int32_t* blocks, int g_n, int bs, int d, const int* widths, T* buffer) {
  bool consecutive = true;
  for (int g = 1; g < g_n && consecutive; ++g) consecutive = blocks[g] == blocks[0] + g;
  if (consecutive) return base + static_cast<size_t>(blocks[0]) * bs * d;
  T* to = buffer;
  for (int g = 0; g < g_n; ++g) {
    const size_t rows = static_cast<size_t>(widths[g]) * d;
    std::memcpy(to, base + static_cast<size_t>(blocks[g]) * bs * d, rows * sizeof(T));
    to += rows;
  }
  return buffer;
}

// AdaSpa's block scores of one query block from the partial sums: sum over rows of exp(s - LSE_row) per
// listed KV block, written to block_sums[list[j]] (the row of the (Qb, Kb) table; unlisted entries untouched).
template <typename T>
void finish_block_sums(const Workspace<T>& ws, const float* lse, const int32_t* list, int count, int m,
                       float* block_sums) {
  const int tiles = (count + kGroup - 1) / kGroup;
  for (int j = 0; j < count; ++j) {
    double total = 0.0;
    for (int r = 0; r < m; ++r) {
      if (lse[r] == -std::numeric_limits<float>::infinity()) continue;  // a row that attends nothing
      const float shift = ws.partial_max[static_cast<size_t>(r) * tiles + j / kGroup] - lse[r];
      total += ws.partial[static_cast<size_t>(r) * count + j] * std::exp(shift);
    }
    block_sums[list[j]] = static_cast<float>(total);
  }
}

// Scores of keys that may not be attended (key_ok[j] == 0, padded prompt tokens) become -inf: m rows of
// `width` columns, ld_s apart.
void mask_keys(float* s, int m, int width, int ld_s, const uint8_t* key_ok) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < width; ++c) {
    if (key_ok[c]) continue;
    for (int r = 0; r < m; ++r) s[static_cast<size_t>(r) * ld_s + c] = neg_inf;
  }
}

// One query block: rows [q0, q0 + m) of head (b, h) against `count` listed KV blocks. With `block_sums`
// (the query block's row of the (Qb, Kb) table) also the summed softmax weight of every listed block, from
// the same score tiles: AdaSpa's search at the cost of the attention itself. `key_ok` (this batch row's Sk
// flags) and `block_padded` (its Kb flags: the block holds a masked key) are null without key padding.
template <typename T>
void attend_block(const T* q, const T* k, const T* v, float* out, float* lse, const int32_t* list,
                  int count, int m, int seq_k, int bs, int d, float scale, Workspace<T>& ws, float* block_sums,
                  const uint8_t* key_ok, const uint8_t* block_padded) {
  if (count == 0) {  // attends nothing: output 0, LSE -inf (the reference's convention)
    std::fill(out, out + static_cast<size_t>(m) * d, 0.0f);
    std::fill(lse, lse + m, -std::numeric_limits<float>::infinity());
    return;
  }
  const int ld_s = bs * kGroup;
  float* s = ws.scores.data();
  float* acc = ws.acc.data();
  float* row_max = ws.row_max.data();
  float* row_sum = ws.row_sum.data();
  std::fill(acc, acc + static_cast<size_t>(m) * d, 0.0f);
  std::fill(row_max, row_max + m, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + m, 0.0f);
  const int tiles = (count + kGroup - 1) / kGroup;
  int offsets[kGroup], widths[kGroup];
  for (int g0 = 0; g0 < count; g0 += kGroup) {
    const int g_n = std::min(kGroup, count - g0);
    int width = 0;
    for (int g = 0; g < g_n; ++g) {
      offsets[g] = width;
      widths[g] = std::min(bs, seq_k - list[g0 + g] * bs);  // the tail block holds fewer keys: no padding
      width += widths[g];
    }
    const T* k_tile = tile_rows(k, list + g0, g_n, bs, d, widths, ws.k_rows.data());
    const T* v_tile = tile_rows(v, list + g0, g_n, bs, d, widths, ws.v_rows.data());
    gemm_abt(m, width, d, scale, q, d, k_tile, d, 0.0f, s, ld_s);
    if (block_padded != nullptr) {
      for (int g = 0; g < g_n; ++g) {
        if (block_padded[list[g0 + g]]) mask_keys(s + offsets[g], m, widths[g], ld_s, key_ok + list[g0 + g] * bs);
      }
    }
    for (int r = 0; r < m; ++r) {
      float* row = s + static_cast<size_t>(r) * ld_s;
      const float tile_max = max_of(row, width, row_max[r]);
      if (tile_max == -std::numeric_limits<float>::infinity()) {  // every key so far masked: no weight yet
        std::fill(row, row + width, 0.0f);
        if constexpr (std::is_same_v<T, bf16>) {
          std::fill_n(ws.weights.data() + static_cast<size_t>(r) * ld_s, width, bf16{0});
        }
        if (block_sums != nullptr) {
          ws.partial_max[static_cast<size_t>(r) * tiles + g0 / kGroup] = 0.0f;
          for (int g = 0; g < g_n; ++g) ws.partial[static_cast<size_t>(r) * count + g0 + g] = 0.0f;
        }
        continue;
      }
      float sum = 0.0f;
      bf16* low = nullptr;  // bf16 inputs: the weights P V reads, written by the exp pass
      if constexpr (std::is_same_v<T, bf16>) low = ws.weights.data() + static_cast<size_t>(r) * ld_s;
      if (block_sums == nullptr) {
        sum = exp_shift_sum(row, width, tile_max, low);
      } else {
        ws.partial_max[static_cast<size_t>(r) * tiles + g0 / kGroup] = tile_max;
        for (int g = 0; g < g_n; ++g) {
          const float part = exp_shift_sum(row + offsets[g], widths[g], tile_max,
                                           low == nullptr ? nullptr : low + offsets[g]);
          ws.partial[static_cast<size_t>(r) * count + g0 + g] = part;
          sum += part;
        }
      }
      const float rescale = exp_nonpositive(row_max[r] - tile_max);  // 0 on the first tile (-inf)
      row_sum[r] = row_sum[r] * rescale + sum;
      row_max[r] = tile_max;
      if (rescale != 1.0f) scale_row(acc + static_cast<size_t>(r) * d, d, rescale);
    }
    const T* weights = nullptr;
    if constexpr (std::is_same_v<T, bf16>) {
      weights = ws.weights.data();
    } else {
      weights = s;
    }
    gemm_ab_acc(m, d, width, weights, ld_s, v_tile, d, acc, d);
  }
  for (int r = 0; r < m; ++r) {
    const float* a = acc + static_cast<size_t>(r) * d;
    float* o = out + static_cast<size_t>(r) * d;
    if (row_sum[r] == 0.0f) {  // every listed key masked: attends nothing, as a row with no blocks
      std::fill(o, o + d, 0.0f);
      lse[r] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv = 1.0f / row_sum[r];
    for (int c = 0; c < d; ++c) o[c] = a[c] * inv;
    lse[r] = row_max[r] + std::log(row_sum[r]);
  }
  if (block_sums != nullptr) finish_block_sums(ws, lse, list, count, m, block_sums);
}

}  // namespace

namespace {

// The forward over inputs of element type T (float, or bf16 bit patterns); the arguments as in forward().
template <typename T>
std::vector<torch::Tensor> forward_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        const torch::Tensor& kv_counts, const torch::Tensor& kv_indices,
                                        const torch::Tensor& order, int64_t block_size, double scale,
                                        bool with_block_sums, const torch::Tensor& key_ok) {
  const int64_t B = q.size(0), H = q.size(1), seq_q = q.size(2), D = q.size(3), seq_k = k.size(2);
  const int bs = static_cast<int>(block_size);
  const int64_t qb = (seq_q + bs - 1) / bs;
  TORCH_CHECK(kv_counts.size(2) == qb, "kv_counts has ", kv_counts.size(2), " query blocks, expected ", qb);
  auto counts = kv_counts.contiguous();
  auto indices = kv_indices.contiguous();
  auto work = order.contiguous();
  const auto fp32 = q.options().dtype(torch::kFloat32);
  auto out = torch::empty(q.sizes(), fp32);
  auto lse = torch::empty({B, H, seq_q}, fp32);
  const int64_t kb = (seq_k + bs - 1) / bs;
  auto sums = with_block_sums ? torch::zeros({B, H, qb, kb}, fp32) : torch::empty({0}, fp32);
  float* sp = with_block_sums ? sums.data_ptr<float>() : nullptr;
  const int max_count = counts.numel() ? counts.max().item<int32_t>() : 0;
  const bool padded = key_ok.numel() > 0;
  torch::Tensor ok, block_padded;
  if (padded) {
    TORCH_CHECK(key_ok.scalar_type() == torch::kUInt8 && key_ok.dim() == 2 && key_ok.size(0) == B &&
                key_ok.size(1) == seq_k, "key_ok must be (B, Sk) uint8");
    ok = key_ok.contiguous();
    // Per (batch, KV block): does it hold a masked key? Only those tiles pay for masking.
    auto pad = torch::constant_pad_nd(ok.eq(0), {0, kb * bs - seq_k}, 0);
    block_padded = pad.view({B, kb, bs}).any(2).to(torch::kUInt8).contiguous();
  }
  const uint8_t* okp = padded ? ok.data_ptr<uint8_t>() : nullptr;
  const uint8_t* bpp = padded ? block_padded.data_ptr<uint8_t>() : nullptr;
  const int64_t width = indices.size(3), items = B * H * qb;
  const T* qp = static_cast<const T*>(q.data_ptr());
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int32_t* cp = counts.data_ptr<int32_t>();
  const int32_t* ip = indices.data_ptr<int32_t>();
  const int64_t* wp = work.data_ptr<int64_t>();
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Workspace<T> ws(bs, static_cast<int>(D), max_count, with_block_sums);
    const int previous = MKL_Set_Num_Threads_Local(1);
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      const int64_t item = wp[i];
      const int64_t bh = item / qb, blk = item % qb;
      const int64_t row0 = blk * bs;
      const int m = static_cast<int>(std::min<int64_t>(bs, seq_q - row0));
      attend_block<T>(qp + (bh * seq_q + row0) * D, kp + bh * seq_k * D, vp + bh * seq_k * D,
                      op + (bh * seq_q + row0) * D, lp + bh * seq_q + row0, ip + item * width, cp[item], m,
                      static_cast<int>(seq_k), bs, static_cast<int>(D), static_cast<float>(scale), ws,
                      sp == nullptr ? nullptr : sp + item * kb, padded ? okp + (bh / H) * seq_k : nullptr,
                      padded ? bpp + (bh / H) * kb : nullptr);
    }
    MKL_Set_Num_Threads_Local(previous);
  });
  return {out, lse, sums};
}

}  // namespace

bool has_bf16_gemm() { return cblas_gemm_bf16bf16f32 != nullptr; }

// a (m, k) and b bf16, contiguous: a b^T (b (n, k)) or, with accumulate_into given, accumulate_into + a b
// (b (k, n)), in fp32 through the same bf16 GEMM calls the forward makes, for the caller's check of it on
// this CPU against an fp32 product of the same values.
torch::Tensor bf16_gemm_probe(torch::Tensor a, torch::Tensor b, c10::optional<torch::Tensor> accumulate_into) {
  TORCH_CHECK(has_bf16_gemm(), "this torch build's BLAS has no bf16 GEMM (cblas_gemm_bf16bf16f32)");
  TORCH_CHECK(a.scalar_type() == torch::kBFloat16 && b.scalar_type() == torch::kBFloat16 && a.dim() == 2 &&
              b.dim() == 2 && a.is_contiguous() && b.is_contiguous(), "a, b: contiguous 2-D bf16");
  const int m = static_cast<int>(a.size(0)), k = static_cast<int>(a.size(1));
  const bf16* ap = static_cast<const bf16*>(a.data_ptr());
  const bf16* bp = static_cast<const bf16*>(b.data_ptr());
  if (!accumulate_into.has_value()) {
    TORCH_CHECK(b.size(1) == k, "a b^T needs b (n, k)");
    const int n = static_cast<int>(b.size(0));
    auto c = torch::empty({m, n}, a.options().dtype(torch::kFloat32));
    gemm_abt(m, n, k, 1.0f, ap, k, bp, k, 0.0f, c.data_ptr<float>(), n);
    return c;
  }
  TORCH_CHECK(b.size(0) == k, "c + a b needs b (k, n)");
  const int n = static_cast<int>(b.size(1));
  auto c = accumulate_into->to(torch::kFloat32).contiguous().clone();
  TORCH_CHECK(c.size(0) == m && c.size(1) == n, "accumulate_into must be (m, n)");
  gemm_ab_acc(m, n, k, ap, k, bp, n, c.data_ptr<float>(), n);
  return c;
}

// q (B, H, Sq, D), k/v (B, H, Sk, D) contiguous, all fp32 or all bf16 (bf16 only where the caller checked
// bf16_gemm_probe); kv_counts (B, H, Qb) and kv_indices (B, H, Qb, W) int32; order: the B*H*Qb work items in
// the order to run them; key_ok: (B, Sk) uint8, 0 for keys no query may attend, or an empty tensor. Returns
// (out (B, H, Sq, D), lse (B, H, Sq), block_sums (B, H, Qb, Kb) when with_block_sums, else an empty tensor;
// unlisted blocks sum to 0), all fp32.
std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_counts,
                                   torch::Tensor kv_indices, torch::Tensor order, int64_t block_size,
                                   double scale, bool with_block_sums, torch::Tensor key_ok) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == torch::kFloat32 || dtype == torch::kBFloat16) && k.scalar_type() == dtype &&
              v.scalar_type() == dtype, "cpu block-sparse kernel: q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(dtype == torch::kFloat32 || has_bf16_gemm(), "this torch build's BLAS has no bf16 GEMM");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(kv_counts.scalar_type() == torch::kInt32 && kv_indices.scalar_type() == torch::kInt32 &&
              order.scalar_type() == torch::kInt64, "counts/indices int32, order int64");
  if (dtype == torch::kBFloat16) {
    return forward_impl<bf16>(q, k, v, kv_counts, kv_indices, order, block_size, scale, with_block_sums, key_ok);
  }
  return forward_impl<float>(q, k, v, kv_counts, kv_indices, order, block_size, scale, with_block_sums, key_ok);
}

namespace {

struct BackwardWorkspace {
  std::vector<float> p, dp, dq, delta;
  BackwardWorkspace(int bs, int d)
      : p(static_cast<size_t>(bs) * bs * kGroup), dp(static_cast<size_t>(bs) * bs * kGroup),
        dq(static_cast<size_t>(bs) * d), delta(bs) {}
};

// x[i] = exp(x[i] - shift) (every x[i] <= shift up to rounding: shift is the row's LSE).
void exp_shift(float* x, int n, float shift) {
  const vfloat s = splat(shift);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) store(x + i, exp_nonpositive(load(x + i) - s));
  for (; i < n; ++i) x[i] = exp_nonpositive(x[i] - shift);
}

// dp[i] = p[i] * (dp[i] - delta): the softmax's backward, dS = P o (dO V^T - rowsum(dO o O)).
void softmax_grad(const float* p, float* dp, int n, float delta) {
  const vfloat dv = splat(delta);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dp + i, load(p + i) * (load(dp + i) - dv));
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - delta);
}

float dot(const float* a, const float* b, int n) {
  vfloat acc = splat(0.0f);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  float out = 0.0f;
  for (int l = 0; l < kLanes; ++l) out += acc[l];
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

// One query block's share of the backward: rows [q0, q0 + m) of one head against its `count` listed KV
// blocks. Writes the block's dQ rows; adds into dK/dV (the head's, or this worker's copy) of listed blocks.
void backward_block(const float* q, const float* k, const float* v, const float* o, const float* dout,
                    const float* lse, const int32_t* list, int count, int m, int seq_k, int bs, int d,
                    float scale, BackwardWorkspace& ws, float* dq, float* dk, float* dv) {
  if (count == 0) {  // attended nothing: no gradient
    std::fill(dq, dq + static_cast<size_t>(m) * d, 0.0f);
    return;
  }
  const int ld_s = bs * kGroup;
  float* p = ws.p.data();
  float* dp = ws.dp.data();
  float* acc = ws.dq.data();
  float* delta = ws.delta.data();
  std::fill(acc, acc + static_cast<size_t>(m) * d, 0.0f);
  for (int r = 0; r < m; ++r) {
    delta[r] = dot(dout + static_cast<size_t>(r) * d, o + static_cast<size_t>(r) * d, d);
  }
  int offsets[kGroup], widths[kGroup];
  for (int g0 = 0; g0 < count; g0 += kGroup) {
    const int g_n = std::min(kGroup, count - g0);
    int width = 0;
    for (int g = 0; g < g_n; ++g) {
      const size_t start = static_cast<size_t>(list[g0 + g]) * bs;
      offsets[g] = width;
      widths[g] = std::min(bs, seq_k - static_cast<int>(start));
      gemm_abt(m, widths[g], d, scale, q, d, k + start * d, d, 0.0f, p + width, ld_s);
      gemm_abt(m, widths[g], d, 1.0f, dout, d, v + start * d, d, 0.0f, dp + width, ld_s);
      width += widths[g];
    }
    for (int r = 0; r < m; ++r) {
      float* pr = p + static_cast<size_t>(r) * ld_s;
      exp_shift(pr, width, lse[r]);
      softmax_grad(pr, dp + static_cast<size_t>(r) * ld_s, width, delta[r]);
    }
    for (int g = 0; g < g_n; ++g) {
      const size_t start = static_cast<size_t>(list[g0 + g]) * bs;
      const int w = widths[g];
      gemm_atb_acc(w, d, m, 1.0f, p + offsets[g], ld_s, dout, d, dv + start * d, d);      // dV += P^T dO
      gemm_atb_acc(w, d, m, scale, dp + offsets[g], ld_s, q, d, dk + start * d, d);      // dK += dS^T Q s
      gemm_ab_scaled(m, d, w, scale, dp + offsets[g], ld_s, k + start * d, d, acc, d);   // dQ += dS K s
    }
  }
  std::copy(acc, acc + static_cast<size_t>(m) * d, dq);
}

}  // namespace

// grad_out, q, out (B, H, Sq, D), k/v (B, H, Sk, D) contiguous fp32; lse (B, H, Sq) fp32 from the forward;
// kv_counts/kv_indices as in forward (no key padding). Returns (dq, dk, dv). Unlisted KV blocks are never
// read, so a NaN there reaches no gradient.
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor out, torch::Tensor lse, torch::Tensor kv_counts,
                                    torch::Tensor kv_indices, int64_t block_size, double scale) {
  for (const auto& t : {grad_out, q, k, v, out, lse}) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "cpu block-sparse backward: grad_out, q, k, v, out, lse must be contiguous float32");
  }
  TORCH_CHECK(kv_counts.scalar_type() == torch::kInt32 && kv_indices.scalar_type() == torch::kInt32,
              "counts/indices must be int32");
  const int64_t B = q.size(0), H = q.size(1), seq_q = q.size(2), D = q.size(3), seq_k = k.size(2);
  const int bs = static_cast<int>(block_size);
  const int64_t qb = (seq_q + bs - 1) / bs, heads = B * H;
  TORCH_CHECK(kv_counts.size(2) == qb, "kv_counts has ", kv_counts.size(2), " query blocks, expected ", qb);
  auto counts = kv_counts.contiguous();
  auto indices = kv_indices.contiguous();
  const int64_t width = indices.size(3);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Whole heads per worker when there are enough to balance; else per-worker dK/dV copies.
  const bool by_head = heads >= 2 * threads || threads == 1;
  const int64_t workers = by_head ? std::min(threads, heads) : std::min(threads, heads * qb);
  auto dq = torch::empty_like(q);
  auto dk = torch::zeros_like(k);
  auto dv = torch::zeros_like(v);
  torch::Tensor dk_parts, dv_parts;
  if (!by_head) {
    dk_parts = torch::zeros({workers, B, H, seq_k, D}, k.options());
    dv_parts = torch::zeros({workers, B, H, seq_k, D}, v.options());
  }
  const float* gp = grad_out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const int32_t* cp = counts.data_ptr<int32_t>();
  const int32_t* ip = indices.data_ptr<int32_t>();
  float* dqp = dq.data_ptr<float>();
  const int64_t head_k = seq_k * D;
  const int64_t items = heads * qb;
  // One (b, h, query block) item: its dQ rows, and its dK/dV terms into the given head-sized buffers.
  auto run_item = [&](int64_t item, BackwardWorkspace& ws, float* dk_base, float* dv_base) {
    const int64_t bh = item / qb, row0 = (item % qb) * bs;
    const int m = static_cast<int>(std::min<int64_t>(bs, seq_q - row0));
    const int64_t rows = bh * seq_q + row0;
    backward_block(qp + rows * D, kp + bh * head_k, vp + bh * head_k, op + rows * D, gp + rows * D, lp + rows,
                   ip + item * width, cp[item], m, static_cast<int>(seq_k), bs, static_cast<int>(D),
                   static_cast<float>(scale), ws, dqp + rows * D, dk_base + bh * head_k, dv_base + bh * head_k);
  };
  if (by_head) {
    // Heads claimed dynamically; each head's items run in order on one worker: deterministic sums.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      BackwardWorkspace ws(bs, static_cast<int>(D));
      const int previous = MKL_Set_Num_Threads_Local(1);
      for (int64_t head = next.fetch_add(1); head < heads; head = next.fetch_add(1)) {
        for (int64_t item = head * qb; item < (head + 1) * qb; ++item) {
          run_item(item, ws, dk.data_ptr<float>(), dv.data_ptr<float>());
        }
      }
      MKL_Set_Num_Threads_Local(previous);
    });
  } else {
    // A fixed contiguous range of items per copy (not per thread), so the summation order, and with it
    // every bit of dK/dV, is the same in every run: gradcheck's reentrancy check, reproducible training.
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      BackwardWorkspace ws(bs, static_cast<int>(D));
      const int previous = MKL_Set_Num_Threads_Local(1);
      for (int64_t part = begin; part < end; ++part) {
        float* dk_base = dk_parts.data_ptr<float>() + part * heads * head_k;
        float* dv_base = dv_parts.data_ptr<float>() + part * heads * head_k;
        for (int64_t item = part * items / workers; item < (part + 1) * items / workers; ++item) {
          run_item(item, ws, dk_base, dv_base);
        }
      }
      MKL_Set_Num_Threads_Local(previous);
    });
  }
  if (!by_head) {
    dk = dk_parts.sum(0);
    dv = dv_parts.sum(0);
  }
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Block-sparse attention forward (CPU, fp32 or bf16 inputs)");
  m.def("has_bf16_gemm", &has_bf16_gemm, "MKL's bf16 x bf16 -> fp32 GEMM is linked");
  m.def("bf16_gemm_probe", &bf16_gemm_probe, "a b^T, or c + a b, through the forward's bf16 GEMM calls",
        py::arg("a"), py::arg("b"), py::arg("accumulate_into") = py::none());
  m.def("backward", &backward, "Block-sparse attention backward (CPU, fp32): dq, dk, dv");
}
