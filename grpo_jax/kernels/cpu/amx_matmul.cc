// Decode-step matmuls on Intel AMX tiles, as XLA FFI custom calls on the CPU.
//
// A decode step multiplies a few rows (the batch) by every weight once. XLA:CPU
// re-lays out each plain weight at every call, so its small-row bf16 dots ran at
// 160-200 GFLOP/s on an AMX machine, ~3 GB/s of weights; oneDNN did no better,
// packed or not (docs/perf/README.md, sessions 5-6). Here the weight is read as it
// streams from memory, by the tile instructions directly:
//
//  * AmxPackedMatmul: y[M, N] = x[M, K] @ w, w pre-packed once per decode loop into
//    AMX's pair-interleaved tiles, [N/32, K/32, 2, 16, 16, 2] bf16 (PackedLayout
//    below), so each 16 x 16 weight tile is 1 KB of contiguous memory.
//  * AmxRowsMatmul: y[R, M] = w[R, K] @ x[M, K]^T with w as it is stored, rows of K
//    contiguous (the embedding [V, D], for the sampler's vocabulary-major logits).
//  * KvWriteTokenBf16, GatherRowsBf16: a decode step's keys or values written into
//    the cache in place, and its tokens' embedding rows read (not AMX, but the same
//    loop's, and XLA:CPU has no bf16 scatter or gather).
//  * AmxLogSumExpBf16, AmxSoftmaxRowsBf16: a training step's log-softmax over the
//    tied vocabulary, its log-sum-exp and its gradient's softmax-weighted sum of the
//    embedding's rows, with the logits consumed 32 x 32 at a time (below).
//
// The matmuls: bf16 operands, float32 sums and result; K, N and R multiples of 32,
// any M (the log-softmax calls: M a multiple of 32 too). The output's column blocks
// are shared out on XLA's own thread pool, not OpenMP's:
// XLA runs independent ops (the q, k and v projections) side by side on its
// threads, and an OpenMP team inside each oversubscribed the cores (3x slower calls).
// GrpoJaxAmxRequest asks Linux for the tile state once per process, before any call.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

using bf16 = uint16_t;

struct TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3 accumulate C[i][j] (float32, rows[i] x 16 columns of j's kind); tiles 4, 5
// are the left operands L_i (rows[i] x 32 bf16), tiles 6, 7 the right R_j (16
// bf16 pairs x cols[j]). A block is 2 x 2 tiles; an edge block uses fewer rows or
// columns (a count of 0 is a tile the block does not use).
void Configure(int rows0, int rows1, int cols0, int cols1) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  const int rows[2] = {std::max(rows0, 1), std::max(rows1, 1)};
  const int cols[2] = {std::max(cols0, 1), std::max(cols1, 1)};
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      c.rows[2 * i + j] = rows[i];
      c.colsb[2 * i + j] = cols[j] * 4;
    }
    c.rows[4 + i] = rows[i];
    c.colsb[4 + i] = 64;
    c.rows[6 + i] = 16;
    c.colsb[6 + i] = cols[i] * 4;
  }
  // GCC 12 does not count ldtilecfg as reading its operand: with constant arguments
  // it dropped the stores above (a zero config, then a fault at the first tile op).
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// body(begin, end) over [0, blocks) in chunks, on the calling thread and on XLA's
// pool. Chunks are claimed from a counter, so the caller finishes them all itself if
// the pool is busy (running another op that waits likewise: no deadlock); it returns
// once every claimed chunk is done. A task that starts later finds none left.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t blocks, const Body& body) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, blocks / (4 * threads));
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  auto progress = std::make_shared<Progress>();
  auto run = [progress, chunk, chunks, blocks, body]() {
    for (int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(blocks, (c + 1) * chunk));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < std::min(threads, chunks); ++i) {
    pool.Schedule([run]() { run(); });
  }
  run();
  while (progress->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

// Tile numbers are immediates: a switch stores accumulator t.
void StoreTile(int t, float* dst, int64_t stride_bytes) {
  switch (t) {
    case 0: _tile_stored(0, dst, stride_bytes); break;
    case 1: _tile_stored(1, dst, stride_bytes); break;
    case 2: _tile_stored(2, dst, stride_bytes); break;
    default: _tile_stored(3, dst, stride_bytes); break;
  }
}

// y[M, N] = x[M, K] @ w, w packed: block (nb, kb) holds w[kb*32 .. +32, nb*32 .. +32]
// as two right tiles (columns 0-15, 16-31), each [16 k-pairs][16 columns][2].
void PackedMatmul(ffi::ThreadPool& pool, const bf16* x, const bf16* packed, float* y,
                  int64_t m, int64_t k, int64_t n) {
  ParallelFor(pool, n / 32, [=](int64_t begin, int64_t end) {
    int configured = -1;
    for (int64_t nb = begin; nb < end; ++nb) {
      const bf16* block = packed + nb * k * 32;
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        const int rows0 = static_cast<int>(std::min<int64_t>(16, m - m0));
        const int rows1 = static_cast<int>(std::clamp<int64_t>(m - m0 - 16, 0, 16));
        if (rows0 * 17 + rows1 != configured) {
          Configure(rows0, rows1, 16, 16);
          configured = rows0 * 17 + rows1;
        }
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        const bf16* right = block;
        const bf16* left = x + m0 * k;
        for (int64_t kk = 0; kk < k; kk += 32, right += 1024) {
          _tile_loadd(6, right, 64);
          _tile_loadd(7, right + 512, 64);
          _tile_loadd(4, left + kk, k * 2);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (rows1) {
            _tile_loadd(5, left + 16 * k + kk, k * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        for (int i = 0; i < (rows1 ? 2 : 1); ++i) {
          for (int j = 0; j < 2; ++j) {
            StoreTile(2 * i + j, y + (m0 + 16 * i) * n + nb * 32 + 16 * j, n * 4);
          }
        }
      }
    }
    _tile_release();
  });
}

// x [M, K] laid out as the right tiles want it, [K/2][M][2]: each row's K-pairs.
std::vector<bf16> PairRows(const bf16* x, int64_t m, int64_t k) {
  std::vector<bf16> pairs(static_cast<size_t>(k * m));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t kk = 0; kk < k; kk += 2) {
      pairs[(kk / 2 * m + i) * 2] = x[i * k + kk];
      pairs[(kk / 2 * m + i) * 2 + 1] = x[i * k + kk + 1];
    }
  }
  return pairs;
}

// y[R, M] = w[R, K] @ x[M, K]^T. x is re-laid out once per call as the right tiles
// want it, [K/2][M][2]; w's rows stream through the left tiles, 32 rows at a time,
// with the next 32 rows prefetched into L2 while these are multiplied.
void RowsMatmul(ffi::ThreadPool& pool, const bf16* x, const bf16* w, float* y, int64_t m,
                int64_t k, int64_t r) {
  const std::vector<bf16> pairs = PairRows(x, m, k);
  const bf16* xpairs = pairs.data();
  ParallelFor(pool, r / 32, [=](int64_t begin, int64_t end) {
    int configured = -1;
    for (int64_t rb = begin; rb < end; ++rb) {
      const bf16* rows = w + rb * 32 * k;
      const bool prefetch = rb + 1 < end;
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        const int cols0 = static_cast<int>(std::min<int64_t>(16, m - m0));
        const int cols1 = static_cast<int>(std::clamp<int64_t>(m - m0 - 16, 0, 16));
        if (cols0 * 17 + cols1 != configured) {
          Configure(16, 16, cols0, cols1);
          configured = cols0 * 17 + cols1;
        }
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t kk = 0; kk < k; kk += 32) {
          if (prefetch && m0 == 0) {
            for (int i = 0; i < 32; ++i) {
              _mm_prefetch(reinterpret_cast<const char*>(rows + (32 + i) * k + kk),
                           _MM_HINT_T1);
            }
          }
          _tile_loadd(4, rows + kk, k * 2);
          _tile_loadd(5, rows + 16 * k + kk, k * 2);
          const bf16* right = xpairs + (kk / 2 * m + m0) * 2;
          _tile_loadd(6, right, m * 4);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (cols1) {
            _tile_loadd(7, right + 32, m * 4);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        for (int i = 0; i < 2; ++i) {
          for (int j = 0; j < (cols1 ? 2 : 1); ++j) {
            StoreTile(2 * i + j, y + (rb * 32 + 16 * i) * m + m0 + 16 * j, m * 4);
          }
        }
      }
    }
    _tile_release();
  });
}

// ---------------------------------------------------------------------------
// The teacher-forced log-softmax over a tied vocabulary, without its [M, V] logits.
// A training step's log p(target) needs, per hidden row x[m], the log-sum-exp of
// scale * (w @ x[m]) over the vocabulary w [V, K], and its gradient needs the
// softmax-weighted sum of w's rows. XLA materialises the [M, V] float32 logits for
// both (three passes over them, the rematerialised one's max fused at ~0.2 G
// elements/s: ~1 s of a 256-row chunk's ~1.5 s on an AMX machine). Here each
// 32-row block of logits lives in tiles and a 4 KB buffer, and is consumed there.

// exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7
// Taylor polynomial (relative error < 3e-8 before rounding), times 2^n. Inputs are
// clamped to [-87, 88], so exp(-inf) gives ~1e-38, not NaN.
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

// 16 floats rounded to bfloat16 (to nearest even), each in the high half of its 32 bits.
inline __m512i RoundBf16High(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  return _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
}

void LoadTile(int t, const float* src, int64_t stride_bytes) {
  switch (t) {
    case 0: _tile_loadd(0, src, stride_bytes); break;
    case 1: _tile_loadd(1, src, stride_bytes); break;
    case 2: _tile_loadd(2, src, stride_bytes); break;
    default: _tile_loadd(3, src, stride_bytes); break;
  }
}

// Accumulators 0-3 = w[32 rows from `rows`, :] @ x[m0 .. m0 + 32, :]^T, x given as
// PairRows [K/2][M][2]; stores them into out (32 x 32 floats, row stride `stride`).
inline void RowsBlock(const bf16* rows, const bf16* xpairs, int64_t m, int64_t k, int64_t m0,
                      float* out, int64_t stride) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t kk = 0; kk < k; kk += 32) {
    const bf16* right = xpairs + (kk / 2 * m + m0) * 2;
    _tile_loadd(4, rows + kk, k * 2);
    _tile_loadd(5, rows + 16 * k + kk, k * 2);
    _tile_loadd(6, right, m * 4);
    _tile_loadd(7, right + 32, m * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) StoreTile(2 * i + j, out + 16 * i * stride + 16 * j, stride * 4);
  }
}

// Running (top, sum) of 16 columns updated by `count` rows v[i * stride + c] * scale:
// top the maximum so far, sum the sum of exp(value - top).
inline void OnlineLogSumExp(const float* v, int count, int64_t stride, __m512 scale,
                            float* top, float* sum) {
  __m512 high = _mm512_mul_ps(_mm512_loadu_ps(v), scale);
  for (int i = 1; i < count; ++i) {
    high = _mm512_max_ps(high, _mm512_mul_ps(_mm512_loadu_ps(v + i * stride), scale));
  }
  const __m512 old = _mm512_loadu_ps(top);
  const __m512 now = _mm512_max_ps(old, high);
  __m512 total = _mm512_mul_ps(_mm512_loadu_ps(sum), Exp16(_mm512_sub_ps(old, now)));
  for (int i = 0; i < count; ++i) {
    total = _mm512_add_ps(total, Exp16(_mm512_fmsub_ps(_mm512_loadu_ps(v + i * stride), scale, now)));
  }
  _mm512_storeu_ps(top, now);
  _mm512_storeu_ps(sum, total);
}

// lse[m] = log sum_v exp(scale * w[v] . x[m]) for x [M, K], w [V, K] (M, K, V multiples
// of 32). Vocabulary blocks are shared out; each worker keeps its own running
// (top, sum) per row, merged at the end.
void RowsLogSumExp(ffi::ThreadPool& pool, const bf16* x, const bf16* w, float scale, float* lse,
                   int64_t m, int64_t k, int64_t r) {
  const std::vector<bf16> pairs = PairRows(x, m, k);
  std::vector<float> top(m, -INFINITY), sum(m, 0.0f);
  std::mutex merge;
  ParallelFor(pool, r / 32, [&](int64_t begin, int64_t end) {
    std::vector<float> my_top(m, -INFINITY), my_sum(m, 0.0f);
    alignas(64) float block[32 * 32];
    const __m512 s = _mm512_set1_ps(scale);
    Configure(16, 16, 16, 16);
    for (int64_t rb = begin; rb < end; ++rb) {
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        RowsBlock(w + rb * 32 * k, pairs.data(), m, k, m0, block, 32);
        for (int j = 0; j < 2; ++j) {
          OnlineLogSumExp(block + 16 * j, 32, 32, s, &my_top[m0 + 16 * j], &my_sum[m0 + 16 * j]);
        }
      }
    }
    _tile_release();
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t i = 0; i < m; ++i) {
      const float high = std::max(top[i], my_top[i]);
      sum[i] = sum[i] * std::exp(top[i] - high) + my_sum[i] * std::exp(my_top[i] - high);
      top[i] = high;
    }
  });
  for (int64_t i = 0; i < m; ++i) lse[i] = top[i] + std::log(sum[i]);
}

// A 16 x 16 block of floats transposed in registers: r[i] holds row i on entry and
// column i on return.
inline void Transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 64-bit interleave of those pairs
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes, two stages
    t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// s[M, K] = sum_v p[m, v] w[v, :] with p[m, v] = exp(scale * w[v] . x[m] - lse[m]):
// the softmax-weighted sum of w's rows that the log-softmax's gradient needs (M, K,
// V multiples of 32). Per block of 256 vocabulary rows: its logits [256, M] (tiles,
// w's rows as they are stored on the left), p rounded to bfloat16 and transposed in
// registers to [M, 256] (the left operand of the next product), w's rows interleaved
// in pairs [128][K][2] (its right operand), then s += p @ w[block], into the worker's
// own [M, K] sum, added to s at the end.
void SoftmaxRows(ffi::ThreadPool& pool, const bf16* x, const bf16* w, const float* lse,
                 float scale, float* out, int64_t m, int64_t k, int64_t r) {
  constexpr int64_t kSpan = 256;
  const std::vector<bf16> pairs = PairRows(x, m, k);
  std::fill(out, out + m * k, 0.0f);
  std::mutex merge;
  ParallelFor(pool, (r + kSpan - 1) / kSpan, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(m * k), 0.0f), logits(kSpan * m);
    std::vector<bf16> probs(kSpan * m);                  // [M][span]
    std::vector<uint32_t> right(static_cast<size_t>(kSpan / 2 * k));  // [span/2][K] pairs
    const __m512 s = _mm512_set1_ps(scale);
    Configure(16, 16, 16, 16);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t v0 = b * kSpan, span = std::min(kSpan, r - v0);
      const bf16* rows = w + v0 * k;
      for (int64_t rb = 0; rb < span; rb += 32) {
        for (int64_t m0 = 0; m0 < m; m0 += 32) {
          RowsBlock(rows + rb * k, pairs.data(), m, k, m0, logits.data() + rb * m + m0, m);
        }
      }
      for (int64_t vb = 0; vb < span; vb += 16) {
        for (int64_t m0 = 0; m0 < m; m0 += 16) {
          const __m512 shift = _mm512_loadu_ps(lse + m0);
          __m512 block[16];
          for (int i = 0; i < 16; ++i) {
            block[i] = Exp16(_mm512_fmsub_ps(_mm512_loadu_ps(&logits[(vb + i) * m + m0]), s, shift));
          }
          Transpose16(block);
          for (int j = 0; j < 16; ++j) {
            const __m512i high = RoundBf16High(block[j]);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(&probs[(m0 + j) * span + vb]),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(high, 16)));
          }
        }
      }
      for (int64_t vp = 0; vp < span / 2; ++vp) {
        const bf16* even = rows + 2 * vp * k;
        for (int64_t k0 = 0; k0 < k; k0 += 16) {
          const __m512i lo = _mm512_cvtepu16_epi32(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + k0)));
          const __m512i hi = _mm512_cvtepu16_epi32(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + k + k0)));
          _mm512_storeu_si512(&right[vp * k + k0], _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        for (int64_t k0 = 0; k0 < k; k0 += 32) {
          float* c = acc.data() + m0 * k + k0;
          for (int t = 0; t < 4; ++t) LoadTile(t, c + 16 * (t / 2) * k + 16 * (t % 2), k * 4);
          for (int64_t vv = 0; vv < span; vv += 32) {
            const bf16* a = probs.data() + m0 * span + vv;
            const uint32_t* bt = right.data() + vv / 2 * k + k0;
            _tile_loadd(4, a, span * 2);
            _tile_loadd(5, a + 16 * span, span * 2);
            _tile_loadd(6, bt, k * 4);
            _tile_loadd(7, bt + 16, k * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          for (int t = 0; t < 4; ++t) StoreTile(t, c + 16 * (t / 2) * k + 16 * (t % 2), k * 4);
        }
      }
    }
    _tile_release();
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t i = 0; i < m * k; ++i) out[i] += acc[i];
  });
}

ffi::Error PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> packed,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), pd = packed.dimensions();
  if (xd.size() != 2 || pd.size() != 6 || pd[2] != 2 || pd[3] != 16 || pd[4] != 16 ||
      pd[5] != 2) {
    return ffi::Error::InvalidArgument(
        "amx_packed_matmul: x must be [M, K], the weight [N/32, K/32, 2, 16, 16, 2]");
  }
  const int64_t m = xd[0], k = xd[1], n = pd[0] * 32;
  if (pd[1] * 32 != k) {
    return ffi::Error::InvalidArgument("amx_packed_matmul: contraction sizes differ");
  }
  PackedMatmul(pool, reinterpret_cast<const bf16*>(x.untyped_data()),
               reinterpret_cast<const bf16*>(packed.untyped_data()),
               y->typed_data(), m, k, n);
  return ffi::Error::Success();
}

ffi::Error RowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("amx_rows_matmul: x must be [M, K], w [R, K]");
  }
  if (wd[0] % 32 || wd[1] % 32) {
    return ffi::Error::InvalidArgument("amx_rows_matmul: R and K must be multiples of 32");
  }
  RowsMatmul(pool, reinterpret_cast<const bf16*>(x.untyped_data()),
             reinterpret_cast<const bf16*>(w.untyped_data()), y->typed_data(), xd[0],
             xd[1], wd[0]);
  return ffi::Error::Success();
}

ffi::Error LogSumExpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                         ffi::ResultBuffer<ffi::F32> lse, float scale) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[0] % 32 || wd[0] % 32 ||
      wd[1] % 32) {
    return ffi::Error::InvalidArgument(
        "amx_logsumexp: x [M, K] and w [V, K] with M, K and V multiples of 32");
  }
  RowsLogSumExp(pool, reinterpret_cast<const bf16*>(x.untyped_data()),
                reinterpret_cast<const bf16*>(w.untyped_data()), scale, lse->typed_data(),
                xd[0], xd[1], wd[0]);
  return ffi::Error::Success();
}

ffi::Error SoftmaxRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                           ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::F32> lse,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || lse.dimensions().size() != 1 ||
      lse.dimensions()[0] != xd[0] || xd[0] % 32 || wd[0] % 32 || wd[1] % 32) {
    return ffi::Error::InvalidArgument(
        "amx_softmax_rows: x [M, K], w [V, K], lse [M], with M, K and V multiples of 32");
  }
  SoftmaxRows(pool, reinterpret_cast<const bf16*>(x.untyped_data()),
              reinterpret_cast<const bf16*>(w.untyped_data()), lse.typed_data(), scale,
              out->typed_data(), xd[0], xd[1], wd[0]);
  return ffi::Error::Success();
}

// One token's keys or values [B, K, Dh] written in place at each row's slot of its
// cache buffer, keys [B, K, Dh, S] (slot minor) or values [B, K, S, Dh]. The output
// aliases the buffer: XLA:CPU has no bfloat16 scatter, and the select it falls back to
// reads and writes the whole cache at every step (13 of a 16-row step's ~85 ms at
// 288 slots on an AMX machine).
ffi::Error WriteTokenImpl(ffi::Buffer<ffi::BF16> buf, ffi::Buffer<ffi::BF16> token,
                          ffi::Buffer<ffi::S32> slots, ffi::ResultBuffer<ffi::BF16> out,
                          bool keys) {
  auto bd = buf.dimensions(), td = token.dimensions();
  if (bd.size() != 4 || td.size() != 3 || slots.dimensions().size() != 1 ||
      td[0] != bd[0] || td[1] != bd[1] || slots.dimensions()[0] != bd[0] ||
      td[2] != (keys ? bd[2] : bd[3])) {
    return ffi::Error::InvalidArgument(
        "kv_write_token: buffer [B, K, Dh, S] or [B, K, S, Dh], token [B, K, Dh], slots [B]");
  }
  const int64_t rows = bd[0], heads = bd[1], dim = td[2], size = keys ? bd[3] : bd[2];
  bf16* dst = reinterpret_cast<bf16*>(out->untyped_data());
  if (dst != buf.untyped_data()) {  // not aliased after all: start from the buffer
    std::memcpy(dst, buf.untyped_data(), buf.size_bytes());
  }
  const bf16* src = reinterpret_cast<const bf16*>(token.untyped_data());
  const int32_t* slot = slots.typed_data();
  for (int64_t b = 0; b < rows; ++b) {
    if (slot[b] < 0 || slot[b] >= size) {
      return ffi::Error::InvalidArgument("kv_write_token: a slot is outside the buffer");
    }
    for (int64_t h = 0; h < heads; ++h) {
      const bf16* from = src + (b * heads + h) * dim;
      if (keys) {
        bf16* to = dst + (b * heads + h) * dim * size + slot[b];
        for (int64_t d = 0; d < dim; ++d) to[d * size] = from[d];
      } else {
        std::memcpy(dst + ((b * heads + h) * size + slot[b]) * dim, from, dim * sizeof(bf16));
      }
    }
  }
  return ffi::Error::Success();
}

// table[ids]: rows of a bfloat16 table [V, D] for ids [N] -> [N, D]. In a decode loop
// XLA:CPU's gather works on a float32 table, and the conversion of the whole table
// (the 270M's embedding: 671 MB, ~0.3 s) is hoisted out of the loop and paid per call.
ffi::Error GatherRowsImpl(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> ids,
                          ffi::ResultBuffer<ffi::BF16> out) {
  auto td = table.dimensions();
  if (td.size() != 2 || ids.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("gather_rows: table [V, D], ids [N]");
  }
  const int64_t vocab = td[0], dim = td[1], n = ids.dimensions()[0];
  const bf16* src = reinterpret_cast<const bf16*>(table.untyped_data());
  bf16* dst = reinterpret_cast<bf16*>(out->untyped_data());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = std::clamp<int64_t>(ids.typed_data()[i], 0, vocab - 1);
    std::memcpy(dst + i * dim, src + row * dim, dim * sizeof(bf16));
  }
  return ffi::Error::Success();
}

}  // namespace

// 0 when this process may use the AMX tile state, else errno.
extern "C" int GrpoJaxAmxRequest() {
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 0 : errno;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmxPackedMatmulBf16, PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmxRowsMatmulBf16, RowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvWriteTokenBf16, WriteTokenImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("keys"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatherRowsBf16, GatherRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmxLogSumExpBf16, LogSumExpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmxSoftmaxRowsBf16, SoftmaxRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
