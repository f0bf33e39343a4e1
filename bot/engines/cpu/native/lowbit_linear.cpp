// quantbot::int4_linear: y = x @ W^T on the CPU for 4-bit weights with a scale and an offset per group of inputs,
// W[n, k] = q[n, k] * scale[n, k / group] + offset[n, k / group], for groups of 32 or a multiple of 64 inputs. Written for one-token decoding (x has one row),
// where torch's own int4 kernel is compute-bound on AVX2; several rows work too, one after the other.
//
// qweight is uint8 [N, K / 2]. Each run of 64 inputs takes 32 bytes, read as eight 32-bit lanes: lane l holds, in
// nibble p, the code of input 8 * p + l. One shift and one mask then give eight codes that line up with eight
// consecutive inputs, with no shuffles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 64;  // inputs per 32 packed bytes
constexpr int64_t ROWS_PER_TASK = 32;  // outputs one thread takes at a time

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows of x (row stride K) times packed row `q`: y[r * N] = sum_k x[r, k] * W[k]. Each block's codes are
// unpacked once and used for all R rows; each half block (32 inputs) takes its group's scale.
template <int R>
inline void dot_rows(const uint8_t* q, const float* x, const float* xsum, const float* scale, const float* offset,
                     int64_t K, int64_t group_size, float* y, int64_t N) {
  const int64_t G = K / group_size;
  const __m256i mask = _mm256_set1_epi32(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K; b += BLOCK) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b / 2));
    __m256 c[8];
    for (int p = 0; p < 8; ++p) c[p] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * p), mask));
    const __m256 s_lo = _mm256_set1_ps(scale[b / group_size]), s_hi = _mm256_set1_ps(scale[(b + 32) / group_size]);
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b;
      __m256 lo = _mm256_mul_ps(c[0], _mm256_loadu_ps(xb)), hi = _mm256_mul_ps(c[4], _mm256_loadu_ps(xb + 32));
      for (int p = 1; p < 4; ++p) {
        lo = _mm256_fmadd_ps(c[p], _mm256_loadu_ps(xb + 8 * p), lo);
        hi = _mm256_fmadd_ps(c[p + 4], _mm256_loadu_ps(xb + 32 + 8 * p), hi);
      }
      acc[r] = _mm256_fmadd_ps(hi, s_hi, _mm256_fmadd_ps(lo, s_lo, acc[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    float total = hsum(acc[r]);
    for (int64_t g = 0; g < G; ++g) total += offset[g] * xsum[r * G + g];
    y[r * N] = total;
  }
}
#endif

// Rows m0..m0+R of x times packed rows n0..n1 (group size 32 or a multiple of 64), into y[m * N + n].
template <int R>
void tile(const uint8_t* q, const float* x, const float* xsum, const float* scale, const float* offset, int64_t m0,
          int64_t n0, int64_t n1, int64_t K, int64_t group_size, float* y, int64_t N) {
  const int64_t G = K / group_size;
  for (int64_t n = n0; n < n1; ++n) {
#if defined(__AVX2__) && defined(__FMA__)
    dot_rows<R>(q + n * (K / 2), x + m0 * K, xsum + m0 * G, scale + n * G, offset + n * G, K, group_size,
                y + m0 * N + n, N);
#else
    for (int64_t m = m0; m < m0 + R; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) total += offset[n * G + g] * xsum[m * G + g];
      for (int64_t b = 0; b < K; b += BLOCK) {
        const uint8_t* qb = q + n * (K / 2) + b / 2;
        for (int l = 0; l < 8; ++l) {
          const uint32_t lane = uint32_t(qb[4 * l]) | uint32_t(qb[4 * l + 1]) << 8 | uint32_t(qb[4 * l + 2]) << 16 |
                                uint32_t(qb[4 * l + 3]) << 24;
          for (int p = 0; p < 8; ++p) {
            const int64_t k = b + 8 * p + l;
            total += float((lane >> (4 * p)) & 0x0F) * x[m * K + k] * scale[n * G + k / group_size];
          }
        }
      }
      y[m * N + n] = total;
    }
#endif
  }
}

template <typename T>
void run(const T* x_in, T* y_out, int64_t M, int64_t N, int64_t K, int64_t group_size, const uint8_t* q,
         const float* scale, const float* offset) {
  const int64_t G = K / group_size;
  std::vector<float> x(M * K), xsum(M * G, 0.f), y(M * N);
  for (int64_t i = 0; i < M * K; ++i) x[i] = static_cast<float>(x_in[i]);
  for (int64_t i = 0; i < M * K; ++i) xsum[i / group_size] += x[i];
  // Each thread takes a run of output rows; within it, four input rows at a time meet every weight row of the
  // run, so both stay in cache for a long prompt.
  at::parallel_for(0, N, ROWS_PER_TASK, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<4>(q, x.data(), xsum.data(), scale, offset, m, n0, n1, K, group_size, y.data(), N);
    switch (M - m) {
      case 3: tile<3>(q, x.data(), xsum.data(), scale, offset, m, n0, n1, K, group_size, y.data(), N); break;
      case 2: tile<2>(q, x.data(), xsum.data(), scale, offset, m, n0, n1, K, group_size, y.data(), N); break;
      case 1: tile<1>(q, x.data(), xsum.data(), scale, offset, m, n0, n1, K, group_size, y.data(), N); break;
      default: break;
    }
  });
  for (int64_t i = 0; i < M * N; ++i) y_out[i] = static_cast<T>(y[i]);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "int4_linear runs on the CPU");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous uint8 [N, K / 2]");
  TORCH_CHECK(group_size == 32 || (group_size > 0 && group_size % BLOCK == 0),
              "the group size must be 32 or a multiple of 64");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = K / group_size;
  TORCH_CHECK(x.size(-1) == K && K % group_size == 0 && K % BLOCK == 0, "the input width does not match the weight");
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == at::IntArrayRef({N, G}),
                "scales and offsets must be contiguous float32 [N, K / group_size]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.numel() / K;
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  if (x.scalar_type() == at::kFloat)
    run(xc.data_ptr<float>(), y.data_ptr<float>(), M, N, K, group_size, qweight.data_ptr<uint8_t>(),
        scales.data_ptr<float>(), offsets.data_ptr<float>());
  else
    run(xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N, K, group_size, qweight.data_ptr<uint8_t>(),
        scales.data_ptr<float>(), offsets.data_ptr<float>());
  return y;
}

// quantbot::int8_linear: y = x @ W^T with W[n, k] = q[n, k] * scale[n, k / 32], int8 codes (the layout of GGUF's
// Q8_0, which is where the embedded model's output head comes from). qweight is int8 [N, K]; each run of 32 inputs
// is eight 32-bit lanes: lane l holds, in byte p, the code of input 8 * p + l. R rows of x meet each weight row:
// its codes are widened once for all R (a batch of replies reads the head once per step, not once per reply).
template <int R>
inline void int8_rows(const int8_t* q, const float* x, const float* scale, int64_t K, float* y, int64_t N) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K; b += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b));
    const __m256 s = _mm256_set1_ps(scale[b / 32]);
    const __m256 c0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24)), s);
    const __m256 c1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24)), s);
    const __m256 c2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24)), s);
    const __m256 c3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24)), s);
    for (int r = 0; r < R; ++r) {
      const float* xb = x + r * K + b;
      __m256 a = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xb), acc[r]);
      a = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xb + 8), a);
      a = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xb + 16), a);
      acc[r] = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xb + 24), a);
    }
  }
  for (int r = 0; r < R; ++r) y[r * N] = hsum(acc[r]);
#else
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < K; b += 32) {
      float part = 0.f;
      for (int l = 0; l < 8; ++l)
        for (int p = 0; p < 4; ++p) part += float(q[b + 4 * l + p]) * x[r * K + b + 8 * p + l];
      total += part * scale[b / 32];
    }
    y[r * N] = total;
  }
#endif
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "int8_linear runs on the CPU");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(K % 32 == 0 && x.size(-1) == K, "the input width must match the weight and be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.sizes() == at::IntArrayRef({N, K / 32}),
              "scales must be contiguous float32 [N, K / 32]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  const float *xp = xf.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = qp + n * K;
      const float* sn = sp + n * (K / 32);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) int8_rows<4>(qn, xp + m * K, sn, K, yp + m * N + n, N);
      switch (M - m) {
        case 3: int8_rows<3>(qn, xp + m * K, sn, K, yp + m * N + n, N); break;
        case 2: int8_rows<2>(qn, xp + m * K, sn, K, yp + m * N + n, N); break;
        case 1: int8_rows<1>(qn, xp + m * K, sn, K, yp + m * N + n, N); break;
        default: break;
      }
    }
  });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes).to(x.scalar_type());
}

// quantbot::int4pack_weight: the bf16 weight, transposed to [K, N], of a layer packed for torch's
// _weight_int4pack_mm_for_cpu (qweight uint8 [N, K / 2], scales_and_zeros bf16 [K / group, N, 2]). A long prompt
// runs faster as this plus one bf16 matmul than through torch's int4 kernel, which unpacks the weight again for
// every four rows (measured 5.7 against 0.9 ms for 245 rows of a 576 x 3072 layer). torch packs `block` outputs a
// block, 64 with AVX-512 and 32 with AVX2 (the caller finds out which from torch's own packing): byte k * block / 2
// + i of block b holds output block * b + i of input k (low nibble) and output block * b + block / 2 + i (high);
// W = (code - 8) * scale + zero. The caller checks this layout against torch's kernel (cpu/int4.py).
at::Tensor int4pack_weight(const at::Tensor& qweight, const at::Tensor& scales_and_zeros, int64_t group_size,
                           int64_t block) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
              qweight.is_contiguous(), "qweight must be contiguous uint8 [N, K / 2] on the CPU");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, half = block / 2;
  TORCH_CHECK(block == 32 || block == 64, "torch packs blocks of 32 or 64 outputs");
  TORCH_CHECK(N % block == 0 && group_size > 0 && K % group_size == 0, "N must be a multiple of the block, K of the "
              "group");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
              scales_and_zeros.sizes() == at::IntArrayRef({K / group_size, N, 2}),
              "scales_and_zeros must be contiguous bfloat16 [K / group_size, N, 2]");
  at::Tensor w = at::empty({K, N}, qweight.options().dtype(at::kBFloat16));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const at::BFloat16* sz = scales_and_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    std::vector<float> scale(N), offset(N);
    int64_t group = -1;
    for (int64_t k = k0; k < k1; ++k) {
      if (k / group_size != group) {
        group = k / group_size;
        for (int64_t n = 0; n < N; ++n) {
          scale[n] = static_cast<float>(sz[(group * N + n) * 2]);
          offset[n] = static_cast<float>(sz[(group * N + n) * 2 + 1]) - 8.f * scale[n];
        }
      }
      at::BFloat16* row = out + k * N;
      for (int64_t b = 0; b < N / block; ++b) {
        const uint8_t* src = q + b * half * K + k * half;
        const float *s = scale.data() + b * block, *o = offset.data() + b * block;
        at::BFloat16* dst = row + b * block;
        for (int64_t i = 0; i < half; ++i) {
          dst[i] = static_cast<at::BFloat16>(static_cast<float>(src[i] & 15) * s[i] + o[i]);
          dst[i + half] = static_cast<at::BFloat16>(static_cast<float>(src[i] >> 4) * s[i + half] + o[i + half]);
        }
      }
    }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY(quantbot, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4pack_weight(Tensor qweight, Tensor scales_and_zeros, int group_size, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantbot, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4pack_weight", &int4pack_weight);
}
