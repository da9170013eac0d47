// MXFP4 expert kernels for CPU inference of gpt-oss (loaded through ctypes by model/kernels/__init__.py).
//
// A weight matrix W [R, K] is stored as blocks uint8 [R, K/32, 16] (two FP4 E2M1 codes per byte, the low
// nibble is the even element) and scales uint8 [R, K/32] (E8M0: multiplier 2^(u-127)). The kernels compute
// y = x W^T + b straight from those bytes: each 32-weight block is expanded in registers (a 16-entry byte
// shuffle turns codes into 2x their value as int8, then int8 -> fp32) and multiplied into every token's
// accumulator, so the packed bytes are read once and no decoded copy is ever written to memory.
// Everything accumulates in fp32. Parallelism: plain std::threads started per call taking chunks of rows from
// an atomic counter (no OpenMP: a second OpenMP runtime next to torch's would spin-wait against it, and dynamic
// chunks keep working when other processes share the cores).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MXFP4_AVX2 1
#endif

namespace {

// 2 x the FP4 E2M1 values, as int8 (so they are integers); the block scale carries the missing 1/2.
const int8_t kFp4x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

float half_scale(uint8_t u) { return std::ldexp(0.5f, int(u) - 127); }

// y[m*ldy + r] = bias[r] + sum_k x[m*ldx + k] * W[r, k] for rows r in [r0, r1), M tokens.
void rows_matmul(const float* x, int M, int ldx, const uint8_t* blocks, const uint8_t* scales, int G,
                 const float* bias, float* y, int ldy, int r0, int r1, const float* scale_table) {
#ifdef MXFP4_AVX2
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kFp4x2));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  constexpr int kTile = 8;  // tokens per pass: 8 accumulators stay in registers
  for (int r = r0; r < r1; ++r) {
    const uint8_t* brow = blocks + (size_t)r * G * 16;
    const uint8_t* srow = scales + (size_t)r * G;
    for (int m0 = 0; m0 < M; m0 += kTile) {
      const int mt = (M - m0) < kTile ? (M - m0) : kTile;
      __m256 acc[kTile];
      for (int t = 0; t < kTile; ++t) acc[t] = _mm256_setzero_ps();
      for (int g = 0; g < G; ++g) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(brow + g * 16));
        const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(raw, low4));
        const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(raw, 4), low4));
        const __m128i e0 = _mm_unpacklo_epi8(lo, hi);  // elements 0..15
        const __m128i e1 = _mm_unpackhi_epi8(lo, hi);  // elements 16..31
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e0));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e0, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e1));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e1, 8)));
        const __m256 sc = _mm256_set1_ps(scale_table[srow[g]]);
        for (int t = 0; t < mt; ++t) {
          const float* xp = x + (size_t)(m0 + t) * ldx + g * 32;
          __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(xp));
          s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), s);
          s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), s);
          s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), s);
          acc[t] = _mm256_fmadd_ps(s, sc, acc[t]);
        }
      }
      for (int t = 0; t < mt; ++t) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
        y[(size_t)(m0 + t) * ldy + r] = _mm_cvtss_f32(v) + (bias ? bias[r] : 0.0f);
      }
    }
  }
#else
  float w[32];
  for (int r = r0; r < r1; ++r) {
    const uint8_t* brow = blocks + (size_t)r * G * 16;
    const uint8_t* srow = scales + (size_t)r * G;
    for (int m = 0; m < M; ++m) y[(size_t)m * ldy + r] = bias ? bias[r] : 0.0f;
    for (int g = 0; g < G; ++g) {
      const float sc = scale_table[srow[g]];
      for (int j = 0; j < 16; ++j) {
        const uint8_t b = brow[g * 16 + j];
        w[2 * j] = kFp4x2[b & 15] * sc;
        w[2 * j + 1] = kFp4x2[b >> 4] * sc;
      }
      for (int m = 0; m < M; ++m) {
        const float* xp = x + (size_t)m * ldx + g * 32;
        float s = 0.0f;
        for (int j = 0; j < 32; ++j) s += w[j] * xp[j];
        y[(size_t)m * ldy + r] += s;
      }
    }
  }
#endif
}

struct ScaleTable {
  float v[256];     // 2^(u-128): pairs with the doubled int8 codes
  float full[256];  // 2^(u-127)
  ScaleTable() {
    for (int u = 0; u < 256; ++u) {
      v[u] = half_scale(uint8_t(u));
      full[u] = std::ldexp(1.0f, u - 127);
    }
  }
};
const ScaleTable kScales;
const float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// Threads worth starting for `work` multiply-adds: below ~1M per thread, starting and joining threads (and, on
// a busy machine, waiting for them to be scheduled) costs more than it saves.
int useful_threads(int threads, double work) {
  const double per_thread = double(1 << 20);
  const int cap = int(work / per_thread) + 1;
  return threads < cap ? threads : cap;
}

// Run body(job) for job in [0, jobs) on `threads` threads (the caller's included), chunks taken dynamically.
template <class F>
void parallel_jobs(long long jobs, int threads, F body) {
  if (threads < 1) threads = 1;
  if (threads > jobs) threads = int(jobs > 0 ? jobs : 1);
  std::atomic<long long> next{0};
  auto worker = [&]() {
    for (long long j = next.fetch_add(1); j < jobs; j = next.fetch_add(1)) body(j);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

int mxfp4_has_avx2() {
#ifdef MXFP4_AVX2
  return 1;
#else
  return 0;
#endif
}

// y [M, R] = x [M, K] W^T + bias, W given as blocks [R, K/32, 16] / scales [R, K/32]; bias may be null.
void mxfp4_linear(const float* x, int M, int K, const uint8_t* blocks, const uint8_t* scales, const float* bias,
                  int R, float* y, int threads) {
  const int G = K / 32;
  threads = useful_threads(threads, double(M) * R * K);
  parallel_jobs((R + 63) / 64, threads, [&](long long c) {
    const int r0 = int(c) * 64, r1 = (r0 + 64 < R) ? r0 + 64 : R;
    rows_matmul(x, M, K, blocks, scales, G, bias, y, R, r0, r1, kScales.v);
  });
}

// gpt-oss experts on grouped tokens: x [n, C, D] holds C tokens for expert ids[i]; out [n, C, D].
// mlp1 [E, 2I, D/32, 16] (+scales, bias1 [E, 2I]) -> clamped SwiGLU on interleaved rows -> mlp2 [E, D, I/32, 16]
// (+scales, bias2 [E, D]). h [n, C, 2I] and a [n, C, I] are caller-provided scratch.
void mxfp4_experts(const float* x, int n, int C, int D, int I, const int64_t* ids, const uint8_t* b1,
                   const uint8_t* s1, const float* bias1, const uint8_t* b2, const uint8_t* s2, const float* bias2,
                   float limit, float alpha, float* h, float* a, float* out, int threads) {
  const int R1 = 2 * I, G1 = D / 32, G2 = I / 32;
  constexpr int kRows = 32;
  const int chunks1 = (R1 + kRows - 1) / kRows, chunks2 = (D + kRows - 1) / kRows;
  threads = useful_threads(threads, double(n) * C * D * I);
  parallel_jobs((long long)n * chunks1, threads, [&](long long job) {
      const int i = int(job / chunks1), r0 = int(job % chunks1) * kRows;
      const int r1 = (r0 + kRows < R1) ? r0 + kRows : R1;
      const int64_t e = ids[i];
      rows_matmul(x + (size_t)i * C * D, C, D, b1 + (size_t)e * R1 * G1 * 16, s1 + (size_t)e * R1 * G1, G1,
                  bias1 + (size_t)e * R1, h + (size_t)i * C * R1, R1, r0, r1, kScales.v);
  });
  for (long long j = 0; j < (long long)n * C * I; ++j) {  // cheap next to the matmuls: one thread
      float gate = h[2 * j], lin = h[2 * j + 1];
      gate = gate < limit ? gate : limit;
      lin = lin < -limit ? -limit : (lin > limit ? limit : lin);
      a[j] = gate / (1.0f + std::exp(-alpha * gate)) * (lin + 1.0f);
  }
  parallel_jobs((long long)n * chunks2, threads, [&](long long job) {
      const int i = int(job / chunks2), r0 = int(job % chunks2) * kRows;
      const int r1 = (r0 + kRows < D) ? r0 + kRows : D;
      const int64_t e = ids[i];
      rows_matmul(a + (size_t)i * C * I, C, I, b2 + (size_t)e * D * G2 * 16, s2 + (size_t)e * D * G2, G2,
                  bias2 + (size_t)e * D, out + (size_t)i * C * D, D, r0, r1, kScales.v);
  });
}

// Decode W [rows, G*32] to bf16 (raw uint16 bits). FP4 value x 2^k is exact in bf16 (same exponent range as
// fp32, 1 mantissa bit needed), so truncating the fp32 bits is exact and matches model.mxfp4's decoder.
void mxfp4_decode_bf16(const uint8_t* blocks, const uint8_t* scales, long long nblocks, uint16_t* out,
                       int threads) {
  const long long per = 4096;
  threads = useful_threads(threads, double(nblocks) * 32);
  parallel_jobs((nblocks + per - 1) / per, threads, [&](long long c) {
  for (long long b = c * per; b < nblocks && b < (c + 1) * per; ++b) {
    const float sc = kScales.full[scales[b]];
    const uint8_t* src = blocks + b * 16;
    uint16_t* dst = out + b * 32;
    for (int j = 0; j < 16; ++j) {
      const float lo = kFp4[src[j] & 15] * sc, hi = kFp4[src[j] >> 4] * sc;
      uint32_t ulo, uhi;
      std::memcpy(&ulo, &lo, 4);
      std::memcpy(&uhi, &hi, 4);
      dst[2 * j] = uint16_t(ulo >> 16);
      dst[2 * j + 1] = uint16_t(uhi >> 16);
    }
  }
  });
}

}  // extern "C"
