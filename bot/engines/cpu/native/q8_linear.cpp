// Low-bit weights times 8-bit activations through AVX512-VNNI (or, for int4 weights, AVX2), for batches of decode
// rows.
//
// torch's int4 kernel, and our fp32 one, widen every weight code to float and multiply in fp32: at 8 rows a decode
// step is compute-bound (8 rows cost ~2.5x one row on a 2-core Zen 4). Here, as llama.cpp does for its Q4/Q8
// formats, each row of x is quantized to int8 with one scale per 32 inputs (Q8_0), and VPDPBUSD multiplies 64
// unsigned weight codes by 64 signed activation codes per instruction, summing in int32: four times the work of an
// fp32 FMA per instruction. The codes are widened from nibbles once per tile for every row of the batch.
//
// Layout (16 outputs a tile, so one 512-bit register holds 16 int32 sums, one per output):
//   quantbot::int4_linear_q8: qweight uint8 [N / 16, K / 8, 64]; byte 4 * l + j of chunk c holds, for output
//     16 * t + l, input 8 * c + j in its low nibble and input 8 * c + 4 + j in its high one. scales and zeros
//     bfloat16 [N / 16, K / group, 16]: W[n, k] = (code - 8) * scale + zero, torch's own terms for its int4 kernel,
//     so both hold the same W in as many bytes (with groups of 32, float32 terms would add half again to the codes'
//     bytes, and one row's matmul only streams memory). Groups are multiples of 32 inputs.
//   quantbot::int8_linear_q8: qweight uint8 [N / 16, K / 4, 64]; byte 4 * l + j of chunk c holds code + 128 of
//     output 16 * t + l, input 4 * c + j. scales float32 [N / 16, K / 32, 16]: W[n, k] = code * scale.
// An activation code times an unsigned weight code: the +128 of the int8 weights comes back out as 128 times the
// row's sum of codes per block, a per-row number, so nothing per weight is stored twice.
//
// Without VNNI, on AVX2, the int4 kernel does what llama.cpp's AVX2 Q4 x Q8 dot product does: VPMADDUBSW multiplies
// 32 weight codes by 32 activation codes and adds neighbours into 16-bit sums (at most 2 * 15 * 127 each, so a block
// of 32 inputs sums to at most 30,480 in 16 bits), and one VPMADDWD per block widens them to int32. A tile is done
// as two halves of 8 outputs (a 256-bit register), 4 rows a pass (16 registers). The int8 head stays on VNNI: its
// unsigned codes reach 255, and VPMADDUBSW would saturate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define QB_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define QB_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace {

constexpr int64_t TILE = 16;       // outputs per register
constexpr int64_t QBLOCK = 32;     // activation inputs per scale (Q8_0)
constexpr int MAX_ROWS = 8;        // rows one pass keeps in registers
constexpr int AVX2_MAX_ROWS = 4;   // the same with 16 registers
constexpr int64_t TILES_PER_TASK = 4;

// Set by quantbot::q8_avx2_only: the AVX2 path on a VNNI CPU too, so that tests cover both paths on either host.
std::atomic<bool> avx2_only{false};

bool vnni_here() {
#if defined(__x86_64__)
  if (avx2_only.load(std::memory_order_relaxed)) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool avx2_here() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// x [M, K] as int8 codes with a scale per 32 inputs; also, per group of weights, what x sums to in it (for the
// weights' offsets and the int8 weights' +128): each block's code sum times its scale, summed over the group.
struct Quantized {
  std::vector<int8_t> codes;
  std::vector<float> scale;  // [M, K / 32]
  std::vector<float> sum;    // [M, K / group]
};

#if defined(__x86_64__)
// 16 bfloat16 values as float32 (a bf16 is the top half of a float32).
QB_TARGET inline __m512 load_bf16(const at::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

QB_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
QB_TARGET inline __m512 load16(const at::BFloat16* p) { return load_bf16(p); }

QB_TARGET inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// Rounded to the nearest bf16, ties to even, as torch rounds.
QB_TARGET inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// Each run of 32 inputs of x [M, K]: scale = max |x| / 127, codes = x / scale rounded to the nearest (ties to even).
template <typename T>
QB_TARGET Quantized quantize(const T* x, int64_t M, int64_t K, int64_t group_size) {
  const int64_t per_group = group_size / QBLOCK;
  Quantized q{std::vector<int8_t>(M * K), std::vector<float>(M * K / QBLOCK), std::vector<float>(M * K / group_size)};
  for (int64_t b = 0; b < M * K / QBLOCK; ++b) {
    const __m512 lo = load16(x + b * QBLOCK), hi = load16(x + b * QBLOCK + 16);
    const float peak = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inverse = _mm512_set1_ps(peak > 127.f / FLT_MAX ? 127.f / peak : 0.f);  // (zeros: all codes 0)
    const __m512i c_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
    const __m512i c_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + b * QBLOCK), _mm512_cvtsepi32_epi8(c_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q.codes.data() + b * QBLOCK + 16), _mm512_cvtsepi32_epi8(c_hi));
    q.scale[b] = peak / 127.f;
    q.sum[b / per_group] += q.scale[b] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(c_lo, c_hi)));
  }
  return q;
}

// Four activation codes as one int32, for a broadcast to every lane.
inline int32_t four_codes(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

QB_TARGET inline __m512i broadcast4(const int8_t* p) { return _mm512_set1_epi32(four_codes(p)); }

// R rows (from row m0) times one tile of int4 weights: y[m, 16 t .. 16 t + 16]. Per group and row, the float work is
// four instructions beside the group's eight VPDPBUSD (it was nine, with scalar sums, and took longer than they did).
template <int R, typename Out>
QB_TARGET void int4_tile(const uint8_t* qt, const at::BFloat16* st, const at::BFloat16* zt, const Quantized& x,
                         int64_t m0, int64_t K, int64_t group_size, Out* y, int64_t N, int64_t n0) {
  const int64_t G = K / group_size, B = K / QBLOCK, per_group = group_size / QBLOCK;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int8_t* codes = x.codes.data() + m0 * K;
  const float *xscale = x.scale.data() + m0 * B, *xsum = x.sum.data() + m0 * G;
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 gacc[R];
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i iacc[R];
      for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
      for (int c = 0; c < QBLOCK / 8; ++c) {
        const int64_t k = b * QBLOCK + 8 * c;
        const __m512i w = _mm512_loadu_si512(qt + (k / 8) * 64);
        const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        for (int r = 0; r < R; ++r) {
          iacc[r] = _mm512_dpbusd_epi32(iacc[r], lo, broadcast4(codes + r * K + k));
          iacc[r] = _mm512_dpbusd_epi32(iacc[r], hi, broadcast4(codes + r * K + k + 4));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 part = _mm512_cvtepi32_ps(iacc[r]), sx = _mm512_set1_ps(xscale[r * B + b]);
        gacc[r] = b == g * per_group ? _mm512_mul_ps(part, sx) : _mm512_fmadd_ps(part, sx, gacc[r]);
      }
    }
    const __m512 s = load_bf16(st + g * TILE);
    const __m512 o = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.f), load_bf16(zt + g * TILE));  // zero - 8 * scale
    for (int r = 0; r < R; ++r)
      out[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xsum[r * G + g]), _mm512_fmadd_ps(gacc[r], s, out[r]));
  }
  for (int r = 0; r < R; ++r) store16(y + (m0 + r) * N + n0, out[r]);
}

// R rows times one tile of int8 weights (stored + 128).
template <int R, typename Out>
QB_TARGET void int8_tile(const uint8_t* qt, const float* st, const Quantized& x, int64_t m0, int64_t K, Out* y,
                         int64_t N, int64_t n0) {
  const int64_t B = K / QBLOCK;
  const int8_t* codes = x.codes.data() + m0 * K;
  const float *xscale = x.scale.data() + m0 * B, *xsum = x.sum.data() + m0 * B;
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i iacc[R];
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
    for (int c = 0; c < QBLOCK / 4; ++c) {
      const int64_t k = b * QBLOCK + 4 * c;
      const __m512i w = _mm512_loadu_si512(qt + k * TILE);
      for (int r = 0; r < R; ++r) iacc[r] = _mm512_dpbusd_epi32(iacc[r], w, broadcast4(codes + r * K + k));
    }
    const __m512 s = _mm512_loadu_ps(st + b * TILE);
    for (int r = 0; r < R; ++r) {
      const __m512 part = _mm512_fmsub_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_set1_ps(xscale[r * B + b]),
                                          _mm512_set1_ps(128.f * xsum[r * B + b]));
      out[r] = _mm512_fmadd_ps(part, s, out[r]);
    }
  }
  for (int r = 0; r < R; ++r) store16(y + (m0 + r) * N + n0, out[r]);
}

// --- AVX2 (no VNNI): int4 weights only ---

// quantize() without AVX-512: the same codes (round to nearest even, as _mm512_cvtps_epi32 does) and sums.
template <typename T>
QB_AVX2 Quantized quantize_avx2(const T* x, int64_t M, int64_t K, int64_t group_size) {
  const int64_t per_group = group_size / QBLOCK;
  Quantized q{std::vector<int8_t>(M * K), std::vector<float>(M * K / QBLOCK), std::vector<float>(M * K / group_size)};
  for (int64_t b = 0; b < M * K / QBLOCK; ++b) {
    float v[QBLOCK], peak = 0.f;
    for (int64_t i = 0; i < QBLOCK; ++i) {
      v[i] = static_cast<float>(x[b * QBLOCK + i]);
      peak = std::max(peak, std::fabs(v[i]));
    }
    const float inverse = peak > 127.f / FLT_MAX ? 127.f / peak : 0.f;
    int32_t total = 0;
    for (int64_t i = 0; i < QBLOCK; ++i) {
      const int32_t c = static_cast<int32_t>(std::max(-128.f, std::min(127.f, std::nearbyint(v[i] * inverse))));
      q.codes[b * QBLOCK + i] = static_cast<int8_t>(c);
      total += c;
    }
    q.scale[b] = peak / 127.f;
    q.sum[b / per_group] += q.scale[b] * static_cast<float>(total);
  }
  return q;
}

QB_AVX2 inline __m256 load_bf16_8(const at::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

template <typename Out>
QB_AVX2 inline void store8(Out* p, __m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<Out>(f[i]);  // bf16: rounded to nearest even, as torch rounds
}

QB_AVX2 inline __m256i broadcast4_avx2(const int8_t* p) { return _mm256_set1_epi32(four_codes(p)); }

// R rows (from row m0) times one tile of int4 weights, 8 outputs (half h of the tile's 16) at a time.
template <int R, typename Out>
QB_AVX2 void int4_tile_avx2(const uint8_t* qt, const at::BFloat16* st, const at::BFloat16* zt, const Quantized& x,
                            int64_t m0, int64_t K, int64_t group_size, Out* y, int64_t N, int64_t n0) {
  const int64_t G = K / group_size, B = K / QBLOCK, per_group = group_size / QBLOCK;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int8_t* codes = x.codes.data() + m0 * K;
  const float *xscale = x.scale.data() + m0 * B, *xsum = x.sum.data() + m0 * G;
  for (int h = 0; h < 2; ++h) {
    __m256 out[R];
    for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256 gacc[R];
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        __m256i sums[R];  // 16-bit sums of neighbouring products: 8 VPMADDUBSW a block stay below 2^15
        for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
        for (int c = 0; c < QBLOCK / 8; ++c) {
          const int64_t k = b * QBLOCK + 8 * c;
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt + (k / 8) * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
          for (int r = 0; r < R; ++r) {
            sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(lo, broadcast4_avx2(codes + r * K + k)));
            sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(hi, broadcast4_avx2(codes + r * K + k + 4)));
          }
        }
        for (int r = 0; r < R; ++r) {
          const __m256 part = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
          const __m256 sx = _mm256_set1_ps(xscale[r * B + b]);
          gacc[r] = b == g * per_group ? _mm256_mul_ps(part, sx) : _mm256_fmadd_ps(part, sx, gacc[r]);
        }
      }
      const __m256 s = load_bf16_8(st + g * TILE + 8 * h);
      const __m256 o = _mm256_fmadd_ps(s, _mm256_set1_ps(-8.f), load_bf16_8(zt + g * TILE + 8 * h));
      for (int r = 0; r < R; ++r)
        out[r] = _mm256_fmadd_ps(o, _mm256_set1_ps(xsum[r * G + g]), _mm256_fmadd_ps(gacc[r], s, out[r]));
    }
    for (int r = 0; r < R; ++r) store8(y + (m0 + r) * N + n0 + 8 * h, out[r]);
  }
}

// Every tile for every row, eight rows at a time (a tile's weights stay in cache between the passes).
template <typename Tile>
void over_tiles(int64_t M, int64_t N, const Tile& tile, int64_t max_rows = MAX_ROWS) {
  at::parallel_for(0, N / TILE, TILES_PER_TASK, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = 0; m < M; m += max_rows) tile(t, m, std::min<int64_t>(max_rows, M - m));
  });
}

#define QB_DISPATCH(rows, call) \
  switch (rows) {               \
    case 1: call(1); break;     \
    case 2: call(2); break;     \
    case 3: call(3); break;     \
    case 4: call(4); break;     \
    case 5: call(5); break;     \
    case 6: call(6); break;     \
    case 7: call(7); break;     \
    default: call(8); break;    \
  }

#define QB_DISPATCH4(rows, call) \
  switch (rows) {                \
    case 1: call(1); break;      \
    case 2: call(2); break;      \
    case 3: call(3); break;      \
    default: call(4); break;     \
  }
#endif

at::Tensor checked_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "the q8 kernels run on the CPU");
  TORCH_CHECK(x.size(-1) == K, "the input width does not match the weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  return x.reshape({-1, K}).contiguous();
}

// f(x, y) on x's and y's data as float32 or bfloat16 (checked_rows allows just these).
template <typename F>
void with_rows(const at::Tensor& x2, at::Tensor& y, const F& f) {
  if (x2.scalar_type() == at::kFloat)
    f(x2.data_ptr<float>(), y.data_ptr<float>());
  else
    f(x2.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
}

// The output, in x's shape but N wide and in x's dtype (written by the kernel itself: no conversion pass).
at::Tensor output_for(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options());
}

at::Tensor int4_linear_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros, int64_t group_size) {
  const bool vnni = vnni_here();
  TORCH_CHECK(vnni || avx2_here(), "int4_linear_q8 needs AVX512-VNNI or AVX2");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(2) == 64 &&
              qweight.is_contiguous(), "qweight must be contiguous uint8 [N / 16, K / 8, 64]");
  const int64_t N = qweight.size(0) * TILE, K = qweight.size(1) * 8;
  TORCH_CHECK(group_size > 0 && group_size % QBLOCK == 0 && K % group_size == 0, "groups must be multiples of 32");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() &&
                t->sizes() == at::IntArrayRef({N / TILE, G, TILE}),
                "scales and zeros must be bfloat16 [N / 16, G, 16]");
  const at::Tensor x2 = checked_rows(x, K);
  const int64_t M = x2.size(0);
  at::Tensor y = output_for(x, N);
#if defined(__x86_64__)
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const at::BFloat16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  with_rows(x2, y, [&](const auto* xp, auto* yp) {
#define QB_INT4(R) \
  int4_tile<R>(qw + t * (K / 8) * 64, sp + t * G * TILE, zp + t * G * TILE, q, m, K, group_size, yp, N, t * TILE)
#define QB_INT4_AVX2(R) \
  int4_tile_avx2<R>(qw + t * (K / 8) * 64, sp + t * G * TILE, zp + t * G * TILE, q, m, K, group_size, yp, N, t * TILE)
    if (vnni) {
      const Quantized q = quantize(xp, M, K, group_size);
      over_tiles(M, N, [&](int64_t t, int64_t m, int64_t rows) { QB_DISPATCH(rows, QB_INT4) });
    } else {
      const Quantized q = quantize_avx2(xp, M, K, group_size);
      over_tiles(M, N, [&](int64_t t, int64_t m, int64_t rows) { QB_DISPATCH4(rows, QB_INT4_AVX2) }, AVX2_MAX_ROWS);
    }
#undef QB_INT4
#undef QB_INT4_AVX2
  });
#endif
  return y;
}

at::Tensor int8_linear_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(vnni_here(), "int8_linear_q8 needs AVX512-VNNI");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(2) == 64 &&
              qweight.is_contiguous(), "qweight must be contiguous uint8 [N / 16, K / 4, 64]");
  const int64_t N = qweight.size(0) * TILE, K = qweight.size(1) * 4;
  TORCH_CHECK(K % QBLOCK == 0, "the input width must be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
              scales.sizes() == at::IntArrayRef({N / TILE, K / QBLOCK, TILE}),
              "scales must be float32 [N / 16, K / 32, 16]");
  const at::Tensor x2 = checked_rows(x, K);
  const int64_t M = x2.size(0);
  at::Tensor y = output_for(x, N);
#if defined(__x86_64__)
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  with_rows(x2, y, [&](const auto* xp, auto* yp) {
    const Quantized q = quantize(xp, M, K, QBLOCK);
    over_tiles(M, N, [&](int64_t t, int64_t m, int64_t rows) {
#define QB_INT8(R) int8_tile<R>(qw + t * (K / 4) * 64, sp + t * (K / QBLOCK) * TILE, q, m, K, yp, N, t * TILE)
      QB_DISPATCH(rows, QB_INT8)
#undef QB_INT8
    });
  });
#endif
  return y;
}

// The bf16 weight, transposed to [K, N], of int4_linear_q8's tiles: a long prompt runs faster as this and one bf16
// matmul (measured 5.2 against 6.6 ms for 512 rows of a 576 x 3072 layer), as for layers on torch's kernel.
at::Tensor int4_q8_weight(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                          int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(2) == 64 &&
              qweight.is_contiguous(), "qweight must be contiguous uint8 [N / 16, K / 8, 64]");
  const int64_t T = qweight.size(0), N = T * TILE, K = qweight.size(1) * 8;
  TORCH_CHECK(group_size > 0 && group_size % QBLOCK == 0 && K % group_size == 0, "groups must be multiples of 32");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() &&
                t->sizes() == at::IntArrayRef({T, G, TILE}), "scales and zeros must be bfloat16 [N / 16, G, 16]");
  at::Tensor w = at::empty({K, N}, qweight.options().dtype(at::kBFloat16));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const at::BFloat16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, K / 8, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g = (8 * c) / group_size;
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* chunk = q + (t * (K / 8) + c) * 64;
        const at::BFloat16 *s = sp + (t * G + g) * TILE, *z = zp + (t * G + g) * TILE;
        for (int l = 0; l < TILE; ++l)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = chunk[4 * l + j];
            const float scale = static_cast<float>(s[l]), offset = static_cast<float>(z[l]) - 8.f * scale;
            out[(8 * c + j) * N + t * TILE + l] = static_cast<at::BFloat16>(float(byte & 15) * scale + offset);
            out[(8 * c + 4 + j) * N + t * TILE + l] = static_cast<at::BFloat16>(float(byte >> 4) * scale + offset);
          }
      }
    }
  });
  return w;
}

// Whether the kernels take their AVX2 path even where the CPU has VNNI; returns the previous setting.
bool q8_avx2_only(bool on) { return avx2_only.exchange(on); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantbot, m) {
  m.def("q8_avx2_only(bool on) -> bool", &q8_avx2_only);
  m.def("int4_linear_q8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("int8_linear_q8(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_q8_weight(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantbot, CPU, m) {
  m.impl("int4_linear_q8", &int4_linear_q8);
  m.impl("int8_linear_q8", &int8_linear_q8);
  m.impl("int4_q8_weight", &int4_q8_weight);
}
