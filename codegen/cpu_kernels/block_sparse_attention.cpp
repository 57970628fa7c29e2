// sparsegraph::block_sparse_attention on the CPU: a flash-attention forward over the listed key blocks.
//
// Contract (the op's, see codegen/block_sparse_attention.py): for query i of head h, with
// M(h, i, j) = [key block of j is listed in layout[h, i / block]] ∧ (¬causal ∨ j ≤ i),
//
//     out[b, h, i] = Σ_j softmax_j( q_i·k_j · scale + mask[b, h, i, j]  over j with M ) · v_j
//
// and 0 for a query with no allowed key. fp32 in and out, fp32 accumulation. Pyramid heads (pooled[h]
// ≠ 0, when pooled keys are given) also read every key block J their list leaves out through its mean
// key k̄_J and value v̄_J, as one more key with score q_i·k̄_J · scale + log n_J (n_J: the block's keys):
// the same online softmax runs on over those nk pooled keys after the listed blocks, so the pooled
// part costs one pass of nk keys a query, fused (done in torch, its score matrix took 2x the listed
// blocks' time at 32k tokens: elementwise passes over L × nk scores).
//
// Why a compiled kernel: SDPA's CPU flash kernel, the torch building block, splits queries in chunks
// of 32 when a call has fewer than 192 of them, and its GEMM calls then run at 115–165 GFLOP/s here
// against 235 dense (docs/findings.md): at 90% sparsity that caps any composition of SDPA calls near
// 6x over dense. This kernel does the whole layout in one pass, with no gather and no merge.
//
// Shape of the computation. One work item is (batch, head, query block); items run in parallel
// (OpenMP, dynamic schedule). Within an item, queries go in chunks of QC = V vectors (V = 4, 64
// queries with AVX-512, when the block has that many; else 2) and the chunk is held *transposed*, one
// SIMD lane per query:
//
//   - Qt[d][lane] = q[query lane][d], packed once per chunk;
//   - S^T[key][lane] = Σ_d k[key][d] · Qt[d][lane]: a micro-tile of KR keys × QC queries in registers
//     (KR·V accumulators: 16 with AVX-512), k read in place (a broadcast per key and d), so K needs no
//     packing or transposing;
//   - online softmax per lane, in the flash form: with the running max m and sum l of a lane,
//         m' = max(m, max_key S),  P = e^{S − m'},  l' = l·e^{m − m'} + Σ_key P,  O ← O·e^{m − m'}
//     — every reduction runs over keys, i.e. across rows of S^T, so it is plain vector arithmetic;
//   - O^T[e][lane] += Σ_key v[key][e] · P^T[key][lane]: the same micro-tile shape (KR values of e ×
//     QC queries), v read in place;
//   - out[query][e] = O^T[e][lane] / l at the end of the chunk (0 where l = 0).
//
// Causal: blocks after the query block are skipped, and in the rest keys past the chunk's last
// query are not computed at all (half of each diagonal block); inside the computed part, key > query
// is masked. A key-padding mask (constant over queries, stride 0) is added as one broadcast per key;
// a mask stored query-fastest (the binding transposes one that varies over queries) as one vector
// load per key; any other as one load per (query, key). e^x is a degree-6 polynomial after range
// reduction by ln 2 (relative error ≈ 1e-7), with e^{−∞} = 0 exactly.
//
// Written with GCC vector extensions (no intrinsics): built with -march=native the vectors become
// AVX-512, AVX2 or 128-bit (SSE, NEON) registers; any GCC/Clang target compiles it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

// Vector width and accumulator budget follow the registers the target has: a micro-tile keeps
// KR × V accumulators, V operands and a broadcast in registers.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kAccumulators = 16;  // of 32 zmm registers
#elif defined(__AVX__)
constexpr int kLanes = 8, kAccumulators = 8;    // of 16 ymm registers
#else
constexpr int kLanes = 4, kAccumulators = 16;   // SSE (16) / NEON (32) 128-bit registers
#endif

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline vf load(const float* p) {  // kLanes floats from any address
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline vf lane_index() {  // {0, 1, …, kLanes − 1}
  float index[kLanes];
  for (int w = 0; w < kLanes; ++w) index[w] = static_cast<float>(w);
  return load(index);
}

// e^x per lane: x = n·ln2 + r, |r| ≤ ln2/2; e^r by its Taylor polynomial to r^6 (error < 2e-7);
// 2^n by writing n + 127 into the exponent bits. Below −87 (and at −∞) the result is 0.
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f), magic = splat(12582912.0f);  // 1.5·2^23: float + magic rounds to an integer
  vf xc = x < lo ? lo : x;
  vf t = xc * 1.44269504088896341f + magic;
  vi n = (vi)t - (vi)magic;
  vf nf = t - magic;
  vf r = xc - nf * 0.693145751953125f - nf * 1.42860682030941723212e-6f;  // ln 2 in two parts
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vf y = p * (vf)((n + 127) << 23);
  return x < lo ? vf{} : y;
}

struct Tensor4 {  // a strided [B, H, T, E] operand (element strides; E's stride is 1)
  const float* data;
  const int64_t* stride;
  const float* row(int64_t b, int64_t h, int64_t t) const {
    return data + b * stride[0] + h * stride[1] + t * stride[2];
  }
};

// St[r][·] = Σ_d kr[r][d] · Qt[d][·] for n keys (rows of kr, `ks` apart); V vectors per row.
template <int V>
void scores(const float* kr, int64_t ks, int64_t n, int64_t E, const vf* Qt, vf* St) {
  constexpr int T = kAccumulators / V;
  int64_t r0 = 0;
  for (; r0 + T <= n; r0 += T) {
    vf acc[T][V] = {};
    const float* k0 = kr + r0 * ks;
    for (int64_t d = 0; d < E; ++d) {
      vf qd[V];
      for (int u = 0; u < V; ++u) qd[u] = Qt[d * V + u];
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r) {
        const float kk = k0[r * ks + d];
        for (int u = 0; u < V; ++u) acc[r][u] += kk * qd[u];
      }
    }
    for (int r = 0; r < T; ++r)
      for (int u = 0; u < V; ++u) St[(r0 + r) * V + u] = acc[r][u];
  }
  for (; r0 < n; ++r0) {
    vf acc[V] = {};
    const float* k0 = kr + r0 * ks;
    for (int64_t d = 0; d < E; ++d)
      for (int u = 0; u < V; ++u) acc[u] += k0[d] * Qt[d * V + u];
    for (int u = 0; u < V; ++u) St[r0 * V + u] = acc[u];
  }
}

// Ot[e][·] += Σ_r vr[r][e] · Pt[r][·] for n keys (rows of vr, `vs` apart); V vectors per row.
template <int V>
void accumulate(const float* vr, int64_t vs, int64_t n, int64_t Ev, const vf* Pt, vf* Ot) {
  constexpr int T = kAccumulators / V;
  int64_t e0 = 0;
  for (; e0 + T <= Ev; e0 += T) {
    vf acc[T][V];
    for (int r = 0; r < T; ++r)
      for (int u = 0; u < V; ++u) acc[r][u] = Ot[(e0 + r) * V + u];
    for (int64_t key = 0; key < n; ++key) {
      vf p[V];
      for (int u = 0; u < V; ++u) p[u] = Pt[key * V + u];
      const float* v0 = vr + key * vs + e0;
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r)
        for (int u = 0; u < V; ++u) acc[r][u] += v0[r] * p[u];
    }
    for (int r = 0; r < T; ++r)
      for (int u = 0; u < V; ++u) Ot[(e0 + r) * V + u] = acc[r][u];
  }
  for (; e0 < Ev; ++e0) {
    vf acc[V];
    for (int u = 0; u < V; ++u) acc[u] = Ot[e0 * V + u];
    for (int64_t key = 0; key < n; ++key)
      for (int u = 0; u < V; ++u) acc[u] += vr[key * vs + e0] * Pt[key * V + u];
    for (int u = 0; u < V; ++u) Ot[e0 * V + u] = acc[u];
  }
}

void* scratch(int64_t vectors) {  // aligned_alloc wants a size that is a multiple of the alignment
  return std::aligned_alloc(64, std::max<int64_t>(1, vectors) * sizeof(vf));
}

// One online-softmax step over n keys whose scores St[r][·] are in place (top: their max per lane):
// St becomes e^{S − m'}, the running max m, sum l and the accumulator O^T are rescaled (module comment).
template <int V>
void fold(vf* St, int64_t n, int64_t Ev, const vf* top, vf* m, vf* l, vf* Ot) {
  for (int u = 0; u < V; ++u) {
    const vf m2 = vmax(m[u], top[u]);
    const vf base = m2 == splat(-INFINITY) ? vf{} : m2;  // nothing seen yet: e^{−∞ − 0} = 0
    const vf alpha = vexp(m[u] - base);
    vf sum = {};
    for (int64_t r = 0; r < n; ++r) {
      const vf p = vexp(St[r * V + u] - base);
      St[r * V + u] = p;
      sum += p;
    }
    l[u] = l[u] * alpha + sum;
    m[u] = m2;
    for (int64_t e = 0; e < Ev; ++e) Ot[e * V + u] *= alpha;
  }
}

struct Pooled {  // pyramid heads' pooled keys (module comment); kbar null: none
  const float* kbar;
  const int64_t* kbs;
  const float* vbar;
  const int64_t* vbs;
  const float* logn;     // [nk]
  const int64_t* heads;  // [H]: 1 for a pyramid head
};

// The kernel with query chunks of V vectors (module comment); one OpenMP region.
template <int V>
int attend(const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
           const int64_t* vs, float* out, const Pooled& pooled, const int64_t* layout, int64_t nsel,
           const float* mask, const int64_t* ms, int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t S,
           int64_t E, int64_t Ev, int64_t block, int causal, float scale, int threads) {
  const int64_t nq = (L + block - 1) / block, nk = (S + block - 1) / block, group = H / Hkv;
  const int64_t items = B * H * nq;
  constexpr int kChunk = kLanes * V;  // queries per chunk (QC)
  const Tensor4 Q{q, qs}, K{k, ks}, Val{v, vs}, KB{pooled.kbar, pooled.kbs}, VB{pooled.vbar, pooled.vbs};
  const float neg_inf = -INFINITY;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    vf* Qt = static_cast<vf*>(scratch(V * E));
    vf* St = static_cast<vf*>(scratch(V * block));
    vf* Ot = static_cast<vf*>(scratch(V * Ev));
    char* far = static_cast<char*>(std::malloc(std::max<int64_t>(1, nk)));  // pooled key J is read
    failed = !Qt || !St || !Ot || !far;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      if (failed) continue;
      const int64_t b = item / (H * nq), h = item / nq % H, qi = item % nq, hk = h / group;
      const int64_t* listed = layout + (h * nq + qi) * nsel;
      const float* mh = mask ? mask + b * ms[0] + h * ms[1] : nullptr;
      const int64_t qend = std::min(L, (qi + 1) * block);
      const bool read_pooled = pooled.kbar && pooled.heads[h];
      if (read_pooled) {  // which pooled keys this query block reads: those of the blocks it does not list
        std::memset(far, 1, nk);
        for (int64_t t = 0; t < nsel; ++t)
          if (listed[t] >= 0 && listed[t] < nk) far[listed[t]] = 0;
      }
      for (int64_t c0 = qi * block; c0 < qend; c0 += kChunk) {
        const int64_t rows = std::min<int64_t>(kChunk, qend - c0), last = c0 + rows - 1;
        for (int64_t d = 0; d < E; ++d) {
          float* lane = reinterpret_cast<float*>(&Qt[d * V]);
          for (int64_t r = 0; r < kChunk; ++r) lane[r] = r < rows ? Q.row(b, h, c0 + r)[d] : 0.0f;
        }
        for (int64_t e = 0; e < V * Ev; ++e) Ot[e] = vf{};
        vf m[V], l[V], pos[V];
        for (int u = 0; u < V; ++u) {
          m[u] = splat(neg_inf);
          l[u] = vf{};
          pos[u] = splat(static_cast<float>(c0 + u * kLanes)) + lane_index();
        }
        for (int64_t t = 0; t < nsel; ++t) {
          const int64_t j = listed[t];
          if (j < 0 || j >= nk || (causal && j > qi)) continue;
          const int64_t k0 = j * block;
          int64_t n = std::min(block, S - k0);
          if (causal) n = std::min(n, last - k0 + 1);  // keys after the chunk's last query: never seen
          if (n <= 0) continue;
          scores<V>(K.row(b, hk, k0), ks[2], n, E, Qt, St);
          const bool triangle = causal && k0 + n - 1 > c0;  // some key is after some query of the chunk
          vf top[V];
          for (int u = 0; u < V; ++u) top[u] = splat(neg_inf);
          for (int64_t r = 0; r < n; ++r) {
            for (int u = 0; u < V; ++u) {
              vf s = St[r * V + u] * scale;
              if (mh && ms[2] == 0) {
                s += mh[(k0 + r) * ms[3]];
              } else if (mh && ms[2] == 1 && rows == kChunk) {  // queries adjacent: one vector load
                s += load(mh + c0 + u * kLanes + (k0 + r) * ms[3]);
              } else if (mh) {
                float add[kLanes];
                for (int w = 0; w < kLanes; ++w)
                  add[w] = mh[std::min(c0 + u * kLanes + w, L - 1) * ms[2] + (k0 + r) * ms[3]];
                s += load(add);
              }
              if (triangle) s = splat(static_cast<float>(k0 + r)) > pos[u] ? splat(neg_inf) : s;
              St[r * V + u] = s;
              top[u] = vmax(top[u], s);
            }
          }
          fold<V>(St, n, Ev, top, m, l, Ot);
          accumulate<V>(Val.row(b, hk, k0), vs[2], n, Ev, St, Ot);
        }
        if (read_pooled) {  // the unlisted blocks' pooled keys, `block` at a time
          for (int64_t j0 = 0; j0 < nk; j0 += block) {
            const int64_t n = std::min(block, nk - j0);
            scores<V>(KB.row(b, hk, j0), pooled.kbs[2], n, E, Qt, St);
            vf top[V];
            for (int u = 0; u < V; ++u) top[u] = splat(neg_inf);
            for (int64_t r = 0; r < n; ++r) {
              const float bias = far[j0 + r] ? pooled.logn[j0 + r] : neg_inf;
              for (int u = 0; u < V; ++u) {
                const vf s = St[r * V + u] * scale + bias;
                St[r * V + u] = s;
                top[u] = vmax(top[u], s);
              }
            }
            fold<V>(St, n, Ev, top, m, l, Ot);
            accumulate<V>(VB.row(b, hk, j0), pooled.vbs[2], n, Ev, St, Ot);
          }
        }
        for (int u = 0; u < V; ++u) {
          const vf inv = l[u] > vf{} ? 1.0f / l[u] : vf{};
          for (int64_t e = 0; e < Ev; ++e) Ot[e * V + u] *= inv;
        }
        float* o = out + ((b * H + h) * L + c0) * Ev;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t e = 0; e < Ev; ++e) o[r * Ev + e] = reinterpret_cast<const float*>(&Ot[e * V])[r];
      }
    }
    std::free(Qt);
    std::free(St);
    std::free(Ot);
    std::free(far);
  }
  return failed;
}

}  // namespace

// The sha256 of the kernel sources, this stamp blanked: the Python binding refuses a library built
// from other sources (a stale build) instead of calling it. Restamped by
// `python -m sparsegraph.codegen.cpu_kernels` after an edit; a test checks that it is current.
#define SG_SOURCE_HASH "e7b4cb393936c5c771ed396977c8f85b80e129a8dc8debbffc1855cf2397783c"

extern "C" {

const char* sg_source_hash() { return SG_SOURCE_HASH; }

// 1 when the CPU running this has every instruction set the library was compiled for (-march=native
// on the installing machine); 0 on another CPU (an environment copied elsewhere), where calling the
// kernels would die on an illegal instruction. Compiled for the baseline ISA so it can itself run.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("arch=x86-64")))
#endif
int sg_cpu_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  int ok = 1;
#if defined(__AVX__)
  ok &= __builtin_cpu_supports("avx") != 0;
#endif
#if defined(__AVX2__)
  ok &= __builtin_cpu_supports("avx2") != 0;
#endif
#if defined(__FMA__)
  ok &= __builtin_cpu_supports("fma") != 0;
#endif
#if defined(__AVX512F__)
  ok &= __builtin_cpu_supports("avx512f") != 0;
#endif
#if defined(__AVX512VL__)
  ok &= __builtin_cpu_supports("avx512vl") != 0;
#endif
#if defined(__AVX512BW__)
  ok &= __builtin_cpu_supports("avx512bw") != 0;
#endif
#if defined(__AVX512DQ__)
  ok &= __builtin_cpu_supports("avx512dq") != 0;
#endif
  return ok;
#else
  return 1;  // other architectures: the build is assumed to match (no portable runtime check)
#endif
}

// q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev]: strided (4 element strides each, the last 1).
// out: contiguous [B, H, L, Ev]. layout: contiguous int64 [H, nq, nsel], −1 padded. mask: null or an
// additive float mask read as mask[b·ms0 + h·ms1 + i·ms2 + j·ms3] (a stride of 0 broadcasts). kbar: null
// (no pyramid head), or the pooled keys k̄ [B, Hkv, nk, E] and v̄ [B, Hkv, nk, Ev] (strided as q), log n_J
// [nk] and pooled_heads [H] (1: the head reads its unlisted blocks pooled; module comment).
// Returns 0, or 1 when scratch memory could not be allocated.
int sg_block_sparse_attention_f32(const float* q, const int64_t* qs, const float* k, const int64_t* ks,
                                  const float* v, const int64_t* vs, float* out, const float* kbar,
                                  const int64_t* kbs, const float* vbar, const int64_t* vbs, const float* logn,
                                  const int64_t* pooled_heads, const int64_t* layout, int64_t nsel,
                                  const float* mask, const int64_t* ms, int64_t B, int64_t H, int64_t Hkv,
                                  int64_t L, int64_t S, int64_t E, int64_t Ev, int64_t block, int causal,
                                  float scale, int threads) {
  // A query block of ≥ 4 vectors of queries takes chunks of 4 (K and V read once per 4 vectors, and
  // fewer loads per FMA in the micro-tiles: 8 per 16 FMAs against 10) where 16 accumulators fit;
  // smaller blocks take 2, so few lanes idle. Measured (2-core Xeon): 8–16% faster at AVX-512 with
  // block 64 and 128; with AVX2's 8 accumulators, chunks of 4 were 10% slower.
  const auto run = block >= 4 * kLanes && kAccumulators >= 16 ? attend<4> : attend<2>;
  const Pooled pooled{kbar, kbs, vbar, vbs, logn, pooled_heads};
  return run(q, qs, k, ks, v, vs, out, pooled, layout, nsel, mask, ms, B, H, Hkv, L, S, E, Ev, block, causal,
             scale, threads);
}

}  // extern "C"
