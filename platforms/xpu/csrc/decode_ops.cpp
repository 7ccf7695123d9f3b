// quantrt_cpu decode ops: the small per-layer ops of a CPU decode step, one call each, fp32 math inside.
//
// At batch 1 every torch op of a decode layer moves a few KB, so its cost is dispatch plus OpenMP
// fork/join (on a shared 2-core box a parallel region can cost milliseconds while the other core is
// busy). These ops run small work inline on the calling thread and parallelise (at::parallel_for) only
// past a work threshold. Each computes what the torch path of quantrt's layers computes, with the same
// roundings to the activation dtype at the same points (bf16/fp16: every torch op rounds its output):
//
//   rms_norm(x [R, D], w [D], eps) -> y: fp32 y = x * rstd * w; bf16/fp16 y = rnd(rnd(x * rstd) * w),
//       rstd = 1 / sqrt(mean(x^2) + eps) in fp32 (layers/norm.py, CpuPlatform.rms_norm_op).
//   add_rms_norm(x, delta, w, eps) -> (y, s): s = rnd(x + delta) (the residual add), y = rms_norm(s).
//   act_mul(gu [T, 2I], gelu_tanh) -> rnd(rnd(act(gate)) * up) [T, I], act = silu or gelu-tanh.
//   rope_store_kv(q [T, H, D], k, v [T, Hkv, D], cos, sin [P, D/2], positions [T], k_cache, v_cache
//       [S, Hkv, D], slots [T], kind, k_scale, v_scale) -> q rotated [T, H, D]: neox rotate-half
//       (lo' = rnd(rnd(lo*c) - hi*s), hi' = rnd(rnd(hi*c) + lo*s), as RotaryEmbedding's addcmul), k rotated
//       the same way and written with v at `slots` (kind 0: cast to the cache dtype; 1/2: fp8 e4m3fn/e5m2
//       bits of x / scale, as KVPool.write).
//   decode_attention(q [B, H, D], k_cache, v_cache, k_sc?, v_sc?, kv_slots [B, L], kv_lens [B], scale,
//       window, kind, k_scale, v_scale, sinks?) -> [B, H*D] in q.dtype: one query per sequence over its
//       kv_lens[b] slots (the last `window` of them when window > 0), the G = H/Hkv query heads of a KV
//       head sharing each dequantized K/V row, QK^T, softmax and P.V accumulated in fp32. Pages: kind 0
//       plain fp32/bf16/fp16, 1 fp8 e4m3fn, 2 fp8 e5m2 (uint8 bits, times k/v_scale), 3 fp4 e2m1 (packed
//       codes [S, Hkv, D/2], even element in the low nibble, and one 2^(byte-127) scale per 16 elements of
//       the flattened Hkv*D row in k_sc/v_sc [S, Hkv*D/16], times k/v_scale). sinks [H] fp32: one extra
//       logit per head in the softmax denominator (gpt-oss).
//   decode_stack(x, weights, meta, ...) -> every layer of a plain decoder whose linears are quantrt_cpu::int_gemm
//       weights, composed of the ops above and int_gemm (called through the dispatcher): one call per step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using at::Tensor;

constexpr int64_t kInlineWork = 1 << 18;  // multiply-adds below which an op stays on the calling thread

// ---- element conversion --------------------------------------------------------------------------------
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline float rnd(float v) { return static_cast<float>(T(v)); }  // round through T (round-to-nearest-even)
template <>
inline float rnd<float>(float v) { return v; }

template <typename T>
void load_f32(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#if QRT_AVX2
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
void store_from_f32(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
  }
}

// ---- vector math ---------------------------------------------------------------------------------------
#if QRT_AVX2
// e^x for 8 floats: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (relative error
// < 2e-7 on that interval), 2^n put into the exponent bits. x < -87.3 gives 0, x > 88.7 gives +inf.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7f), lo = _mm256_set1_ps(-87.3f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);   // ln2 split in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // 2^n as two factors so n = 128 (x near 88.7) does not overflow the exponent field
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i half = _mm256_srai_epi32(ni, 1);
  __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  __m256 f2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over);
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if QRT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  int64_t i = 0;
#if QRT_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// y[i] = exp(x[i] - m); returns the sum of y
inline float exp_shift_sum(float* x, float m, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if QRT_AVX2
  __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  s = hsum8(acc);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

// act(g) for a row: silu g / (1 + e^-g), or gelu-tanh 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3),
// tanh(z) = 1 - 2 / (e^(2z) + 1)
inline void act_row(float* g, int64_t n, bool gelu) {
  int64_t i = 0;
#if QRT_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(g + i), y;
    if (gelu) {
      __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                               _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
      __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f),
                                                  _mm256_add_ps(exp8(_mm256_add_ps(z, z)), one)));
      y = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, t));
    } else {
      y = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    }
    _mm256_storeu_ps(g + i, y);
  }
#endif
  for (; i < n; ++i) {
    float x = g[i];
    if (gelu) {
      float z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      g[i] = 0.5f * x * (1.f + std::tanh(z));
    } else {
      g[i] = x / (1.f + std::exp(-x));
    }
  }
}

void check_float(const Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "quantrt_cpu: ", name,
              " must be float32, bfloat16 or float16, got ", s);
  TORCH_CHECK(t.device().is_cpu(), "quantrt_cpu: ", name, " must be a CPU tensor");
}

Tensor rows_of(const Tensor& x, int64_t d) {  // [..., D] -> [R, D] with unit stride along D
  Tensor x2 = x.reshape({-1, d});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kInlineWork / std::max<int64_t>(1, work_per_item));
}

// ---- RMSNorm (optionally after the residual add) ---------------------------------------------------------
template <typename T>
void norm_rows(const Tensor& x2, const Tensor* d2, const Tensor& w, double eps, Tensor& y, Tensor* s) {
  const int64_t rows = x2.size(0), d = x2.size(1);
  const T* wp = w.data_ptr<T>();
  at::parallel_for(0, rows, grain_for(4 * d), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * d);
    float *xr = buf.data(), *wf = buf.data() + d, *dl = buf.data() + 2 * d;
    load_f32(wp, wf, d);
    for (int64_t r = r0; r < r1; ++r) {
      load_f32(x2.data_ptr<T>() + r * x2.stride(0), xr, d);
      if (d2 != nullptr) {
        load_f32(d2->data_ptr<T>() + r * d2->stride(0), dl, d);
        for (int64_t i = 0; i < d; ++i) xr[i] = rnd<T>(xr[i] + dl[i]);
        store_from_f32(xr, s->data_ptr<T>() + r * d, d);
      }
      const float rstd = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + static_cast<float>(eps));
      T* yr = y.data_ptr<T>() + r * d;
      for (int64_t i = 0; i < d; ++i) yr[i] = T(rnd<T>(xr[i] * rstd) * wf[i]);
    }
  });
}

void check_norm(const Tensor& x, const Tensor& w) {
  check_float(x, "x");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "quantrt_cpu rms_norm: weight dtype ", w.scalar_type(),
              " differs from x's ", x.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && x.dim() >= 1 && x.size(-1) == w.size(0),
              "quantrt_cpu rms_norm: weight must be contiguous [D] with D = x.shape[-1]; x ", x.sizes(),
              ", weight ", w.sizes());
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  check_norm(x, w);
  const int64_t d = x.size(-1);
  Tensor x2 = rows_of(x, d);
  Tensor y = at::empty({x2.size(0), d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantrt_rms_norm",
                                  [&] { norm_rows<scalar_t>(x2, nullptr, w, eps, y, nullptr); });
  return y.view(x.sizes());
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& delta, const Tensor& w, double eps) {
  check_norm(x, w);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(),
              "quantrt_cpu add_rms_norm: delta must be like x: x ", x.sizes(), " ", x.scalar_type(), ", delta ",
              delta.sizes(), " ", delta.scalar_type());
  const int64_t d = x.size(-1);
  Tensor x2 = rows_of(x, d), d2 = rows_of(delta, d);
  Tensor y = at::empty({x2.size(0), d}, x.options()), s = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantrt_add_rms_norm",
                                  [&] { norm_rows<scalar_t>(x2, &d2, w, eps, y, &s); });
  return {y.view(x.sizes()), s.view(x.sizes())};
}

// ---- act(gate) * up --------------------------------------------------------------------------------------
Tensor act_mul(const Tensor& gu, bool gelu_tanh) {
  check_float(gu, "gu");
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0,
              "quantrt_cpu act_mul: needs the merged gate_up output [T, 2I], got ", gu.sizes());
  Tensor g2 = gu.stride(1) == 1 ? gu : gu.contiguous();
  const int64_t t = g2.size(0), n = g2.size(1) / 2;
  Tensor out = at::empty({t, n}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "quantrt_act_mul", [&] {
    at::parallel_for(0, t, grain_for(16 * n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(2 * n);
      float *g = buf.data(), *u = buf.data() + n;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = g2.data_ptr<scalar_t>() + r * g2.stride(0);
        load_f32(row, g, n);
        load_f32(row + n, u, n);
        act_row(g, n, gelu_tanh);
        scalar_t* o = out.data_ptr<scalar_t>() + r * n;
        for (int64_t i = 0; i < n; ++i) o[i] = scalar_t(rnd<scalar_t>(g[i]) * u[i]);
      }
    });
  });
  return out;
}

// ---- rotary + KV write -------------------------------------------------------------------------------------
// x [D] -> out [D], neox rotate-half with the table row c, s [D/2] (already fp32), rounded through T
template <typename T>
inline void rotate_row(const float* x, const float* c, const float* s, float* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float lo = x[i], hi = x[i + half];
    out[i] = rnd<T>(rnd<T>(lo * c[i]) + hi * -s[i]);
    out[i + half] = rnd<T>(rnd<T>(hi * c[i]) + lo * s[i]);
  }
}

inline uint8_t fp8_bits(float v, int64_t kind) {
  return kind == 1 ? c10::Float8_e4m3fn(v).x : c10::Float8_e5m2(v).x;
}

// one [D] row (fp32 values already rounded to the compute dtype) into a cache row
template <typename C>
inline void put_row(const float* x, void* dst, int64_t d, int64_t kind, float scale) {
  if (kind == 0) {
    C* p = static_cast<C*>(dst);
    for (int64_t i = 0; i < d; ++i) p[i] = C(x[i]);
  } else {
    uint8_t* p = static_cast<uint8_t*>(dst);
    for (int64_t i = 0; i < d; ++i) p[i] = fp8_bits(x[i] / scale, kind);
  }
}

template <typename T, typename C>
void rope_store_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos, const Tensor& sin,
                     const int64_t* pos, const Tensor& kc, const Tensor& vc, const int64_t* slots, int64_t kind, float ks,
                     float vs, Tensor& qo) {
  const int64_t t = q.size(0), h = q.size(1), hkv = k.size(1), d = q.size(2), half = d / 2;
  const int64_t row_k = hkv * d;  // elements of one cache slot
  const int64_t esz = kc.element_size();
  at::parallel_for(0, t, grain_for(4 * (h + 2 * hkv) * d), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(3 * d);
    float *x = buf.data(), *c = buf.data() + d, *s = c + half, *o = buf.data() + 2 * d;
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t p = pos[i];
      load_f32(cos.data_ptr<T>() + p * cos.stride(0), c, half);
      load_f32(sin.data_ptr<T>() + p * sin.stride(0), s, half);
      for (int64_t j = 0; j < h; ++j) {
        load_f32(q.data_ptr<T>() + i * q.stride(0) + j * q.stride(1), x, d);
        rotate_row<T>(x, c, s, o, half);
        store_from_f32(o, qo.data_ptr<T>() + (i * h + j) * d, d);
      }
      char* kdst = static_cast<char*>(kc.data_ptr()) + slots[i] * row_k * esz;
      char* vdst = static_cast<char*>(vc.data_ptr()) + slots[i] * row_k * esz;
      for (int64_t j = 0; j < hkv; ++j) {
        load_f32(k.data_ptr<T>() + i * k.stride(0) + j * k.stride(1), x, d);
        rotate_row<T>(x, c, s, o, half);
        put_row<C>(o, kdst + j * d * esz, d, kind, ks);
        load_f32(v.data_ptr<T>() + i * v.stride(0) + j * v.stride(1), x, d);
        put_row<C>(x, vdst + j * d * esz, d, kind, vs);
      }
    }
  });
}

Tensor rope_store_kv(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos, const Tensor& sin,
                     const Tensor& positions, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots, int64_t kind,
                     double k_scale, double v_scale) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                  k.size(2) == q.size(2) && q.size(2) % 2 == 0,
              "quantrt_cpu rope_store_kv: q [T, H, D], k and v [T, Hkv, D] with even D; got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(),
              "quantrt_cpu rope_store_kv: q, k, v, cos, sin must share one dtype");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && cos.stride(1) == 1 && sin.stride(1) == 1,
              "quantrt_cpu rope_store_kv: the last dimension of q, k, v, cos, sin must be contiguous");
  const int64_t t = q.size(0), d = q.size(2), hkv = k.size(1);
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == d / 2 && sin.sizes() == cos.sizes(),
              "quantrt_cpu rope_store_kv: cos/sin must be [P, D/2]; got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 2, "quantrt_cpu rope_store_kv: kind ", kind,
              " is not 0 (plain), 1 (fp8 e4m3fn) or 2 (fp8 e5m2)");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == hkv && k_cache.size(2) == d &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "quantrt_cpu rope_store_kv: caches must be contiguous [S, Hkv, D] = [S, ", hkv, ", ", d, "]; got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  if (kind == 0) check_float(k_cache, "k_cache");
  else TORCH_CHECK(k_cache.scalar_type() == at::kByte, "quantrt_cpu rope_store_kv: fp8 caches are uint8 bits");
  Tensor pos = positions.to(at::kLong).contiguous(), sl = slots.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == t && sl.numel() == t, "quantrt_cpu rope_store_kv: positions and slots need ", t,
              " entries");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(pp[i] >= 0 && pp[i] < cos.size(0), "quantrt_cpu rope_store_kv: position ", pp[i],
                " outside the rotary table of ", cos.size(0));
    TORCH_CHECK(sp[i] >= 0 && sp[i] < k_cache.size(0), "quantrt_cpu rope_store_kv: slot ", sp[i],
                " outside the cache of ", k_cache.size(0), " slots");
  }
  Tensor qo = at::empty({t, q.size(1), d}, q.options());
  const float ks = static_cast<float>(k_scale), vs = static_cast<float>(v_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "quantrt_rope_store_kv", [&] {
    using T = scalar_t;
    switch (kind == 0 ? k_cache.scalar_type() : at::kByte) {
      case at::kFloat: rope_store_impl<T, float>(q, k, v, cos, sin, pp, k_cache, v_cache, sp, kind, ks, vs, qo); break;
      case at::kBFloat16:
        rope_store_impl<T, c10::BFloat16>(q, k, v, cos, sin, pp, k_cache, v_cache, sp, kind, ks, vs, qo);
        break;
      case at::kHalf: rope_store_impl<T, c10::Half>(q, k, v, cos, sin, pp, k_cache, v_cache, sp, kind, ks, vs, qo); break;
      default: rope_store_impl<T, uint8_t>(q, k, v, cos, sin, pp, k_cache, v_cache, sp, kind, ks, vs, qo);
    }
  });
  return qo;
}

// ---- paged decode attention ---------------------------------------------------------------------------------
struct Luts {
  float e4m3[256], e5m2[256], e2m1[16];
  Luts() {
    for (int i = 0; i < 256; ++i) {
      e4m3[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
      e5m2[i] = static_cast<float>(c10::Float8_e5m2(static_cast<uint8_t>(i), c10::Float8_e5m2::from_bits()));
    }
    const float mag[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (int i = 0; i < 16; ++i) e2m1[i] = (i & 8) ? -mag[i & 7] : mag[i & 7];
  }
};
const Luts& luts() {
  static const Luts l;
  return l;
}

// one head's [D] row of a cache slot as fp32 (dequantized, times scale for quantized kinds)
struct RowReader {
  const char* base;
  const uint8_t* sc;   // fp4 scale bytes [S, Hkv*D/16]
  int64_t kind, d, hkv, esz;
  at::ScalarType dtype;
  float scale;
  void read(int64_t slot, int64_t head, float* out) const {
    if (kind == 0) {
      const char* p = base + (slot * hkv + head) * d * esz;
      if (dtype == at::kFloat) load_f32(reinterpret_cast<const float*>(p), out, d);
      else if (dtype == at::kBFloat16) load_f32(reinterpret_cast<const c10::BFloat16*>(p), out, d);
      else load_f32(reinterpret_cast<const c10::Half*>(p), out, d);
      return;
    }
    const Luts& L = luts();
    if (kind == 3) {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(base) + (slot * hkv + head) * (d / 2);
      const uint8_t* sb = sc + slot * (hkv * d / 16) + head * d / 16;
      for (int64_t i = 0; i < d; i += 2) {
        const float blk = std::ldexp(1.f, static_cast<int>(sb[i / 16]) - 127);
        out[i] = L.e2m1[p[i / 2] & 15] * blk;
        out[i + 1] = L.e2m1[p[i / 2] >> 4] * blk;
      }
    } else {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(base) + (slot * hkv + head) * d;
      const float* lut = kind == 1 ? L.e4m3 : L.e5m2;
      for (int64_t i = 0; i < d; ++i) out[i] = lut[p[i]];
    }
    if (scale != 1.f)
      for (int64_t i = 0; i < d; ++i) out[i] *= scale;
  }
};

template <typename T>
void attention_impl(const Tensor& q, const RowReader& kr, const RowReader& vr, const Tensor& slots,
                    const int64_t* lens, float scale, int64_t window, const float* sinks, Tensor& out) {
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), hkv = kr.hkv, g = h / hkv, lmax = slots.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  at::parallel_for(0, b * hkv, grain_for(2 * g * lmax * d), [&](int64_t w0, int64_t w1) {
    std::vector<float> qb(g * d), row(d), acc(g * d), sc(g * lmax), inv(g);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t bi = w / hkv, kh = w % hkv, n = lens[bi];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0, len = n - lo;
      for (int64_t j = 0; j < g; ++j) load_f32(q.data_ptr<T>() + bi * q.stride(0) + (kh * g + j) * q.stride(1),
                                               qb.data() + j * d, d);
      const int64_t* srow = sl + bi * slots.stride(0) + lo;
      for (int64_t i = 0; i < len; ++i) {           // scores [G, len]
        kr.read(srow[i], kh, row.data());
        for (int64_t j = 0; j < g; ++j) sc[j * len + i] = dot(qb.data() + j * d, row.data(), d) * scale;
      }
      for (int64_t j = 0; j < g; ++j) {              // softmax over [scores, sink]
        float* s = sc.data() + j * len;
        float m = sinks ? sinks[kh * g + j] : -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < len; ++i) m = std::max(m, s[i]);
        float tot = exp_shift_sum(s, m, len);
        if (sinks) tot += std::exp(sinks[kh * g + j] - m);
        inv[j] = 1.f / tot;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < len; ++i) {            // P.V
        vr.read(srow[i], kh, row.data());
        for (int64_t j = 0; j < g; ++j) axpy(acc.data() + j * d, sc[j * len + i], row.data(), d);
      }
      T* o = out.data_ptr<T>() + bi * h * d + kh * g * d;
      for (int64_t e = 0; e < g * d; ++e) o[e] = T(acc[e] * inv[e / d]);
    }
  });
}

Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const c10::optional<Tensor>& k_sc, const c10::optional<Tensor>& v_sc, const Tensor& kv_slots,
                        const Tensor& kv_lens, double scale, int64_t window, int64_t kind, double k_scale,
                        double v_scale, const c10::optional<Tensor>& sinks) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "quantrt_cpu decode_attention: q must be [B, H, D] with a "
              "contiguous last dimension; got ", q.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 3, "quantrt_cpu decode_attention: kind ", kind,
              " is not 0 (plain), 1 (fp8 e4m3fn), 2 (fp8 e5m2) or 3 (fp4 e2m1)");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "quantrt_cpu decode_attention: caches must be contiguous [S, Hkv, D'] of one dtype; got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t hkv = k_cache.size(1), s = k_cache.size(0);
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "quantrt_cpu decode_attention: ", h, " query heads are not a multiple of ",
              hkv, " KV heads");
  TORCH_CHECK(k_cache.size(2) == (kind == 3 ? d / 2 : d), "quantrt_cpu decode_attention: cache rows of ",
              k_cache.size(2), " do not hold head_dim ", d, " for kind ", kind);
  if (kind == 0) check_float(k_cache, "k_cache");
  else TORCH_CHECK(k_cache.scalar_type() == at::kByte, "quantrt_cpu decode_attention: quantized caches are uint8");
  Tensor ksc, vsc;
  if (kind == 3) {
    TORCH_CHECK(k_sc.has_value() && v_sc.has_value() && d % 16 == 0, "quantrt_cpu decode_attention: fp4 pages "
                "need k_sc/v_sc scale bytes and head_dim divisible by 16");
    ksc = k_sc->contiguous();
    vsc = v_sc->contiguous();
    TORCH_CHECK(ksc.scalar_type() == at::kByte && ksc.dim() == 2 && ksc.size(0) == s && ksc.size(1) == hkv * d / 16 &&
                    vsc.sizes() == ksc.sizes(),
                "quantrt_cpu decode_attention: fp4 scales must be uint8 [S, Hkv*D/16]; got ", ksc.sizes());
  }
  Tensor sl = kv_slots.to(at::kLong).contiguous(), ln = kv_lens.to(at::kLong).contiguous();
  TORCH_CHECK(sl.dim() == 2 && sl.size(0) == b && ln.numel() == b, "quantrt_cpu decode_attention: kv_slots must "
              "be [B, L] and kv_lens [B] for B = ", b, "; got ", sl.sizes(), " and ", ln.sizes());
  const int64_t* lp = ln.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= sl.size(1), "quantrt_cpu decode_attention: kv_lens[", i, "] = ", lp[i],
                " is outside [1, ", sl.size(1), "]");
    for (int64_t j = 0; j < lp[i]; ++j)
      TORCH_CHECK(sp[i * sl.size(1) + j] >= 0 && sp[i * sl.size(1) + j] < s, "quantrt_cpu decode_attention: slot ",
                  sp[i * sl.size(1) + j], " outside the cache of ", s, " slots");
  }
  Tensor sk;
  const float* skp = nullptr;
  if (sinks.has_value()) {
    sk = sinks->to(at::kFloat).contiguous();
    TORCH_CHECK(sk.numel() == h, "quantrt_cpu decode_attention: sinks must hold one logit per query head (", h,
                "); got ", sk.numel());
    skp = sk.data_ptr<float>();
  }
  const int64_t esz = k_cache.element_size();
  RowReader kr{static_cast<const char*>(k_cache.data_ptr()), kind == 3 ? ksc.data_ptr<uint8_t>() : nullptr,
               kind, d, hkv, esz, k_cache.scalar_type(), static_cast<float>(k_scale)};
  RowReader vr{static_cast<const char*>(v_cache.data_ptr()), kind == 3 ? vsc.data_ptr<uint8_t>() : nullptr,
               kind, d, hkv, esz, v_cache.scalar_type(), static_cast<float>(v_scale)};
  Tensor out = at::empty({b, h * d}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "quantrt_decode_attention", [&] {
    attention_impl<scalar_t>(q, kr, vr, sl, lp, static_cast<float>(scale), window, skp, out);
  });
  return out;
}

// ---- the whole decoder stack of one decode step -------------------------------------------------------------
// What quantrt.models.decoder runs per layer for a plain (Llama-style) decoder whose linears are all
// quantrt_cpu::int_gemm weights, with the ops above; one call per step instead of ~10 Python calls per layer.
// weights: per layer kStackW tensors [input_norm w, post_norm w, then (qs, scales, mins, bias) for qkv, o, gate_up,
// down; an absent mins/bias is a 0-element tensor], then the final norm's weight. meta: [L, H, Hkv, D, I] then
// per layer (bits qkv, o, gate_up, down, window). fmeta: per layer (eps_in, eps_post, scale, k_scale, v_scale),
// then the final eps. x [B, hidden] (the embedding rows) -> the final norm's output [B, hidden].
constexpr int64_t kStackW = 18;

using IntGemmFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t,
                         const c10::optional<Tensor>&);

c10::optional<Tensor> present(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<Tensor>(t) : c10::nullopt;
}

Tensor decode_stack(const Tensor& x, at::TensorList weights, at::IntArrayRef meta, at::ArrayRef<double> fmeta,
                    const Tensor& positions, const Tensor& out_slots, const Tensor& kv_slots, const Tensor& kv_lens,
                    const Tensor& cos, const Tensor& sin, at::TensorList k_caches, at::TensorList v_caches,
                    int64_t kind) {
  static const auto gemm = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("quantrt_cpu::int_gemm", "")
                               .typed<IntGemmFn>();
  TORCH_CHECK(meta.size() >= 5, "quantrt_cpu decode_stack: meta needs [L, H, Hkv, D, I, ...]");
  const int64_t nl = meta[0], h = meta[1], hkv = meta[2], d = meta[3];
  TORCH_CHECK(nl >= 1, "quantrt_cpu decode_stack: needs at least one layer");
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == 5 + 5 * nl && static_cast<int64_t>(fmeta.size()) == 5 * nl + 1 &&
                  static_cast<int64_t>(weights.size()) == kStackW * nl + 1 &&
                  static_cast<int64_t>(k_caches.size()) == nl && static_cast<int64_t>(v_caches.size()) == nl,
              "quantrt_cpu decode_stack: ", nl, " layers need ", 5 + 5 * nl, " meta, ", 5 * nl + 1, " fmeta, ",
              kStackW * nl + 1, " weights and ", nl, " K and V caches; got ", meta.size(), ", ", fmeta.size(), ", ",
              weights.size(), ", ", k_caches.size(), ", ", v_caches.size());
  TORCH_CHECK(x.dim() == 2, "quantrt_cpu decode_stack: x must be [B, hidden], got ", x.sizes());
  const int64_t b = x.size(0), qn = h * d, kn = hkv * d;
  Tensor res = x, delta, hid;
  for (int64_t l = 0; l < nl; ++l) {
    const Tensor* w = weights.data() + l * kStackW;
    const int64_t* mi = meta.data() + 5 + 5 * l;
    const double* fm = fmeta.data() + 5 * l;
    auto lin = [&](const Tensor& in, int64_t j) {
      return gemm.call(in, w[2 + 4 * j], w[3 + 4 * j], present(w[4 + 4 * j]), mi[j], present(w[5 + 4 * j]));
    };
    if (l == 0) {
      hid = rms_norm(res, w[0], fm[0]);
    } else {
      std::tie(hid, res) = add_rms_norm(res, delta, w[0], fm[0]);
    }
    Tensor qkv = lin(hid, 0);                                        // [B, (H + 2 Hkv) D]
    Tensor q = qkv.narrow(1, 0, qn).view({b, h, d});
    Tensor k = qkv.narrow(1, qn, kn).view({b, hkv, d});
    Tensor v = qkv.narrow(1, qn + kn, kn).view({b, hkv, d});
    Tensor qr = rope_store_kv(q, k, v, cos, sin, positions, k_caches[l], v_caches[l], out_slots, kind, fm[3], fm[4]);
    Tensor att = decode_attention(qr, k_caches[l], v_caches[l], c10::nullopt, c10::nullopt, kv_slots, kv_lens, fm[2],
                                  mi[4], kind, fm[3], fm[4], c10::nullopt);
    Tensor o = lin(att, 1);
    std::tie(hid, res) = add_rms_norm(res, o, w[1], fm[1]);
    delta = lin(act_mul(lin(hid, 2), false), 3);
  }
  return std::get<0>(add_rms_norm(res, delta, weights[kStackW * nl], fmeta[5 * nl]));
}

int64_t decode_ops_simd() { return QRT_AVX2; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantrt_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
  m.def("act_mul(Tensor gu, bool gelu_tanh) -> Tensor");
  m.impl("act_mul", c10::DispatchKey::CPU, &act_mul);
  m.def("rope_store_kv(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor positions, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, int kind, float k_scale, float v_scale) -> Tensor");
  m.impl("rope_store_kv", c10::DispatchKey::CPU, &rope_store_kv);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_sc, Tensor? v_sc, Tensor kv_slots, "
        "Tensor kv_lens, float scale, int window, int kind, float k_scale, float v_scale, Tensor? sinks) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, &decode_attention);
  m.def("decode_stack(Tensor x, Tensor[] weights, int[] meta, float[] fmeta, Tensor positions, Tensor out_slots, "
        "Tensor kv_slots, Tensor kv_lens, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "int kind) -> Tensor");
  m.impl("decode_stack", c10::DispatchKey::CPU, &decode_stack);
  m.def("decode_ops_simd() -> int", &decode_ops_simd);
}
