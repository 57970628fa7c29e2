// sparsegraph::sparse_linear on the CPU for a few rows (decoding): an input-sparse GEMV, fused.
//
// Contract (the op's, see codegen/sparse_linear.py): for each row r of x [rows, in], with the weight
// stored input-major, weight_t [in, out] (rows `ld` elements apart, columns adjacent),
//
//     a_j    = x[r, j] − c_j                         (c = 0 without a centre; rounded to the dtype)
//     keep_j = ¬(|a_j| ≤ t)                          (threshold mode, k = 0: NaN is kept)
//     keep_j = |a_j| ≥ k-th largest |a| of the row, or a_j is NaN        (top-k mode, k > 0)
//     y[r]   = Σ_{j kept} a_j · weight_t[j, :] + bias
//
// t is rounded to the dtype first, as torch compares a tensor with a Python float; top-k ranks NaN
// above everything, as torch.topk does. fp32, bf16 and fp16 tensors (one dtype per call), fp32
// accumulation, the result rounded once. bf16 widens by a shift, fp16 by its bits (no vector
// conversion without AVX512-FP16, which this file does not use: below); measured, one thread,
// 2048→5632 at 50% skipped: fp32 1.10 ms, bf16 0.72 ms, fp16 1.56 ms (its widening costs more than
// the bytes it saves; torch's dense GEMV: fp32 2.0, bf16 3.8, fp16 2.6 ms).
//
// Shape of the computation, one call:
//
//   1. On the calling thread, the kept list: the indices j kept by at least one row and, per index,
//      the rows' coefficients (a_j where that row keeps j, 0 where it does not), built branch-free.
//      With several rows the weight row of an index kept by any row is read once for all rows (a
//      union: at 4 rows and 50% sparsity it is ~94% of the rows, against 4 × 50% read row by row).
//      Top-k: the k-th largest |a| by a radix select on the bit patterns of |a| (non-negative floats
//      order as their bits, NaN above +inf: torch.topk's order).
//   2. In parallel over OUTPUT columns: each thread owns a slice of y (whole cache lines) and streams
//      its slice of every kept weight row; nothing is reduced across threads. A slice goes in panels
//      whose R rows of y stay in L1 (16 KB); each kept row's part of the panel is read from start to
//      end (contiguous, so the hardware prefetchers follow it), four kept rows per pass over the panel
//      (y loaded and stored once per four rows), vectorised over the columns. The next four kept rows
//      are prefetched once per 4 KB page alongside (they are scattered: no hardware prefetcher can
//      guess them; measured below, at SG_GEMV_PREFETCH). Measured against the alternative, tiles of
//      8 vectors × R accumulators in registers walked down all kept rows (512 B read per row and tile,
//      scattered; prefetched or not): the panels were 5–17% faster on hot weights and up to 27% faster
//      on weights read from memory (one thread, 2048→5632 and 5632→2048, 50% and 90% skipped).
//      Under 1 MB of kept weight runs on one thread (waking a second costs more than it saves).
//
// Written with GCC vector extensions (no intrinsics), as block_sparse_attention.cpp: with
// -march=native the vectors become AVX-512, AVX2 or 128-bit registers. The library's
// sg_source_hash and sg_cpu_supported are defined there, once for the whole library.

// No AVX512-FP16 instructions here, even where -march=native has them: the compiler would use them for
// every 16-bit move (bf16 too), and the library's load-time check (sg_cpu_supported) asks for AVX-512
// F/VL/BW/DQ only, so a build copied to another AVX-512 CPU would die on them. fp16 converts with
// F16C/AVX-512F instead; what is left is AVX-512 F/VL/BW/DQ (checked against -march=skylake-avx512).
#if defined(__AVX512FP16__) && !defined(__clang__)
#pragma GCC target("no-avx512fp16")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vu16 __attribute__((vector_size(kLanes * 2)));

// Element types: float, bfloat16 (its bits) and, where the compiler has it, IEEE half.
struct bf16 {
  uint16_t bits;
};
#if defined(__FLT16_MAX__)
#define SG_HAVE_FP16 1
typedef _Float16 half;
#endif

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename T>
T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16 from_float<bf16>(float x) {  // round to nearest even, NaN stays NaN (as torch)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return bf16{static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7fff + ((bits >> 16) & 1);
  return bf16{static_cast<uint16_t>(bits >> 16)};
}

inline vf load(const float* p) {  // kLanes elements from any address, as floats
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const bf16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu32) << 16);
}

#if SG_HAVE_FP16
inline float to_float(half x) { return static_cast<float>(x); }
template <>
inline half from_float<half>(float x) { return static_cast<half>(x); }
inline vf load(const half* p) {  // by its bits: without AVX512-FP16 a vector conversion goes lane by lane
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 u = __builtin_convertvector(h, vu32), sign = (u & 0x8000u) << 16;
  const vu32 bits = ((u & 0x7fffu) << 13) + ((127u - 15u) << 23);  // exponent rebiased, mantissa widened
  const vu32 exponent = u & 0x7c00u;
  const vf normal = (vf)(exponent == 0x7c00u ? bits + ((128u - 16u) << 23) : bits);  // inf, NaN: all ones
  const vf subnormal = (vf)(bits + (1u << 23)) - (vf)(vu32{} + (113u << 23));          // 0 and subnormals
  return (vf)((vu32)(exponent == 0u ? subnormal : normal) | sign);
}
#endif

template <typename T>
inline float round_to(float x) { return to_float(from_float<T>(x)); }  // what the dtype keeps of x

inline uint32_t magnitude_bits(float a) {  // |a| as bits: ordered as |a| is, NaN above +inf
  uint32_t bits;
  std::memcpy(&bits, &a, 4);
  return bits & 0x7fffffffu;
}

// The kept list of one call (module comment, step 1): n indices and their coefficients, R per index,
// padded with kAhead copies of the last index (the prefetch reads ahead of the list without a test).
struct Kept {
  std::vector<int64_t> index;
  std::vector<float> coef;
  std::vector<uint32_t> bits;  // top-k: the row's |a| as bits, for the selection
  int64_t n = 0;
};

constexpr int kGroup = 4;           // kept rows per pass over a panel
constexpr int kAhead = 2 * kGroup;  // padding of the kept list: the prefetch reads the next group
// One prefetch per this many bytes of each of the next group's rows, at the columns being read (0:
// none; build with -DSG_GEMV_PREFETCH=… to time another). Measured, one thread, 2048→5632 and
// 5632→2048, speed-up over dense at 50% / 90% skipped: weights from memory, none 2.0x / 9.5–10.5x,
// every line 2.8x / 13.7–15.5x, every 4 KB 3.2–3.4x / 15–17x; hot weights, every line cost 10% and
// every 4 KB nothing. A prefetch at the start of each row's page is what pays: the hardware prefetchers
// follow a row within a page once it has started, but cannot guess where the next kept row is.
#ifndef SG_GEMV_PREFETCH
#define SG_GEMV_PREFETCH 4096
#endif

// The k-th largest of bits[0 : n) (1 ≤ k ≤ n; bits reordered): a radix select, 11 + 11 + 9 bits from
// the top (bit 31 is 0: |a| has no sign), each level keeping the candidates of the one bucket that
// holds the k-th. Two or three passes over a shrinking list, where std::nth_element's comparisons
// mispredict half the time: the whole top-k list of 5632 inputs took 23 µs with it, 83 µs before.
uint32_t kth_largest(uint32_t* bits, int64_t n, int64_t k) {
  static constexpr int kShift[3] = {20, 9, 0}, kWidth[3] = {11, 11, 9};
  for (int level = 0; level < 3 && n > 1; ++level) {
    const int shift = kShift[level];
    const uint32_t mask = (1u << kWidth[level]) - 1;
    int64_t count[2048] = {};
    for (int64_t i = 0; i < n; ++i) ++count[(bits[i] >> shift) & mask];
    uint32_t bucket = mask;
    while (count[bucket] < k) k -= count[bucket--];  // from the top: the bucket of the k-th largest
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      bits[m] = bits[i];
      m += ((bits[i] >> shift) & mask) == bucket;
    }
    n = m;
  }
  return bits[0];  // the candidates left agree on every bit
}

template <int R, typename T>
void build(const T* x, int64_t xs0, int64_t xs1, const T* centre, int64_t cs, int64_t in, float threshold,
           int64_t k, Kept& kept) {
  kept.index.resize(in + kAhead);
  kept.coef.resize((in + kAhead) * R);
  int64_t* index = kept.index.data();
  float* coef = kept.coef.data();
  const float t = round_to<T>(threshold);
  uint32_t kth[R];  // top-k: bits of the k-th largest |a| of each row
  for (int r = 0; r < R && k > 0; ++r) {
    kept.bits.resize(in);
    uint32_t* bits = kept.bits.data();
    for (int64_t j = 0; j < in; ++j) {
      const float c = centre ? to_float(centre[j * cs]) : 0.0f;
      bits[j] = magnitude_bits(round_to<T>(to_float(x[r * xs0 + j * xs1]) - c));
    }
    kth[r] = kth_largest(bits, in, k);
  }
  int64_t n = 0;
  for (int64_t j = 0; j < in; ++j) {
    const float c = centre ? to_float(centre[j * cs]) : 0.0f;
    bool any = false;
    for (int r = 0; r < R; ++r) {
      const float a = round_to<T>(to_float(x[r * xs0 + j * xs1]) - c);
      bool keep;
      if (k > 0) {  // |a| ≥ kth (never when kth is NaN: more NaN than k), or a is NaN
        keep = (magnitude_bits(a) >= kth[r] && kth[r] <= 0x7f800000u) || std::isnan(a);
      } else {
        keep = !(std::fabs(a) <= t);
      }
      coef[n * R + r] = keep ? a : 0.0f;
      any |= keep;
    }
    index[n] = j;  // written always, kept by advancing n: no branch to mispredict
    n += any;
  }
  for (int p = 0; p < kAhead; ++p) index[n + p] = n ? index[n - 1] : 0;
  kept.n = n;
}

constexpr int64_t kPanelBytes = 16 * 1024;  // of y per panel, all R rows: stays in L1

// y[r][0 : width] += Σ_{g < G} coef[g][r] · rows[g][0 : width] (`full` columns by vectors, the rest
// one by one), prefetching `next[g]` at the same columns every SG_GEMV_PREFETCH bytes.
template <int R, int G, typename T>
inline void accumulate(float* y, int64_t stride, const T* const* rows, const float* coef,
                       const char* const* next, int64_t full, int64_t width) {
  for (int64_t v = 0; v < full; v += kLanes) {
    if (SG_GEMV_PREFETCH && (v * sizeof(T)) % SG_GEMV_PREFETCH == 0) {
      for (int g = 0; g < G; ++g) __builtin_prefetch(next[g] + v * sizeof(T), 0, 3);
    }
    vf wv[G];
    for (int g = 0; g < G; ++g) wv[g] = load(rows[g] + v);
    for (int r = 0; r < R; ++r) {
      vf acc = load(y + r * stride + v);
      for (int g = 0; g < G; ++g) acc += coef[g * R + r] * wv[g];
      std::memcpy(y + r * stride + v, &acc, sizeof acc);
    }
  }
  for (int64_t v = full; v < width; ++v)
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) y[r * stride + v] += coef[g * R + r] * to_float(rows[g][v]);
}

// Columns [c0, c1) of every row of the output (module comment, step 2).
template <int R, typename T>
void columns(const Kept& kept, const T* w, int64_t ld, int64_t c0, int64_t c1, const T* bias, int64_t bs,
             T* out, int64_t os) {
  constexpr int64_t kPanel = kPanelBytes / (4 * R) / kLanes * kLanes;
  alignas(64) float y[R * kPanel];
  const int64_t* index = kept.index.data();
  const float* coef = kept.coef.data();
  const int64_t n = kept.n;
  for (int64_t p0 = c0; p0 < c1; p0 += kPanel) {
    const int64_t width = std::min(kPanel, c1 - p0), full = width / kLanes * kLanes;
    for (int64_t c = 0; c < width; ++c) {
      const float b = bias ? to_float(bias[(p0 + c) * bs]) : 0.0f;
      for (int r = 0; r < R; ++r) y[r * kPanel + c] = b;
    }
    const T* rows[kGroup];
    const char* next[kGroup];
    int64_t i = 0;
    for (; i + kGroup <= n; i += kGroup) {
      for (int g = 0; g < kGroup; ++g) {
        rows[g] = w + index[i + g] * ld + p0;
        next[g] = reinterpret_cast<const char*>(w + index[i + kGroup + g] * ld + p0);
      }
      accumulate<R, kGroup>(y, kPanel, rows, coef + i * R, next, full, width);
    }
    for (; i < n; ++i) {
      rows[0] = w + index[i] * ld + p0;
      next[0] = reinterpret_cast<const char*>(rows[0]);
      accumulate<R, 1>(y, kPanel, rows, coef + i * R, next, full, width);
    }
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < width; ++c) out[r * os + p0 + c] = from_float<T>(y[r * kPanel + c]);
  }
}

// Below this many kept weight bytes per thread, fewer threads: waking a second thread and joining it
// costs more than it saves on a small problem. Measured, 2 threads, weights in cache, µs per call
// with one thread / two: 344 KB kept (256→688, 50%): 14.2 / 15.2; 410 KB: 21.7 / 28.8; 1.6 MB: 87 /
// 84; 2 MB: 112 / 88.
constexpr int64_t kBytesPerThread = 512 * 1024;

template <int R, typename T>
int gemv(const T* x, int64_t xs0, int64_t xs1, const T* w, int64_t ld, const T* bias, int64_t bs,
         const T* centre, int64_t cs, T* out, int64_t in, int64_t out_f, float threshold, int64_t k,
         int64_t threads) {
  thread_local Kept kept;  // reused call after call: no allocation once it has grown
  try {
    build<R, T>(x, xs0, xs1, centre, cs, in, threshold, k, kept);
  } catch (...) {  // std::bad_alloc
    return 1;
  }
  // slices of whole cache lines of the output (and of each weight row's part), one per thread
  constexpr int64_t kLine = 64 / sizeof(T) > kLanes ? 64 / sizeof(T) : kLanes;
  const int64_t lines = (out_f + kLine - 1) / kLine;
  const int64_t bytes = kept.n * out_f * static_cast<int64_t>(sizeof(T));
  const int team =
      static_cast<int>(std::max<int64_t>(1, std::min({threads, lines, bytes / kBytesPerThread})));
  const Kept& list = kept;
#pragma omp parallel num_threads(team) if (team > 1)
  {
#if defined(_OPENMP)
    const int64_t id = omp_get_thread_num();
#else
    const int64_t id = 0;
#endif
    const int64_t c0 = std::min(out_f, lines * id / team * kLine);
    const int64_t c1 = std::min(out_f, lines * (id + 1) / team * kLine);
    columns<R, T>(list, w, ld, c0, c1, bias, bs, out, out_f);
  }
  return 0;
}

template <typename T>
int run(const T* x, int64_t rows, int64_t xs0, int64_t xs1, const void* w, int64_t ld, const void* bias,
        int64_t bs, const void* centre, int64_t cs, void* out, int64_t in, int64_t out_f, float threshold,
        int64_t k, int64_t threads) {
  const auto* wt = static_cast<const T*>(w);
  const auto* b = static_cast<const T*>(bias);
  const auto* c = static_cast<const T*>(centre);
  auto* y = static_cast<T*>(out);
  switch (rows) {
    case 1: return gemv<1, T>(x, xs0, xs1, wt, ld, b, bs, c, cs, y, in, out_f, threshold, k, threads);
    case 2: return gemv<2, T>(x, xs0, xs1, wt, ld, b, bs, c, cs, y, in, out_f, threshold, k, threads);
    case 3: return gemv<3, T>(x, xs0, xs1, wt, ld, b, bs, c, cs, y, in, out_f, threshold, k, threads);
    case 4: return gemv<4, T>(x, xs0, xs1, wt, ld, b, bs, c, cs, y, in, out_f, threshold, k, threads);
    default: return 2;
  }
}

}  // namespace

// The sha256 of the kernel sources (the library's is returned by sg_source_hash, defined in
// block_sparse_attention.cpp): restamped by `python -m sparsegraph.codegen.cpu_kernels`.
#define SG_SOURCE_HASH "e7b4cb393936c5c771ed396977c8f85b80e129a8dc8debbffc1855cf2397783c"

extern "C" {

// One call's arguments, passed as one pointer: the Python binding packs them with struct.Struct, in
// this order (`cpu_kernels._GEMV_FIELDS`; a test checks the two agree). Sixteen ctypes arguments
// cost ~5 µs to convert per call, more than the kernel itself at small sizes; one costs ~0.5 µs.
// Every field is 8 bytes: no padding.
struct SgGemvCall {
  int64_t dtype;       // 0 fp32, 1 bf16, 2 fp16: the dtype of every tensor below
  const void* x;       // [rows, in], element (r, j) at x[r·xs0 + j·xs1]
  int64_t rows, xs0, xs1;
  const void* weight;  // weight_t [in, out], element (j, o) at weight[j·ld + o]
  int64_t ld;
  const void* bias;    // [out] at bias[o·bs], or null
  int64_t bs;
  const void* centre;  // [in] at centre[j·cs], or null
  int64_t cs;
  void* out;           // contiguous [rows, out]
  int64_t in, out_f;
  int64_t k;           // > 0: top-k mode (k ≤ in); else threshold mode
  int64_t threads;     // at most this many OpenMP threads
  double threshold;    // threshold mode: keep ¬(|a| ≤ threshold)
};

// The op for 1–4 rows (module comment). Returns 0; 1 when memory for the kept list could not be
// allocated; 2 for a call it does not take (rows outside 1–4, k > in, a dtype this build lacks): the
// caller runs its torch path then.
int sg_sparse_gemv(const SgGemvCall* call) {
  const SgGemvCall& a = *call;
  if (a.k > a.in || a.in <= 0 || a.out_f <= 0) return 2;
  const float t = static_cast<float>(a.threshold);
  switch (a.dtype) {
    case 0:
      return run(static_cast<const float*>(a.x), a.rows, a.xs0, a.xs1, a.weight, a.ld, a.bias, a.bs,
                 a.centre, a.cs, a.out, a.in, a.out_f, t, a.k, a.threads);
    case 1:
      return run(static_cast<const bf16*>(a.x), a.rows, a.xs0, a.xs1, a.weight, a.ld, a.bias, a.bs,
                 a.centre, a.cs, a.out, a.in, a.out_f, t, a.k, a.threads);
#if SG_HAVE_FP16
    case 2:
      return run(static_cast<const half*>(a.x), a.rows, a.xs0, a.xs1, a.weight, a.ld, a.bias, a.bs,
                 a.centre, a.cs, a.out, a.in, a.out_f, t, a.k, a.threads);
#endif
    default:
      return 2;
  }
}

}  // extern "C"
