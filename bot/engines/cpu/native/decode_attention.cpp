// quantbot::decode_attention: one query per row against that row's KV cache, grouped-query, in one call per layer.
//
// A batch's decode step otherwise runs attention as two bf16 matmuls per layer (query x keys, probabilities x
// values): 60 calls a step on SmolLM2, each ~75 us of set-up around a few thousand multiply-adds (4.4 ms of a
// ~27 ms batch-8 step on a 2-core Zen 4, profiled). Here each (row, key/value head) is one task: the query heads
// sharing that key/value head read each cached key and value once, scores and softmax stay in float32, and masked
// columns (left padding, room not yet written) are skipped.
//
// query [B, H, 1, D], key and value [B, Hkv, L, D] (contiguous), mask bool [B, L] (True: a real token) or none;
// float32 or bfloat16, all alike. Returns [B, 1, H, D], the layout the model's output projection reads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define DA_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

namespace {

constexpr int64_t MAX_GROUPS = 8;  // query heads per key/value head
constexpr int64_t MAX_DIM = 256;   // head size (a multiple of 16)

bool avx512_here() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

#if defined(__x86_64__)
DA_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
DA_TARGET inline __m512 load16(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

DA_TARGET inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
DA_TARGET inline void store16(at::BFloat16* p, __m512 v) {  // nearest, ties to even, as torch rounds
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) as 2^n times a degree-6 polynomial of the fraction,
// relative error ~1e-7; -inf (a masked column) gives 0.
DA_TARGET inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // in [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512 e = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ), e);
}

// One (row, key/value head): its G query heads against its L cached positions.
template <typename T>
DA_TARGET void attend(const T* q, const T* k, const T* v, const bool* mask, int64_t G, int64_t L, int64_t D,
                      float scale, T* out, int64_t out_stride) {
  const int64_t C = D / 16;
  __m512 query[MAX_GROUPS][MAX_DIM / 16];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) query[g][c] = _mm512_mul_ps(load16(q + g * D + 16 * c), _mm512_set1_ps(scale));
  std::vector<float> scores(G * L + 16);
  const float minus_inf = -std::numeric_limits<float>::infinity();
  // 1. scores: every key read once for all G query heads
  for (int64_t t = 0; t < L; ++t) {
    if (mask != nullptr && !mask[t]) {
      for (int64_t g = 0; g < G; ++g) scores[g * L + t] = minus_inf;
      continue;
    }
    __m512 key[MAX_DIM / 16];
    for (int64_t c = 0; c < C; ++c) key[c] = load16(k + t * D + 16 * c);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(query[g][0], key[0]);
      for (int64_t c = 1; c < C; ++c) acc = _mm512_fmadd_ps(query[g][c], key[c], acc);
      scores[g * L + t] = _mm512_reduce_add_ps(acc);
    }
  }
  // 2. softmax per query head, in place (probabilities; a row with nothing unmasked gets zeros)
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * L;
    float peak = minus_inf;
    for (int64_t t = 0; t < L; ++t) peak = std::max(peak, s[t]);
    if (peak == minus_inf) {
      for (int64_t t = 0; t < L; ++t) s[t] = 0.f;
      continue;
    }
    int64_t t = 0;
    for (; t + 16 <= L; t += 16)
      _mm512_storeu_ps(s + t, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(peak))));
    const __mmask16 tail = static_cast<__mmask16>((1u << (L - t)) - 1u);
    if (tail)
      _mm512_mask_storeu_ps(s + t, tail,
                            exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), _mm512_set1_ps(peak))));
    // Summed in column order, one by one: the masked columns add exact zeros, so a row's sum (and its reply) is
    // the same whatever padding the batch gives it (lanes of 16 would group its columns by their alignment).
    float total = 0.f;
    for (int64_t u = 0; u < L; ++u) total += s[u];
    const float inverse = 1.f / total;
    for (int64_t u = 0; u < L; ++u) s[u] *= inverse;
  }
  // 3. values: every value read once for all G query heads
  __m512 acc[MAX_GROUPS][MAX_DIM / 16];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    if (mask != nullptr && !mask[t]) continue;
    __m512 value[MAX_DIM / 16];
    for (int64_t c = 0; c < C; ++c) value[c] = load16(v + t * D + 16 * c);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * L + t]);
      for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, value[c], acc[g][c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) store16(out + g * out_stride + 16 * c, acc[g][c]);
}
#endif

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(avx512_here(), "decode_attention needs AVX-512");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes() && query.size(2) == 1,
              "query [B, H, 1, D], key and value [B, Hkv, L, D]");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3), Hkv = key.size(1), L = key.size(2);
  TORCH_CHECK(key.size(0) == B && key.size(3) == D && Hkv > 0 && H % Hkv == 0 && H / Hkv <= MAX_GROUPS,
              "the query's heads must group over the key/value heads (at most 8 a group)");
  TORCH_CHECK(D % 16 == 0 && D <= MAX_DIM, "the head size must be a multiple of 16, at most 256");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type() &&
              (key.scalar_type() == at::kFloat || key.scalar_type() == at::kBFloat16),
              "query, key and value must all be float32 or all bfloat16");
  TORCH_CHECK(key.is_contiguous() && value.is_contiguous(), "key and value must be contiguous");
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->reshape({B, -1}).contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.size(1) >= L, "the mask must be bool [B, >= L]");
  }
  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty({B, 1, H, D}, query.options());
#if defined(__x86_64__)
  const int64_t G = H / Hkv;
  const float s = static_cast<float>(scale);
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv;
        const bool* row_mask = mask.has_value() ? m.data_ptr<bool>() + b * m.size(1) : nullptr;
        attend(qp + (b * H + h * G) * D, kp + i * L * D, vp + i * L * D, row_mask, G, L, D, s,
               op + (b * H + h * G) * D, D);
      }
    });
  };
  if (key.scalar_type() == at::kFloat)
    run(q.data_ptr<float>(), key.data_ptr<float>(), value.data_ptr<float>(), out.data_ptr<float>());
  else
    run(q.data_ptr<at::BFloat16>(), key.data_ptr<at::BFloat16>(), value.data_ptr<at::BFloat16>(),
        out.data_ptr<at::BFloat16>());
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantbot, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantbot, CPU, m) { m.impl("decode_attention", &decode_attention); }
