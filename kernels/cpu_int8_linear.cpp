// Fused int8 linear for CPU: y = dequant(Q_a(x) @ Q_w(W)^T) + b in three tight passes.
//
// 1. One pass over the activations (float or bf16): per-token range (dynamic) or the calibrated one
//    (static), quantize to int8, and the row sums the zero-point algebra needs. The row stays in cache
//    between finding its range and quantizing it; no float temporaries are allocated.
// 2. The int8 GEMM, int8 x int8 -> int32 exact (torch's _int_mm: oneDNN, chosen by the running CPU), over
//    tiles of output columns into one reused int32 buffer. 4-bit weights stay packed two per byte and are
//    unpacked one column tile at a time into a reused buffer: the whole int8 weight never exists.
// 3. The epilogue on each tile while it is in cache: zero-point corrections in int32, the per-row x
//    per-column scale, the bias, and the store in the output dtype.
//
// The integer accumulators equal sum_k (qx - zx)(qw - zw) exactly, as the Python reference computes them;
// quantization uses the reference's float operations (division, round-half-even), so the int8 activations
// are bit-identical too. `accumulators=true` returns the corrected int32 tile values for tests.
// weight_only_linear serves weight-only layers (W4A16) with the same column tiles and a float GEMM.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct RowQuant {
  float scale;
  float zero;
};

// Per-token (scale, zero) with the reference's float operations (quantizers._range_qparams).
inline RowQuant token_qparams(float lo, float hi, int qmin, int qmax, bool symmetric) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  if (symmetric) {
    float scale = std::max(std::fabs(lo), std::fabs(hi)) / static_cast<float>(qmax);
    return {std::max(scale, 1e-8f), 0.0f};
  }
  float scale = std::max((hi - lo) / static_cast<float>(qmax - qmin), 1e-8f);
  float zero = std::nearbyint(lo / scale);
  zero = std::min(std::max(static_cast<float>(qmin) - zero, static_cast<float>(qmin)), static_cast<float>(qmax));
  return {scale, zero};
}

// One row: its range (dynamic), its int8 values and their sum. Plain counted loops over restrict pointers,
// so the compiler vectorizes the range, the quantization and the sum.
template <typename T>
RowQuant quantize_row(const T* __restrict xr, int64_t k, bool dynamic, bool symmetric, RowQuant fixed, int qmin,
                      int qmax, float* __restrict buf, int8_t* __restrict qr, int32_t* row_sum) {
  for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(xr[i]);
  RowQuant rq = fixed;
  if (dynamic) {
    float lo = buf[0], hi = buf[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t i = 0; i < k; ++i) {
      lo = std::min(lo, buf[i]);
      hi = std::max(hi, buf[i]);
    }
    rq = token_qparams(lo, hi, qmin, qmax, symmetric);
  }
  const float scale = rq.scale, zero = rq.zero, fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  for (int64_t i = 0; i < k; ++i) {
    float v = std::nearbyint(buf[i] / scale) + zero;
    qr[i] = static_cast<int8_t>(std::min(std::max(v, fmin), fmax));
  }
  int32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += qr[i];
  *row_sum = sum;
  return rq;
}

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, bool dynamic, bool symmetric, float s_static,
                   float z_static, int qmin, int qmax, int8_t* q, float* row_scale, float* row_zero,
                   int32_t* row_sum) {
  at::parallel_for(0, m, 16, [=](int64_t begin, int64_t end) {
    std::vector<float> buf(k);
    for (int64_t r = begin; r < end; ++r) {
      RowQuant rq = quantize_row<T>(x + r * k, k, dynamic, symmetric, {s_static, z_static}, qmin, qmax, buf.data(),
                                    q + r * k, row_sum + r);
      row_scale[r] = rq.scale;
      row_zero[r] = rq.zero;
    }
  });
}

// Columns [n0, n0 + tn) of a packed 4-bit weight (N, ceil(K/2)) as int8 (tn, K): low nibble first, q + 8.
void unpack_int4_rows(const uint8_t* packed, int64_t k, int64_t n0, int64_t tn, int8_t* out) {
  const int64_t kp = (k + 1) / 2;
  at::parallel_for(0, tn, 8, [=](int64_t begin, int64_t end) {
    const int64_t half = k / 2;
    for (int64_t j = begin; j < end; ++j) {
      const uint8_t* __restrict src = packed + (n0 + j) * kp;
      int8_t* __restrict dst = out + j * k;
      for (int64_t i = 0; i < half; ++i) {
        dst[2 * i] = static_cast<int8_t>((src[i] & 0x0F) - 8);
        dst[2 * i + 1] = static_cast<int8_t>((src[i] >> 4) - 8);
      }
      if (k % 2) dst[k - 1] = static_cast<int8_t>((src[half] & 0x0F) - 8);
    }
  });
}

// The corrected integer of one output: sum (qx - zx)(qw - zw) = qx.qw - zx*sum(qw) - zw*sum(qx) + K*zx*zw.
inline int32_t corrected(int32_t acc, int32_t zx, int32_t row_sum, int32_t colsum, int32_t zw, int32_t k) {
  return acc - zx * colsum - zw * row_sum + k * zx * zw;
}

template <typename O>
void epilogue(const int32_t* acc, int64_t m, int64_t tn, int64_t n0, int64_t n, int64_t k,
              const float* row_scale, const float* row_zero, const int32_t* row_sum, const float* w_scale,
              const int32_t* w_zero, const int32_t* w_colsum, const float* bias, O* out, int32_t* out_acc) {
  const int32_t k32 = static_cast<int32_t>(k);
  at::parallel_for(0, m, 8, [=](int64_t begin, int64_t end) {
    std::vector<float> row(tn);
    const int32_t* __restrict cs = w_colsum + n0;
    const int32_t* __restrict zw = w_zero + n0;
    const float* __restrict ws = w_scale + n0;
    const float* __restrict b = bias + n0;
    for (int64_t r = begin; r < end; ++r) {
      const int32_t zx = static_cast<int32_t>(row_zero[r]), rs = row_sum[r];
      const float sx = row_scale[r];
      const int32_t* __restrict a = acc + r * tn;
      if (out_acc) {
        int32_t* __restrict dst = out_acc + r * n + n0;
        for (int64_t j = 0; j < tn; ++j) dst[j] = corrected(a[j], zx, rs, cs[j], zw[j], k32);
        continue;
      }
      float* __restrict y = row.data();
      for (int64_t j = 0; j < tn; ++j)
        y[j] = static_cast<float>(corrected(a[j], zx, rs, cs[j], zw[j], k32)) * (sx * ws[j]) + b[j];
      O* __restrict dst = out + r * n + n0;
      for (int64_t j = 0; j < tn; ++j) dst[j] = static_cast<O>(y[j]);
    }
  });
}

int64_t column_tile(int64_t m, int64_t n, int64_t tile_n, bool packed) {
  if (tile_n > 0) return std::min(tile_n, n);
  // int8 weights: one GEMM unless its int32 output outgrows ~8 MB; packed weights always tile, so the
  // unpacked int8 buffer stays small next to the weight.
  const int64_t budget = (8 << 20) / 4;
  int64_t tn = std::max<int64_t>(64, (budget / std::max<int64_t>(m, 1)) / 64 * 64);
  if (packed) tn = std::min<int64_t>(tn, 256);
  return std::min(tn, n);
}

}  // namespace

// The checks both entry points share; returns whether the weight is packed 4-bit.
bool check_linear_inputs(const torch::Tensor& x, const torch::Tensor& qweight, int64_t k,
                         const torch::Tensor& w_scale, const torch::Tensor& w_zero, const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.is_contiguous(), "x must be contiguous (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const bool packed = qweight.scalar_type() == at::kByte;
  TORCH_CHECK(packed || qweight.scalar_type() == at::kChar, "qweight must be int8 or packed uint8");
  TORCH_CHECK(qweight.is_contiguous() && qweight.size(1) == (packed ? (k + 1) / 2 : k), "qweight shape");
  const int64_t n = qweight.size(0);
  TORCH_CHECK(w_scale.numel() == n && w_zero.numel() == n, "w_scale and w_zero must be (N,)");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_zero.scalar_type() == at::kInt, "w_scale float32, w_zero int32");
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == n && bias.scalar_type() == at::kFloat), "bias (N,) float32");
  return packed;
}

// x (M, K) float or bf16 contiguous; qweight (N, K) int8 or (N, ceil(K/2)) uint8 packed 4-bit;
// a_scale/a_zero: floats used when !dynamic; w_scale (N,) float; w_zero, w_colsum (N,) int32;
// bias (N,) float or empty. Returns (M, N) in x's dtype, or the corrected int32 accumulators.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qweight, int64_t k, bool dynamic, bool symmetric,
                          double a_scale, double a_zero, int64_t qmin, int64_t qmax, torch::Tensor w_scale,
                          torch::Tensor w_zero, torch::Tensor w_colsum, torch::Tensor bias, int64_t tile_n,
                          bool accumulators) {
  const bool packed = check_linear_inputs(x, qweight, k, w_scale, w_zero, bias);
  const int64_t m = x.size(0), n = qweight.size(0);
  TORCH_CHECK(w_colsum.numel() == n && w_colsum.scalar_type() == at::kInt, "w_colsum (N,) int32");
  const bool has_bias = bias.numel() > 0;

  auto qx = torch::empty({m, k}, torch::dtype(torch::kInt8));
  auto row_scale = torch::empty({m}, torch::dtype(torch::kFloat));
  auto row_zero = torch::empty({m}, torch::dtype(torch::kFloat));
  auto row_sum = torch::empty({m}, torch::dtype(torch::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "quantize_rows", [&] {
    quantize_rows<scalar_t>(x.data_ptr<scalar_t>(), m, k, dynamic, symmetric, static_cast<float>(a_scale),
                            static_cast<float>(a_zero), static_cast<int>(qmin), static_cast<int>(qmax),
                            qx.data_ptr<int8_t>(), row_scale.data_ptr<float>(), row_zero.data_ptr<float>(),
                            row_sum.data_ptr<int32_t>());
  });

  torch::Tensor out = accumulators ? torch::empty({m, n}, torch::dtype(torch::kInt))
                                   : torch::empty({m, n}, x.options());
  const int64_t tn_max = column_tile(m, n, tile_n, packed);
  auto acc = torch::empty({m, tn_max}, torch::dtype(torch::kInt));
  torch::Tensor unpacked = packed ? torch::empty({tn_max, k}, torch::dtype(torch::kInt8)) : torch::Tensor();
  auto zeros = has_bias ? bias : torch::zeros({n}, torch::dtype(torch::kFloat));  // no branch per element
  const float* bias_ptr = zeros.data_ptr<float>();
  for (int64_t n0 = 0; n0 < n; n0 += tn_max) {
    const int64_t tn = std::min(tn_max, n - n0);
    torch::Tensor w_tile;
    if (packed) {
      unpack_int4_rows(qweight.data_ptr<uint8_t>(), k, n0, tn, unpacked.data_ptr<int8_t>());
      w_tile = unpacked.narrow(0, 0, tn);
    } else {
      w_tile = qweight.narrow(0, n0, tn);
    }
    auto acc_tile = tn == tn_max ? acc : acc.narrow(1, 0, tn).contiguous();
    at::_int_mm_out(acc_tile, qx, w_tile.t());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "epilogue", [&] {
      epilogue<scalar_t>(acc_tile.data_ptr<int32_t>(), m, tn, n0, n, k, row_scale.data_ptr<float>(),
                         row_zero.data_ptr<float>(), row_sum.data_ptr<int32_t>(), w_scale.data_ptr<float>(),
                         w_zero.data_ptr<int32_t>(), w_colsum.data_ptr<int32_t>(), bias_ptr,
                         accumulators ? nullptr : out.data_ptr<scalar_t>(),
                         accumulators ? out.data_ptr<int32_t>() : nullptr);
    });
  }
  return out;
}

// Columns [n0, n0 + tn) of an int8 or packed 4-bit weight, dequantized ((q - zw) * sw, the reference's float
// operations) into T (tn, K).
template <typename T>
void dequantize_rows(const torch::Tensor& qweight, bool packed, int64_t k, int64_t n0, int64_t tn,
                     const float* w_scale, const int32_t* w_zero, T* out) {
  const int8_t* q8 = packed ? nullptr : qweight.data_ptr<int8_t>();
  const uint8_t* q4 = packed ? qweight.data_ptr<uint8_t>() : nullptr;
  const int64_t kp = (k + 1) / 2, half = k / 2;
  at::parallel_for(0, tn, 8, [=](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t c = n0 + j;
      const float zw = static_cast<float>(w_zero[c]), sw = w_scale[c];
      float* __restrict r = row.data();
      if (packed) {
        const uint8_t* __restrict src = q4 + c * kp;
        for (int64_t i = 0; i < half; ++i) {
          r[2 * i] = static_cast<float>((src[i] & 0x0F) - 8);
          r[2 * i + 1] = static_cast<float>((src[i] >> 4) - 8);
        }
        if (k % 2) r[k - 1] = static_cast<float>((src[half] & 0x0F) - 8);
      } else {
        const int8_t* __restrict src = q8 + c * k;
        for (int64_t i = 0; i < k; ++i) r[i] = static_cast<float>(src[i]);
      }
      T* __restrict dst = out + j * k;
      for (int64_t i = 0; i < k; ++i) dst[i] = static_cast<T>((r[i] - zw) * sw);
    }
  });
}

// y[:, n0:n0+tn] + bias, from the compute dtype C into the output dtype O.
template <typename C, typename O>
void store_tile(const C* y, int64_t m, int64_t tn, int64_t n0, int64_t n, const float* bias, O* out) {
  at::parallel_for(0, m, 8, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const C* __restrict src = y + r * tn;
      O* __restrict dst = out + r * n + n0;
      for (int64_t j = 0; j < tn; ++j) dst[j] = static_cast<O>(static_cast<float>(src[j]) + bias[n0 + j]);
    }
  });
}

// Weight-only linear (float activations): per column tile, the weight dequantized into a reused buffer in the
// compute dtype, one GEMM in that dtype, then the bias. The float weight never exists whole. `bf16_compute`
// runs fp32 activations through a bf16 GEMM (W4A16: 16-bit activations), for CPUs with bf16 dot products.
torch::Tensor weight_only_linear(torch::Tensor x, torch::Tensor qweight, int64_t k, torch::Tensor w_scale,
                                 torch::Tensor w_zero, torch::Tensor bias, int64_t tile_n, bool bf16_compute) {
  const bool packed = check_linear_inputs(x, qweight, k, w_scale, w_zero, bias);
  const int64_t m = x.size(0), n = qweight.size(0);
  const bool has_bias = bias.numel() > 0;
  const torch::Tensor xc = bf16_compute ? x.to(at::kBFloat16) : x;
  const int64_t tn_max = tile_n > 0 ? std::min(tile_n, n) : std::min<int64_t>(256, n);
  auto out = torch::empty({m, n}, x.options());
  auto w_tile = torch::empty({tn_max, k}, xc.options());
  auto y_tile = torch::empty({m, tn_max}, xc.options());
  auto zeros = has_bias ? bias : torch::zeros({n}, torch::dtype(torch::kFloat));
  const float* b = zeros.data_ptr<float>();
  for (int64_t n0 = 0; n0 < n; n0 += tn_max) {
    const int64_t tn = std::min(tn_max, n - n0);
    auto wt = w_tile.narrow(0, 0, tn);
    auto yt = tn == tn_max ? y_tile : torch::empty({m, tn}, xc.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "weight_only_linear", [&] {
      dequantize_rows<scalar_t>(qweight, packed, k, n0, tn, w_scale.data_ptr<float>(), w_zero.data_ptr<int32_t>(),
                                wt.data_ptr<scalar_t>());
      at::mm_out(yt, xc, wt.t());
      if (x.scalar_type() == at::kFloat) {
        store_tile<scalar_t, float>(yt.data_ptr<scalar_t>(), m, tn, n0, n, b, out.data_ptr<float>());
      } else {
        store_tile<scalar_t, c10::BFloat16>(yt.data_ptr<scalar_t>(), m, tn, n0, n, b, out.data_ptr<c10::BFloat16>());
      }
    });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "Fused int8 linear: quantize, int8 GEMM, dequantize + bias (CPU)");
  m.def("weight_only_linear", &weight_only_linear, "Weight-only linear: int8/4-bit weights dequantized per tile");
}
