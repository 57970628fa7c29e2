// sparsegraph::sparse_conv1x1 on the CPU: a 1x1 convolution whose weight is block-sparse, computed from
// the kept weights only.
//
// Contract (the op's, see codegen/sparse_conv1x1.py). A 1x1 convolution of an NCHW image is a matrix
// product per image, y[n] = W · x[n] with W [O, C] and x[n] [C, P] (P = H·W pixels, rows contiguous).
// W is stored as block-CSR over blocks of K consecutive output channels that share one input channel
// (K = 1: plain CSR, unstructured sparsity):
//
//     indptr [nb + 1] int32, nb = ⌈O / K⌉; indices [nnzb] int32 (input channels, ascending in a row
//     for speed: any order is right); values [nnzb, K] fp32
//     values[j·K + r] = W[b·K + r, indices[j]]   for j in [indptr[b], indptr[b + 1])
//     y[n, o, p] = clamp(bias[o] + Σ_j values[j·K + r] · x[n, indices[j], p], lo, hi),   o = b·K + r < O
//
// (rows b·K + r ≥ O of the last block are padding: their values are never stored). The clamp is the
// ReLU / ReLU6 / hardtanh the pass folds in; a bound is skipped when absent. NaN propagates as through
// torch.clamp: max/min are issued with the accumulator as the operand the instruction returns on NaN.
//
// Shape of the computation (Elsen et al., "Fast Sparse ConvNets", 2020; XNNPACK's SpMM kernels):
// output-channel-major over a tile of T = V · lanes pixels. For one tile and one block of K output
// channels, the K × T outputs live in K·V vector registers; each kept block loads its input channel's V
// vectors of the tile once and issues K·V FMAs with its K weights broadcast, so a block of K amortises
// one row load over K outputs. Pixel tiles are the outer loop and output blocks the inner one: a tile's
// columns of x (C × T floats) are read by every block from cache instead of streaming the whole image
// from memory once per output channel. The input channels go in chunks whose rows of the tile fill
// about the L1 (SG_CONV_CHUNK_BYTES): a block's partial sums wait in y between chunks, which costs a
// load and a store of its outputs per chunk but keeps every load of x an L1 hit (x rows from L2 come at
// half the rate, and at one load per FMA for K = 1 the loads are the bound). With fewer than 8
// accumulators (narrow tiles), two sets take alternate entries: an FMA's 4-cycle latency × 2 units
// needs 8 independent chains. The last tile of an image runs with the vectors it needs (a narrower
// instantiation) and masked loads and stores for its last partial vector.
//
// Threads (OpenMP, at most `threads`): the work items are (image, tile, slice of the output blocks),
// split statically; when images × tiles are fewer than twice the threads (7×7 and 14×14 layers), the
// output blocks are cut into slices so that every thread has work.
//
// SIMD: AVX-512F intrinsics (16 lanes, 32 registers), else AVX2 + FMA (8 lanes, 16 registers), else a
// portable 4-lane loop the compiler may vectorise. What -march the library is built with picks one
// (-march=native at install); sg_cpu_supported (block_sparse_attention.cpp) refuses a library whose
// instruction sets the running CPU lacks. Register budget per instantiation: K·V accumulators + V
// loaded vectors + 1 broadcast weight.

#if defined(__AVX512FP16__) && !defined(__clang__)  // see sparse_gemv.cpp: AVX-512 F/VL/BW/DQ only
#pragma GCC target("no-avx512fp16")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

#if defined(__AVX512F__)
struct Simd {
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }  // lanes [0, n)
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V max(V bound, V a) { return _mm512_max_ps(bound, a); }  // a when either is NaN
  static V min(V bound, V a) { return _mm512_min_ps(bound, a); }
  static __mmask16 mask(int n) {
    return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Simd {
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }  // no fault past n
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V max(V bound, V a) { return _mm256_max_ps(bound, a); }  // a when either is NaN
  static V min(V bound, V a) { return _mm256_min_ps(bound, a); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};
#else
struct Simd {  // portable: plain loops over 4 lanes
  static constexpr int kLanes = 4;
  static constexpr int kRegisters = 16;
  struct V {
    float v[4];
  };
  static V zero() { return V{{0.0f, 0.0f, 0.0f, 0.0f}}; }
  static V set1(float s) { return V{{s, s, s, s}}; }
  static V load(const float* p) { return load(p, 4); }
  static V load(const float* p, int n) {
    V r = zero();
    for (int i = 0; i < n && i < 4; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, V a) { store(p, a, 4); }
  static void store(float* p, V a, int n) {
    for (int i = 0; i < n && i < 4; ++i) p[i] = a.v[i];
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < 4; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
    return c;
  }
  static V add(V a, V b) {
    for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
    return a;
  }
  static V max(V bound, V a) {  // NaN in a stays NaN, as torch.clamp
    for (int i = 0; i < 4; ++i) a.v[i] = a.v[i] < bound.v[i] ? bound.v[i] : a.v[i];
    return a;
  }
  static V min(V bound, V a) {
    for (int i = 0; i < 4; ++i) a.v[i] = a.v[i] > bound.v[i] ? bound.v[i] : a.v[i];
    return a;
  }
};
#endif

constexpr int kLanes = Simd::kLanes;
using V = Simd::V;

struct Problem {
  const float* x;  // [N, C, P]
  int64_t n, c, p;
  const float* values;  // [nnzb, K]
  const int32_t* indices;
  const int32_t* indptr;
  const float* bias;  // [O] or null
  float* y;           // [N, O, P]
  int64_t o, k;
  bool has_lo, has_hi;
  float lo, hi;
};

// Bytes of a tile's rows of x per chunk of input channels (build with -DSG_CONV_CHUNK_BYTES=… to time
// another), and the most vectors a tile holds per output. Measured on the 2-core Xeon (AVX-512, L1d
// 48 KB) while other work loaded it (load average 2.5–3.5), one thread, the kernel alone on all 32 1x1
// layers of EfficientNet-Lite0 at 224×224 with the magnitude-best share kept per row, summed time
// against F.conv2d, best of 30: one pass over all channels 2.39x at 90% / 1.68x at 80%; chunks of 32 KB
// 2.32–2.41x / 1.82–1.85x; 48 KB 2.47–2.54x / 1.90x; 64 KB 2.48–2.54x / 1.86x. Tiles of 4 vectors (64
// pixels, two accumulator sets) were 5–12% slower than 8 (128 pixels); unrolling the entry loop by two
// changed nothing measurable.
#ifndef SG_CONV_CHUNK_BYTES
#define SG_CONV_CHUNK_BYTES (48 * 1024)
#endif
#ifndef SG_CONV_VECTORS
#define SG_CONV_VECTORS 8
#endif

// acc[K][W] += (the K weights at w) ⊗ (the W vectors of row `row` of the tile).
template <int K, int W, bool Tail>
inline void accumulate(V (&acc)[K][W], const float* row, const float* w, int valid) {
  V in[W];
  for (int v = 0; v < W; ++v)
    in[v] = Tail && v == W - 1 ? Simd::load(row + v * kLanes, valid - v * kLanes) : Simd::load(row + v * kLanes);
  for (int r = 0; r < K; ++r) {
    const V weight = Simd::set1(w[r]);
    for (int v = 0; v < W; ++v) acc[r][v] = Simd::fma(weight, in[v], acc[r][v]);
  }
}

// Outputs of blocks [b0, b1) × one tile of pixels [p0, p0 + W·lanes) of image `img`; `valid` pixels of
// the tile exist (the last tile of an image: masked loads and stores on its last vector). Input
// channels in chunks of kChunk (module comment); `cursor[b − b0]` remembers where each block row's
// entries of the next chunk start (indices ascend within a row).
template <int K, int W, bool Tail>
void tile(const Problem& a, int64_t img, int64_t p0, int valid, int64_t b0, int64_t b1, int32_t* cursor) {
  constexpr int kSets = K * W < 8 ? 2 : 1;
  constexpr int64_t kChunk = std::max<int64_t>(16, SG_CONV_CHUNK_BYTES / (W * kLanes * 4));
  const float* x = a.x + img * a.c * a.p + p0;
  float* y = a.y + img * a.o * a.p + p0;
  const V lo = Simd::set1(a.lo), hi = Simd::set1(a.hi);
  for (int64_t c0 = 0; c0 < a.c; c0 += kChunk) {
    const int64_t c1 = std::min(a.c, c0 + kChunk);
    const bool first = c0 == 0, last = c1 == a.c;
    for (int64_t b = b0; b < b1; ++b) {
      V acc[kSets][K][W];
      for (int r = 0; r < K; ++r) {
        const int64_t o = std::min(b * K + r, a.o - 1);  // padding rows: computed, never stored
        for (int v = 0; v < W; ++v) {
          if (first) {
            acc[0][r][v] = a.bias != nullptr ? Simd::set1(a.bias[o]) : Simd::zero();
          } else {
            const float* at = y + o * a.p + v * kLanes;
            acc[0][r][v] = Tail && v == W - 1 ? Simd::load(at, valid - v * kLanes) : Simd::load(at);
          }
          if (kSets == 2) acc[kSets - 1][r][v] = Simd::zero();
        }
      }
      const int32_t* index = a.indices + (first ? a.indptr[b] : cursor[b - b0]);
      const int32_t* end = a.indices + a.indptr[b + 1];
      const float* w = a.values + (index - a.indices) * K;
      if (kSets == 2) {
        for (; index + 1 < end && index[1] < c1; index += 2, w += 2 * K) {
          accumulate<K, W, Tail>(acc[0], x + static_cast<int64_t>(index[0]) * a.p, w, valid);
          accumulate<K, W, Tail>(acc[kSets - 1], x + static_cast<int64_t>(index[1]) * a.p, w + K, valid);
        }
      }
      for (; index < end && *index < c1; ++index, w += K)
        accumulate<K, W, Tail>(acc[0], x + static_cast<int64_t>(*index) * a.p, w, valid);
      if (!last) cursor[b - b0] = static_cast<int32_t>(index - a.indices);
      for (int r = 0; r < K; ++r) {
        const int64_t o = b * K + r;
        if (o >= a.o) break;
        float* out = y + o * a.p;
        for (int v = 0; v < W; ++v) {
          V value = kSets == 2 ? Simd::add(acc[0][r][v], acc[kSets - 1][r][v]) : acc[0][r][v];
          if (last && a.has_lo) value = Simd::max(lo, value);
          if (last && a.has_hi) value = Simd::min(hi, value);
          if (Tail && v == W - 1) {
            Simd::store(out + v * kLanes, value, valid - v * kLanes);
          } else {
            Simd::store(out + v * kLanes, value);
          }
        }
      }
    }
  }
}

// Vectors per tile for blocks of K: the accumulators, the loaded vectors and one broadcast weight fill
// the registers without spilling.
template <int K>
constexpr int vectors() {
  constexpr int fit = (Simd::kRegisters - 1) / (K + 1);
  return fit > SG_CONV_VECTORS ? SG_CONV_VECTORS : fit;
}

// One tile of `width` vectors (≤ vectors<K>()): the narrower instantiations serve an image's last tile.
template <int K, int W>
void last_tile(const Problem& a, int64_t img, int64_t p0, int valid, int width, int64_t b0, int64_t b1,
               int32_t* cursor) {
  if constexpr (W > 1) {
    if (width < W) return last_tile<K, W - 1>(a, img, p0, valid, width, b0, b1, cursor);
  }
  tile<K, W, true>(a, img, p0, valid, b0, b1, cursor);
}

template <int K>
int run(const Problem& a, int64_t threads) {
  constexpr int W = vectors<K>();
  constexpr int64_t T = static_cast<int64_t>(W) * kLanes;
  const int64_t tiles = (a.p + T - 1) / T, blocks = (a.o + K - 1) / K;
  const int64_t images_tiles = a.n * tiles;
  const int64_t slices = std::max<int64_t>(1, std::min(blocks, (2 * threads + images_tiles - 1) / images_tiles));
  const int64_t items = images_tiles * slices;
  const int team = static_cast<int>(std::max<int64_t>(1, std::min(threads, items)));
  int failed = 0;
#pragma omp parallel num_threads(team) if (team > 1) reduction(| : failed)
  {
    int32_t* cursor = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * (blocks / slices + 1)));
    failed = cursor == nullptr;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      if (cursor == nullptr) continue;
      const int64_t slice = item % slices, where = item / slices;
      const int64_t img = where / tiles, p0 = (where % tiles) * T;
      const int64_t b0 = blocks * slice / slices, b1 = blocks * (slice + 1) / slices;
      const int64_t valid = std::min(T, a.p - p0);
      if (valid == T) {
        tile<K, W, false>(a, img, p0, static_cast<int>(valid), b0, b1, cursor);
      } else {
        const int width = static_cast<int>((valid + kLanes - 1) / kLanes);
        last_tile<K, W>(a, img, p0, static_cast<int>(valid), width, b0, b1, cursor);
      }
    }
    std::free(cursor);
  }
  return failed;
}

}  // namespace

// The sha256 of the kernel sources (the library's is returned by sg_source_hash, defined in
// block_sparse_attention.cpp): restamped by `python -m sparsegraph.codegen.cpu_kernels`.
#define SG_SOURCE_HASH "e7b4cb393936c5c771ed396977c8f85b80e129a8dc8debbffc1855cf2397783c"

extern "C" {

// One call's arguments, passed as one pointer (as sg_sparse_gemv's: a ctypes argument costs ~0.3 µs to
// convert, and this op runs once per 1x1 layer per image). The Python binding packs them with
// struct.Struct in this order (`cpu_kernels._CONV_FIELDS`; a test checks the two agree). Every field is
// 8 bytes: no padding.
struct SgConvCall {
  const float* x;  // [n, c, p], contiguous
  int64_t n, c, p;
  const float* values;     // [nnzb, k]
  const int32_t* indices;  // [nnzb]
  const int32_t* indptr;   // [⌈o / k⌉ + 1]
  const float* bias;       // [o] or null
  float* y;                // [n, o, p], contiguous
  int64_t o, k;
  int64_t threads;         // at most this many OpenMP threads
  int64_t has_lo, has_hi;  // whether each clamp bound applies
  double lo, hi;
};

// The op (module comment). Returns 0; 1 when scratch memory could not be allocated; 2 for a call it
// does not take (a block size other than 1, 2, 4 or 8): the caller runs its torch path then.
int sg_sparse_conv1x1(const SgConvCall* call) {
  const SgConvCall& c = *call;
  const Problem a{c.x, c.n, c.c, c.p, c.values, c.indices, c.indptr, c.bias, c.y, c.o, c.k,
                  c.has_lo != 0, c.has_hi != 0, static_cast<float>(c.lo), static_cast<float>(c.hi)};
  switch (c.k) {
    case 1: return run<1>(a, c.threads);
    case 2: return run<2>(a, c.threads);
    case 4: return run<4>(a, c.threads);
    case 8: return run<8>(a, c.threads);
    default: return 2;
  }
}

}  // extern "C"
