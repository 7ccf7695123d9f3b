// quantrt_cpu::int_gemm — y = x @ W^T for grouped-int weights in 32-element blocks, fp32 accumulation.
//
// Weight layout (built once by cpu_native_kernels.py from the canonical IntWeight):
//   bits 4: qs [N, K/2] uint8; per 32-block 16 bytes, byte j = code j (low nibble) | code j+16 (high nibble)
//           (GGML's Q4_0/Q4_1 order); codes 0..15.
//   bits 8: qs [N, K] int8; codes -128..127.
//   scales [N, K/32] float32 or float16; mins [N, K/32] float32 / float16 (additive min), or uint8 (an
//   integer zero point z: min = -z * scale, computed in fp32, exact), or absent (= 0).
//   w[n, 32b + i] = q[n, 32b + i] * scales[n, b] + min[n, b]
// So y[m, n] = sum_b scales[n, b] * dot(q_block, x_block) + mins[n, b] * sum(x_block): the same value as
// dequantize-then-matmul, up to fp32 summation order (no activation quantization).
// x: [M, K] float32 / bfloat16 / float16 (computed in fp32); bias: [N] or absent; y: [M, N] x.dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMChunk = 64;      // activation rows per pass of the direct kernel
constexpr int64_t kDirectRows = 16;  // above this many rows, dequantized tiles + sgemm (gemm_tiled)

inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

// The block's additive min: stored as a float, or as an integer zero point z (m = -z·s, exact in fp32).
inline float min_value(float m, float) { return m; }
inline float min_value(c10::Half m, float) { return to_f32(m); }
inline float min_value(uint8_t z, float s) { return -static_cast<float>(z) * s; }

#if QRT_AVX2
// The 32 codes of one block as 4 x 8 floats in element order.
template <int BITS>
inline void unpack_block(const uint8_t* p, __m256 w[4]) {
  if constexpr (BITS == 4) {
    const __m256i m15 = _mm256_set1_epi32(15);
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m15));   // codes 0..7
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m15));   // codes 8..15
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));    // codes 16..23
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));    // codes 24..31
  } else {
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j))));
  }
}

// Scales and mins of up to 8 consecutive blocks as floats (min = -z*s for integer zero points).
template <typename S, typename Z>
inline void group_params(const S* sc, const Z* mn, int64_t b0, int nb, float* sb, float* mb) {
  if (nb == 8) {
    __m256 s8;
    if constexpr (std::is_same_v<S, float>) s8 = _mm256_loadu_ps(sc + b0);
    else s8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + b0)));
    _mm256_storeu_ps(sb, s8);
    if (!mn) return;
    __m256 m8;
    if constexpr (std::is_same_v<Z, float>) m8 = _mm256_loadu_ps(mn + b0);
    else if constexpr (std::is_same_v<Z, c10::Half>)
      m8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + b0)));
    else
      m8 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                             reinterpret_cast<const __m128i*>(mn + b0)))), _mm256_sub_ps(_mm256_setzero_ps(), s8));
    _mm256_storeu_ps(mb, m8);
    return;
  }
  for (int j = 0; j < 8; ++j) {
    sb[j] = j < nb ? to_f32(sc[b0 + j]) : 0.f;
    if (mn) mb[j] = j < nb ? min_value(mn[b0 + j], sb[j]) : 0.f;
  }
}

// One weight row x C activation rows over all K blocks, blocks in groups of 8 (scales/mins converted 8 at
// a time; the min term sum_b m_b * xsum_b is a vector dot per group). One row at a time keeps 3 memory
// streams per thread (codes, scales, mins), which the hardware prefetchers follow at full bandwidth.
template <int BITS, int C, typename S, typename Z>
inline void row_avx2(const uint8_t* q, const S* sc, const Z* mn, const float* x, int64_t ldx,
                     const float* xs, int64_t kb, float* out, int64_t ldo) {
  constexpr int64_t bb = BITS * 4;  // bytes per 32-block
  __m256 acc[C], macc[C];
  for (int c = 0; c < C; ++c) { acc[c] = _mm256_setzero_ps(); macc[c] = _mm256_setzero_ps(); }
  alignas(32) float sb[8], mb[8];
  for (int64_t b0 = 0; b0 < kb; b0 += 8) {
    const int nb = static_cast<int>(std::min<int64_t>(8, kb - b0));
    group_params<S, Z>(sc, mn, b0, nb, sb, mb);
    _mm_prefetch(reinterpret_cast<const char*>(q + (b0 + 16) * bb), _MM_HINT_T0);
    for (int j = 0; j < nb; ++j) {
      const int64_t b = b0 + j;
      __m256 w[4];
      unpack_block<BITS>(q + b * bb, w);
      const __m256 s = _mm256_broadcast_ss(sb + j);
      for (int c = 0; c < C; ++c) {
        const float* xb = x + c * ldx + b * kBlock;
        __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
        t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), t);
        t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), t);
        t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), t);
        acc[c] = _mm256_fmadd_ps(t, s, acc[c]);
      }
    }
    if (mn) {
      if (nb == 8) {
        const __m256 m8 = _mm256_load_ps(mb);
        for (int c = 0; c < C; ++c) macc[c] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xs + c * kb + b0), macc[c]);
      } else {
        for (int c = 0; c < C; ++c) {
          float t = 0.f;
          for (int j = 0; j < nb; ++j) t += mb[j] * xs[c * kb + b0 + j];
          macc[c] = _mm256_add_ps(macc[c], _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0));
        }
      }
    }
  }
  for (int c = 0; c < C; ++c) out[c * ldo] = hsum8(acc[c]) + hsum8(macc[c]);
}
#endif

// Portable path: the same arithmetic, one weight row x C activation rows.
template <int BITS, typename S, typename Z>
inline void row_scalar(const uint8_t* q, const S* sc, const Z* mn, const float* x, int64_t ldx,
                       const float* xs, int64_t kb, int64_t c_rows, float* out, int64_t ldo) {
  constexpr int64_t bb = BITS * 4;
  float wv[kBlock];
  for (int64_t c = 0; c < c_rows; ++c) out[c * ldo] = 0.f;
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* p = q + b * bb;
    for (int i = 0; i < 16 && BITS == 4; ++i) { wv[i] = float(p[i] & 15); wv[i + 16] = float(p[i] >> 4); }
    for (int i = 0; i < 32 && BITS == 8; ++i) wv[i] = float(static_cast<int8_t>(p[i]));
    const float s = to_f32(sc[b]), m = mn ? min_value(mn[b], s) : 0.f;
    for (int64_t c = 0; c < c_rows; ++c) {
      const float* xb = x + c * ldx + b * kBlock;
      float t = 0.f;
      for (int i = 0; i < kBlock; ++i) t += wv[i] * xb[i];
      out[c * ldo] += s * t + (mn ? m * xs[c * kb + b] : 0.f);
    }
  }
}

// Rows [n_begin, n_end) for activation rows [0, C), C <= 4.
template <int BITS, int C, typename S, typename Z>
void rows_range(const uint8_t* qs, int64_t row_bytes, const S* sc, const Z* mn, int64_t n_begin,
                int64_t n_end, const float* x, int64_t ldx, const float* xs, int64_t kb, float* y, int64_t ldy) {
  for (int64_t n = n_begin; n < n_end; ++n) {
#if QRT_AVX2
    row_avx2<BITS, C, S, Z>(qs + n * row_bytes, sc + n * kb, mn ? mn + n * kb : nullptr, x, ldx, xs, kb, y + n, ldy);
#else
    row_scalar<BITS, S, Z>(qs + n * row_bytes, sc + n * kb, mn ? mn + n * kb : nullptr, x, ldx, xs, kb, C, y + n, ldy);
#endif
  }
}

template <int BITS, typename S, typename Z>
void gemm_rows(const uint8_t* qs, int64_t row_bytes, const S* sc, const Z* mn, int64_t n_begin, int64_t n_end,
               const float* x, int64_t ldx, const float* xs, int64_t kb, int64_t m_rows, float* y, int64_t ldy) {
  // tiles of 32 weight rows so every activation chunk of <= 4 rows re-reads them from L1/L2
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 32) {
    const int64_t n1 = std::min(n_end, n0 + 32);
    for (int64_t c0 = 0; c0 < m_rows; c0 += 4) {
      const int64_t cr = std::min<int64_t>(4, m_rows - c0);
      const float* xc = x + c0 * ldx;
      const float* xsc = xs ? xs + c0 * kb : nullptr;
      float* yc = y + c0 * ldy;
      switch (cr) {
        case 1: rows_range<BITS, 1, S, Z>(qs, row_bytes, sc, mn, n0, n1, xc, ldx, xsc, kb, yc, ldy); break;
        case 2: rows_range<BITS, 2, S, Z>(qs, row_bytes, sc, mn, n0, n1, xc, ldx, xsc, kb, yc, ldy); break;
        case 3: rows_range<BITS, 3, S, Z>(qs, row_bytes, sc, mn, n0, n1, xc, ldx, xsc, kb, yc, ldy); break;
        default: rows_range<BITS, 4, S, Z>(qs, row_bytes, sc, mn, n0, n1, xc, ldx, xsc, kb, yc, ldy); break;
      }
    }
  }
}

// Rows [n0, n0 + rows) dequantized to fp32: out[r, k] = q * s + min (the reference weights, up to rounding).
template <int BITS, typename S, typename Z>
void dequant_rows(const uint8_t* q, int64_t row_bytes, const S* sc, const Z* mn, int64_t n0, int64_t rows,
                  int64_t k, float* out) {
  const int64_t kb = k / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = q + (n0 + r) * row_bytes;
    const S* s = sc + (n0 + r) * kb;
    const Z* z = mn ? mn + (n0 + r) * kb : nullptr;
    for (int64_t b = 0; b < kb; ++b) {
      const float sv = to_f32(s[b]), mv = z ? min_value(z[b], sv) : 0.f;
      const uint8_t* pb = p + b * BITS * 4;
      float* ob = out + r * k + b * kBlock;
#if QRT_AVX2
      __m256 w[4];
      unpack_block<BITS>(pb, w);
      const __m256 s8 = _mm256_set1_ps(sv), m8 = _mm256_set1_ps(mv);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(ob + 8 * j, _mm256_fmadd_ps(w[j], s8, m8));
#else
      if constexpr (BITS == 4) {
        for (int i = 0; i < 16; ++i) ob[i] = float(pb[i] & 15) * sv + mv;
        for (int i = 0; i < 16; ++i) ob[i + 16] = float(pb[i] >> 4) * sv + mv;
      } else {
        for (int i = 0; i < 32; ++i) ob[i] = float(static_cast<int8_t>(pb[i])) * sv + mv;
      }
#endif
    }
  }
}

// M > kDirectRows (prefill): per task, tiles of weight rows dequantized into a cache-sized fp32 buffer
// (<= 256 KiB) and multiplied with torch's sgemm (single-threaded inside the parallel region).
template <int BITS, typename S, typename Z>
void gemm_tiled(const uint8_t* q, int64_t row_bytes, const S* sc, const Z* mn, const float* x, int64_t m,
                int64_t k, float* y, int64_t n) {
  const int64_t tile = std::clamp<int64_t>((int64_t(1) << 16) / k, 8, 64);
  const at::Tensor xt = at::from_blob(const_cast<float*>(x), {m, k}, at::kFloat);
  at::parallel_for(0, (n + tile - 1) / tile, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor wt = at::empty({tile, k}, at::kFloat);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min(tile, n - n0);
      dequant_rows<BITS, S, Z>(q, row_bytes, sc, mn, n0, rows, k, wt.data_ptr<float>());
      const at::Tensor yt = at::mm(xt, wt.narrow(0, 0, rows).t()).contiguous();  // [M, rows]
      const float* yp = yt.data_ptr<float>();
      for (int64_t i = 0; i < m; ++i) std::memcpy(y + i * n + n0, yp + i * rows, rows * sizeof(float));
    }
  });
}

template <int BITS, typename S, typename Z>
void dispatch(const at::Tensor& qs, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
              const float* x, const float* xs, int64_t m, int64_t k, float* y, int64_t n) {
  const int64_t kb = k / kBlock, row_bytes = qs.size(1);
  const auto* q = static_cast<const uint8_t*>(qs.data_ptr());
  const S* sc = scales.data_ptr<S>();
  const Z* mn = mins.has_value() ? mins->data_ptr<Z>() : nullptr;
  if (m > kDirectRows) return gemm_tiled<BITS, S, Z>(q, row_bytes, sc, mn, x, m, k, y, n);
  // at least ~64 KiB of weight bytes per task: smaller splits cost more in thread wake-up than they save
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / std::max<int64_t>(1, row_bytes));
  for (int64_t m0 = 0; m0 < m; m0 += kMChunk) {
    const int64_t mr = std::min(kMChunk, m - m0);
    const float* xm = x + m0 * k;
    const float* xsm = xs ? xs + m0 * kb : nullptr;
    float* ym = y + m0 * n;
    at::parallel_for(0, n, grain, [&](int64_t n_begin, int64_t n_end) {
      gemm_rows<BITS, S, Z>(q, row_bytes, sc, mn, n_begin, n_end, xm, k, xsm, kb, mr, ym, n);
    });
  }
}

// Staging without ATen ops: at decode this op runs ~120 times a step and each dispatcher call costs
// microseconds. x [M, K] -> fp32 rows; xs [M, K/32] block sums (needed only when the weight has mins).
template <typename T>
void to_f32_rows(const T* x, int64_t count, float* xf) {
  for (int64_t i = 0; i < count; ++i) xf[i] = static_cast<float>(x[i]);
}

void block_sums(const float* xf, int64_t blocks, float* xs) {
  for (int64_t r = 0; r < blocks; ++r) {
    float t = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) t += xf[r * kBlock + i];
    xs[r] = t;
  }
}

at::Tensor int_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& mins, int64_t bits, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "quantrt_cpu::int_gemm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && qs.device().is_cpu() && scales.device().is_cpu(),
              "quantrt_cpu::int_gemm: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "quantrt_cpu::int_gemm: x must be [M, K], got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "quantrt_cpu::int_gemm: x dtype must be float32, bfloat16 or float16, got ", xt);
  const int64_t m = x.size(0), k = x.size(1), n = qs.size(0), kb = k / kBlock;
  TORCH_CHECK(k % kBlock == 0, "quantrt_cpu::int_gemm: K=", k, " is not a multiple of 32");
  TORCH_CHECK(qs.scalar_type() == (bits == 4 ? at::kByte : at::kChar) && qs.is_contiguous() &&
                  qs.dim() == 2 && qs.size(1) == k * bits / 8,
              "quantrt_cpu::int_gemm: qs must be contiguous [N, K*bits/8] ", bits == 4 ? "uint8" : "int8",
              ", got ", qs.scalar_type(), " ", qs.sizes());
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == n && scales.size(1) == kb,
              "quantrt_cpu::int_gemm: scales must be contiguous float32/float16 [N, K/32], got ",
              scales.scalar_type(), " ", scales.sizes());
  const bool has_min = mins.has_value();
  if (has_min)
    TORCH_CHECK((mins->scalar_type() == at::kFloat || mins->scalar_type() == at::kHalf ||
                 mins->scalar_type() == at::kByte) && mins->is_contiguous() && mins->sizes() == scales.sizes(),
                "quantrt_cpu::int_gemm: mins must be contiguous float32/float16 (additive min) or uint8 (zero "
                "point z, min = -z*scale) with scales' shape [N, K/32], got ", mins->scalar_type(), " ", mins->sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == xt),
                "quantrt_cpu::int_gemm: bias must be a contiguous [N] tensor of float32 or x's dtype");

  const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  // staging: fp32 copy of x (when x is not fp32), block sums, fp32 output (when y is not fp32)
  thread_local std::vector<float> stage;
  const int64_t nx = xt == at::kFloat ? 0 : m * k, ns = has_min ? m * kb : 0, ny = xt == at::kFloat ? 0 : m * n;
  if (int64_t(stage.size()) < nx + ns + ny) stage.resize(nx + ns + ny);
  float* xf = xt == at::kFloat ? xc.data_ptr<float>() : stage.data();
  float* xs = has_min ? stage.data() + nx : nullptr;
  float* yf = xt == at::kFloat ? y.data_ptr<float>() : stage.data() + nx + ns;
  if (xt == at::kBFloat16) to_f32_rows(xc.data_ptr<c10::BFloat16>(), m * k, xf);
  if (xt == at::kHalf) to_f32_rows(xc.data_ptr<c10::Half>(), m * k, xf);
  if (xs) block_sums(xf, m * kb, xs);
  const bool half = scales.scalar_type() == at::kHalf;
  const auto zt = has_min ? mins->scalar_type() : scales.scalar_type();
#define QRT_DISPATCH(B, S, Z) dispatch<B, S, Z>(qs, scales, mins, xf, xs, m, k, yf, n)
#define QRT_BY_Z(B, S)                                            \
  zt == at::kByte ? QRT_DISPATCH(B, S, uint8_t)                   \
                  : (zt == at::kHalf ? QRT_DISPATCH(B, S, c10::Half) : QRT_DISPATCH(B, S, float))
  if (bits == 4)
    half ? QRT_BY_Z(4, c10::Half) : QRT_BY_Z(4, float);
  else
    half ? QRT_BY_Z(8, c10::Half) : QRT_BY_Z(8, float);
#undef QRT_BY_Z
#undef QRT_DISPATCH
  if (bias.has_value()) {
    const bool bf = bias->scalar_type() == at::kFloat;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) {
        const float b = bf ? bias->data_ptr<float>()[j]
                           : (xt == at::kBFloat16 ? float(bias->data_ptr<c10::BFloat16>()[j])
                                                  : float(bias->data_ptr<c10::Half>()[j]));
        yf[r * n + j] += b;
      }
  }
  if (xt == at::kBFloat16) {
    auto* yo = y.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < m * n; ++i) yo[i] = c10::BFloat16(yf[i]);
  } else if (xt == at::kHalf) {
    auto* yo = y.data_ptr<c10::Half>();
    for (int64_t i = 0; i < m * n; ++i) yo[i] = c10::Half(yf[i]);
  }
  return y;
}

// 1 when the AVX2 path was compiled in, 0 for the portable scalar path.
int64_t int_gemm_simd() { return QRT_AVX2; }

}  // namespace

#ifndef QRT_LIBRARY
#define QRT_LIBRARY quantrt_cpu  // tests build the portable path once more under another namespace
#endif
TORCH_LIBRARY_FRAGMENT(QRT_LIBRARY, m) {
  m.def("int_gemm(Tensor x, Tensor qs, Tensor scales, Tensor? mins, int bits, Tensor? bias) -> Tensor");
  m.impl("int_gemm", c10::DispatchKey::CPU, &int_gemm);
  m.def("int_gemm_simd() -> int", &int_gemm_simd);
}
