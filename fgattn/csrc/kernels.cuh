// Kernel bodies of fgattn's CUDA backend: channel attention softmax(scale · q kᵀ) v and contrastive
// channel attention |softmax(s A Aᵀ) − η softmax(s B Bᵀ)| A, forward and backward.
//
// Layout: every tensor is (B, C, L); the softmax runs over the C axis (flash attention's "sequence")
// and L is the reduction axis of the logits. A block (CTA) of kThreads threads owns kBM rows of the
// output and kBD of its columns; it loops over the C axis in kBN-wide column blocks, so the C x C
// matrix only ever exists as one kBM x kBN fp32 tile in shared memory.
//
// Arithmetic: inputs (fp32/fp16/bf16) are converted to fp32 when staged into shared memory; logits,
// softmax statistics and accumulators are fp32. The two tile products (logits over L, P times a
// value tile) run on TF32 tensor cores (WMMA m16n16k8, TC = true) for fp16/bf16 — exact products,
// since TF32 holds their mantissas — and for fp32 when TF32 is allowed; otherwise (fp32 default)
// on plain fp32 FMA (TC = false). The row max is taken of the SCALED logits (scale < 0 default).
//
// The bodies are written once and compiled twice: by nvcc into __global__ kernels
// (fgattn_cuda_kernels.cu), and by the host compiler into a CPU emulation (cpu_emulation.cpp) that
// runs each block with kThreads std::threads and a barrier for __syncthreads, so the index math,
// masking and synchronisation are tested without a GPU. Hence: no warp intrinsics, no assumptions
// beyond "kThreads threads, barriers between phases", shared memory declared with FG_SHARED; the
// WMMA fragments have a host stand-in (whole fragment per lane, lane 0 stores).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <mma.h>
#define FG_D __device__ __forceinline__
#define FG_SHARED __shared__
#define FG_SHARED_ALIGNED __shared__ __align__(32)
#define FG_SYNC(ctx) __syncthreads()
#define FG_UNROLL _Pragma("unroll")
#else
#include <condition_variable>
#include <mutex>
#define FG_D inline
// One block runs at a time in the emulation, so a function-local static is exactly "one copy per
// block, visible to all its threads".
#define FG_SHARED static
#define FG_SHARED_ALIGNED alignas(32) static
#define FG_SYNC(ctx) (ctx).bar->wait()
#define FG_UNROLL
#endif

namespace fgattn {

constexpr int kBM = 64;  // output rows per block
constexpr int kBN = 64;  // logit columns per loop step (must equal kBM: tile_dot shares loads)
constexpr int kBK = 16;  // reduction chunk staged in shared memory
constexpr int kBD = 64;  // output columns per block
constexpr int kThreads = 256;
// Output column pieces (kBD wide) per block: a block computes each logit tile once and applies it
// to NP pieces held in registers (16 floats each per thread), instead of one block per piece
// recomputing the logits. Fewer pieces where a kernel keeps more tiles live.
constexpr int kNPFwd = 4;   // ca_fwd, co_fwd: 256 output columns
constexpr int kNPDq = 4;    // ca_bwd_dq: 256 columns of dq
constexpr int kNPDkdv = 2;  // ca_bwd_dkdv: 128 columns of dk and of dv
// Thread t owns the 4 x 4 micro-tile rows tr + 16 i, columns tc + 16 j (i, j < 4) of every
// 64 x 64 tile: strided so a warp reads distinct shared-memory banks.
constexpr int kTR = 16;
static_assert(kBM == kBN && kBM == kBD && kTR * kTR == kThreads && 4 * kTR == kBM, "tile shape");
// Leading dimensions of the shared tiles read by WMMA: multiples of 4 floats (16 bytes), and
// 16-row / 8-column offsets stay 32-byte aligned.
constexpr int kLdP = kBN + 4;  // probability / gradient tile P[kBM][kLdP]
constexpr int kLdK = kBK + 4;  // staged operand chunks [kBM][kLdK] (tensor-core path)
constexpr int kLdS = kBD + 4;  // staged value tile / fragment output [kBN][kLdS]
// Tensor-core path scratch, shared by tile_dot_tc and tile_pv_tc (never live at the same time).
constexpr int kScratch = (2 * kBM * kLdK > kBN * kLdS) ? 2 * kBM * kLdK : kBN * kLdS;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == 8 && kLdK % 8 == 4 && kLdS % 8 == 4, "fragment ownership / alignment");

#ifndef __CUDACC__
// A reusable barrier (generation counting) standing in for __syncthreads in the emulation.
struct Barrier {
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int count_ = 0;
  long gen_ = 0;
};
#endif

// Thread and block index of the running thread (threadIdx.x, blockIdx.{x,y,z} on the GPU).
struct Ctx {
  int tid, bx, by, bz;
#ifndef __CUDACC__
  Barrier* bar;
#endif
};

// A strided (B, rows, cols) view. Reads outside (rows, cols) give 0.
template <typename T>
struct Mat {
  const T* p;
  int64_t sb, sr, sc;
  int rows, cols;
};

template <typename T>
FG_D float ld(const Mat<T>& m, int b, int r, int c) {
  if (r >= m.rows || c >= m.cols) return 0.f;
  return static_cast<float>(m.p[int64_t(b) * m.sb + int64_t(r) * m.sr + int64_t(c) * m.sc]);
}

FG_D float sign(float w) { return w > 0.f ? 1.f : (w < 0.f ? -1.f : 0.f); }  // d|w|/dw, 0 at 0

// acc[i][j] = Σ_k A[a0 + r_i, k] B[b0 + c_j, k] over k < K (r_i = tr + 16 i, c_j = tc + 16 j).
// Starts and ends with the block synchronised.
template <typename T>
FG_D void tile_dot_fma(const Ctx& ctx, const Mat<T>& A, const Mat<T>& B, int b, int a0, int b0, int K,
                   float acc[4][4]) {
  FG_SHARED float As[kBM][kBK + 1];  // +1: row reads of a column land in distinct banks
  FG_SHARED float Bs[kBN][kBK + 1];
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kBK) {
    for (int idx = ctx.tid; idx < kBM * kBK; idx += kThreads) {
      const int r = idx / kBK, k = idx % kBK;
      const bool in = k0 + k < K;
      As[r][k] = in ? ld(A, b, a0 + r, k0 + k) : 0.f;
      Bs[r][k] = in ? ld(B, b, b0 + r, k0 + k) : 0.f;
    }
    FG_SYNC(ctx);
    FG_UNROLL
    for (int k = 0; k < kBK; ++k) {
      float a[4], bb[4];
      for (int i = 0; i < 4; ++i) a[i] = As[tr + kTR * i][k];
      for (int j = 0; j < 4; ++j) bb[j] = Bs[tc + kTR * j][k];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bb[j];
    }
    FG_SYNC(ctx);
  }
}

// acc[i][j] += Σ_k P[r_i][k] M[n0 + k, d0 + c_j] over the kBN rows of the column block n0.
// P must be written and synchronised before; ends with the block synchronised.
template <typename T>
FG_D void tile_pv_fma(const Ctx& ctx, const float (*P)[kLdP], const Mat<T>& M, int b, int n0, int d0,
                  float acc[4][4]) {
  FG_SHARED float Ms[kBN][kBD + 1];
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  for (int idx = ctx.tid; idx < kBN * kBD; idx += kThreads) {
    const int r = idx / kBD, c = idx % kBD;  // consecutive threads: consecutive columns
    Ms[r][c] = ld(M, b, n0 + r, d0 + c);
  }
  FG_SYNC(ctx);
  FG_UNROLL
  for (int k = 0; k < kBN; ++k) {
    float p[4], m[4];
    for (int i = 0; i < 4; ++i) p[i] = P[tr + kTR * i][k];
    for (int j = 0; j < 4; ++j) m[j] = Ms[k][tc + kTR * j];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] += p[i] * m[j];
  }
  FG_SYNC(ctx);
}

// ------------------------------------------------------------------------------------------------
// Tensor-core path: TF32 WMMA (m16n16k8), fp32 accumulation. TF32 keeps 10 mantissa bits, so
// bf16/fp16 inputs are multiplied exactly; only P (probabilities, dS) is rounded to TF32. fp32
// inputs take this path only when TF32 is allowed. The 64 x 64 result tile is 4 x 4 fragments;
// warp w owns fragment row w / 2 and fragment columns 2 (w % 2) and 2 (w % 2) + 1. Results go
// through shared memory into the per-thread micro-tile layout that the element-wise code uses.

// TF32 WMMA needs sm_80+; a build for an older GPU compiles the FMA path only (TC is ignored).
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FG_TF32_MMA 0
#else
#define FG_TF32_MMA 1
#endif

#if FG_TF32_MMA
#ifdef __CUDACC__
namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <typename Frag>
FG_D void frag_load(const Ctx&, Frag& f, const float* ptr, int ld) {
  wmma::load_matrix_sync(f, ptr, ld);
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
}
FG_D void frag_zero(FragC& c) { wmma::fill_fragment(c, 0.f); }
template <typename FragB>
FG_D void frag_mma(FragC& c, const FragA& a, const FragB& b) { wmma::mma_sync(c, a, b, c); }
FG_D void frag_store(const Ctx&, float* ptr, const FragC& c, int ld) {
  wmma::store_matrix_sync(ptr, c, ld, wmma::mem_row_major);
}
#else
// Emulation: every lane holds the whole fragment (same values), lane 0 stores it.
inline float to_tf32(float x) {  // cvt.rna.tf32.f32: round to nearest, ties away from zero
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&x, &u, 4);
  return x;
}
struct FragA {  // 16 x 8, row-major source
  float x[16][8];
};
struct FragBCol {  // 8 x 16 from a column-major source: element (k, n) at ptr[n * ld + k]
  float x[8][16];
};
struct FragBRow {  // 8 x 16 from a row-major source: element (k, n) at ptr[k * ld + n]
  float x[8][16];
};
struct FragC {
  float x[16][16];
};
inline void frag_load(const Ctx&, FragA& f, const float* ptr, int ld) {
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 8; ++k) f.x[r][k] = to_tf32(ptr[r * ld + k]);
}
inline void frag_load(const Ctx&, FragBCol& f, const float* ptr, int ld) {
  for (int k = 0; k < 8; ++k)
    for (int n = 0; n < 16; ++n) f.x[k][n] = to_tf32(ptr[n * ld + k]);
}
inline void frag_load(const Ctx&, FragBRow& f, const float* ptr, int ld) {
  for (int k = 0; k < 8; ++k)
    for (int n = 0; n < 16; ++n) f.x[k][n] = to_tf32(ptr[k * ld + n]);
}
inline void frag_zero(FragC& c) {
  for (auto& row : c.x)
    for (float& v : row) v = 0.f;
}
template <typename FragB>
inline void frag_mma(FragC& c, const FragA& a, const FragB& b) {
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n)
      for (int k = 0; k < 8; ++k) c.x[r][n] += a.x[r][k] * b.x[k][n];
}
inline void frag_store(const Ctx& ctx, float* ptr, const FragC& c, int ld) {
  if (ctx.tid % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) ptr[r * ld + n] = c.x[r][n];
}
#endif

FG_D float* tc_scratch() {
  FG_SHARED_ALIGNED float scratch[kScratch];
  return scratch;
}

// Stores the two fragments of this warp into the [kBM][kLdS] scratch tile, then copies them into
// the per-thread micro-tile (acc = or += ). The scratch must be free (caller synchronised).
template <bool kAdd>
FG_D void frags_to_regs(const Ctx& ctx, float* S, const FragC c[2], float acc[4][4]) {
  const int w = ctx.tid / 32, fr = w / 2, fc = 2 * (w % 2);
  frag_store(ctx, S + 16 * fr * kLdS + 16 * fc, c[0], kLdS);
  frag_store(ctx, S + 16 * fr * kLdS + 16 * (fc + 1), c[1], kLdS);
  FG_SYNC(ctx);
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const float v = S[(tr + kTR * i) * kLdS + tc + kTR * j];
      acc[i][j] = kAdd ? acc[i][j] + v : v;
    }
  FG_SYNC(ctx);
}

// tile_dot on tensor cores (same contract as tile_dot_fma).
template <typename T>
FG_D void tile_dot_tc(const Ctx& ctx, const Mat<T>& A, const Mat<T>& B, int b, int a0, int b0,
                      int K, float acc[4][4]) {
  float* S = tc_scratch();
  float* As = S;              // [kBM][kLdK]
  float* Bs = S + kBM * kLdK;  // [kBN][kLdK]
  const int w = ctx.tid / 32, fr = w / 2, fc = 2 * (w % 2);
  FragC c[2];
  frag_zero(c[0]);
  frag_zero(c[1]);
  for (int k0 = 0; k0 < K; k0 += kBK) {
    for (int idx = ctx.tid; idx < kBM * kBK; idx += kThreads) {
      const int r = idx / kBK, k = idx % kBK;
      const bool in = k0 + k < K;
      As[r * kLdK + k] = in ? ld(A, b, a0 + r, k0 + k) : 0.f;
      Bs[r * kLdK + k] = in ? ld(B, b, b0 + r, k0 + k) : 0.f;
    }
    FG_SYNC(ctx);
    for (int kk = 0; kk < kBK; kk += 8) {
      FragA fa;
      frag_load(ctx, fa, As + 16 * fr * kLdK + kk, kLdK);
      for (int t = 0; t < 2; ++t) {
        FragBCol fb;  // B[k][n] = Bs[n][k]: column-major
        frag_load(ctx, fb, Bs + 16 * (fc + t) * kLdK + kk, kLdK);
        frag_mma(c[t], fa, fb);
      }
    }
    FG_SYNC(ctx);
  }
  frags_to_regs<false>(ctx, S, c, acc);
}

// tile_pv on tensor cores (same contract as tile_pv_fma).
template <typename T>
FG_D void tile_pv_tc(const Ctx& ctx, const float (*P)[kLdP], const Mat<T>& M, int b, int n0, int d0,
                     float acc[4][4]) {
  float* Ms = tc_scratch();  // [kBN][kLdS]
  for (int idx = ctx.tid; idx < kBN * kBD; idx += kThreads) {
    const int r = idx / kBD, c = idx % kBD;
    Ms[r * kLdS + c] = ld(M, b, n0 + r, d0 + c);
  }
  FG_SYNC(ctx);
  const int w = ctx.tid / 32, fr = w / 2, fc = 2 * (w % 2);
  FragC c[2];
  frag_zero(c[0]);
  frag_zero(c[1]);
  for (int kk = 0; kk < kBN; kk += 8) {
    FragA fa;
    frag_load(ctx, fa, &P[16 * fr][kk], kLdP);
    for (int t = 0; t < 2; ++t) {
      FragBRow fb;
      frag_load(ctx, fb, Ms + kk * kLdS + 16 * (fc + t), kLdS);
      frag_mma(c[t], fa, fb);
    }
  }
  FG_SYNC(ctx);  // every warp is done with Ms before the results overwrite it
  frags_to_regs<true>(ctx, Ms, c, acc);
}
#endif  // FG_TF32_MMA

// The tile products used by the kernels: tensor cores when TC (and the GPU has them), else FMA.
template <bool TC, typename T>
FG_D void tile_dot(const Ctx& ctx, const Mat<T>& A, const Mat<T>& B, int b, int a0, int b0, int K,
                   float acc[4][4]) {
#if FG_TF32_MMA
  if constexpr (TC)
    tile_dot_tc(ctx, A, B, b, a0, b0, K, acc);
  else  // discarded branches of `if constexpr` are not instantiated: no unused shared memory
#endif
    tile_dot_fma(ctx, A, B, b, a0, b0, K, acc);
}

template <bool TC, typename T>
FG_D void tile_pv(const Ctx& ctx, const float (*P)[kLdP], const Mat<T>& M, int b, int n0, int d0,
                  float acc[4][4]) {
#if FG_TF32_MMA
  if constexpr (TC)
    tile_pv_tc(ctx, P, M, b, n0, d0, acc);
  else  // discarded branches of `if constexpr` are not instantiated: no unused shared memory
#endif
    tile_pv_fma(ctx, P, M, b, n0, d0, acc);
}

// Writes the register tile t to P, then acc += P M[n0 : n0 + kBN, d0 : d0 + kBD] (tile_pv).
template <bool TC, typename T>
FG_D void stage_pv(const Ctx& ctx, float (*P)[kLdP], const float t[4][4], const Mat<T>& M,
                   int b, int n0, int d0, float acc[4][4]) {
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  FG_UNROLL
  for (int i = 0; i < 4; ++i)
    FG_UNROLL
    for (int j = 0; j < 4; ++j) P[tr + kTR * i][tc + kTR * j] = t[i][j];
  FG_SYNC(ctx);
  tile_pv<TC>(ctx, P, M, b, n0, d0, acc);
}

// acc[q] += P M[n0 : n0 + kBN, d0 + q kBD : ...] for the pieces q that start before column W
// (the condition is uniform over the block, as tile_pv's barriers require).
template <bool TC, int NP, typename T>
FG_D void tile_pv_pieces(const Ctx& ctx, const float (*P)[kLdP], const Mat<T>& M, int b, int n0,
                         int d0, int W, float acc[NP][4][4]) {
  FG_UNROLL
  for (int q = 0; q < NP; ++q)
    if (d0 + q * kBD < W) tile_pv<TC>(ctx, P, M, b, n0, d0 + q * kBD, acc[q]);
}

// out[b, r0 + r_i, d0 + c_j] = acc[i][j] * mul for a contiguous (B, C, W) output, masked.
template <typename T>
FG_D void store_tile(const Ctx& ctx, T* out, int b, int r0, int d0, int C, int W,
                     const float acc[4][4], float mul) {
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  for (int i = 0; i < 4; ++i) {
    const int r = r0 + tr + kTR * i;
    if (r >= C) continue;
    for (int j = 0; j < 4; ++j) {
      const int c = d0 + tc + kTR * j;
      if (c < W) out[(int64_t(b) * C + r) * W + c] = static_cast<T>(acc[i][j] * mul);
    }
  }
}

// Loads v[b * C + r0 + t] (0 past C) into s[t] for t < kBM; the caller synchronises.
FG_D void load_rows(const Ctx& ctx, float* s, const float* v, int b, int r0, int C) {
  if (ctx.tid < kBM) {
    const int r = r0 + ctx.tid;
    s[ctx.tid] = r < C ? v[int64_t(b) * C + r] : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------
// Channel attention. q, k: (B, C, L); v, g (= dOut): (B, C, Lv); lse, delta: (B, C) fp32.

template <typename T>
struct CaParams {
  Mat<T> q, k, v, g;
  T* out;   // fwd: out (B, C, Lv); bwd dq: dq (B, C, L); bwd dkdv: dk (B, C, L)
  T* out2;  // bwd dkdv: dv (B, C, Lv)
  float* lse_out;
  const float* lse;
  const float* delta;  // δ = rowsum(dOut ∘ out)
  int C, L, Lv;
  float scale;
};

// grid (⌈C/kBM⌉, ⌈Lv/(kNPFwd kBD)⌉, B). Online softmax over column blocks; out = Σ p v / l, lse = m + log l.
template <typename T, bool TC>
FG_D void ca_fwd_body(const Ctx& ctx, const CaParams<T>& p) {
  FG_SHARED_ALIGNED float P[kBM][kLdP];
  FG_SHARED float m_s[kBM], l_s[kBM], alpha_s[kBM];
  constexpr int NP = kNPFwd;
  const int b = ctx.bz, m0 = ctx.bx * kBM, d0 = ctx.by * kBD * NP;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  if (ctx.tid < kBM) {
    m_s[ctx.tid] = -INFINITY;
    l_s[ctx.tid] = 0.f;
  }
  float o[NP][4][4] = {}, s[4][4];
  for (int n0 = 0; n0 < p.C; n0 += kBN) {
    tile_dot<TC>(ctx, p.q, p.k, b, m0, n0, p.L, s);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        P[tr + kTR * i][tc + kTR * j] = n0 + tc + kTR * j < p.C ? s[i][j] * p.scale : -INFINITY;
    FG_SYNC(ctx);
    if (ctx.tid < kBM) {
      // Column n0 < C is always valid, so the block max and m_new are finite.
      float* row = P[ctx.tid];
      float mx = -INFINITY;
      for (int c = 0; c < kBN; ++c) mx = fmaxf(mx, row[c]);
      const float m_new = fmaxf(m_s[ctx.tid], mx);
      float sum = 0.f;
      for (int c = 0; c < kBN; ++c) {
        row[c] = expf(row[c] - m_new);  // exp(−inf) = 0 for padding columns
        sum += row[c];
      }
      const float alpha = expf(m_s[ctx.tid] - m_new);  // 0 on the first block (m_s = −inf)
      l_s[ctx.tid] = l_s[ctx.tid] * alpha + sum;
      m_s[ctx.tid] = m_new;
      alpha_s[ctx.tid] = alpha;
    }
    FG_SYNC(ctx);
    FG_UNROLL
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) o[q][i][j] *= alpha_s[tr + kTR * i];
    tile_pv_pieces<TC, NP>(ctx, P, p.v, b, n0, d0, p.Lv, o);
  }
  FG_UNROLL
  for (int q = 0; q < NP; ++q) {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) o[q][i][j] /= l_s[tr + kTR * i];
    store_tile(ctx, p.out, b, m0, d0 + q * kBD, p.C, p.Lv, o[q], 1.f);  // masks columns >= Lv
  }
  if (ctx.by == 0 && ctx.tid < kBM && m0 + ctx.tid < p.C)
    p.lse_out[int64_t(b) * p.C + m0 + ctx.tid] = m_s[ctx.tid] + logf(l_s[ctx.tid]);
}

// grid (⌈C/kBM⌉, ⌈L/(kNPDq kBD)⌉, B). dq = scale · ds k, ds = p ∘ (g vᵀ − δ), p = exp(scale q kᵀ − lse).
template <typename T, bool TC>
FG_D void ca_bwd_dq_body(const Ctx& ctx, const CaParams<T>& p) {
  FG_SHARED_ALIGNED float P[kBM][kLdP];
  FG_SHARED float lse_s[kBM], delta_s[kBM];
  constexpr int NP = kNPDq;
  const int b = ctx.bz, m0 = ctx.bx * kBM, d0 = ctx.by * kBD * NP;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  load_rows(ctx, lse_s, p.lse, b, m0, p.C);
  load_rows(ctx, delta_s, p.delta, b, m0, p.C);
  FG_SYNC(ctx);
  float acc[NP][4][4] = {}, s[4][4], dp[4][4];
  for (int n0 = 0; n0 < p.C; n0 += kBN) {
    tile_dot<TC>(ctx, p.q, p.k, b, m0, n0, p.L, s);
    tile_dot<TC>(ctx, p.g, p.v, b, m0, n0, p.Lv, dp);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int r = tr + kTR * i, c = tc + kTR * j;
        // Masked before the exp: exp(0 − lse) overflows when lse ≪ 0.
        const bool valid = m0 + r < p.C && n0 + c < p.C;
        const float pr = valid ? expf(s[i][j] * p.scale - lse_s[r]) : 0.f;
        P[r][c] = pr * (dp[i][j] - delta_s[r]);
      }
    FG_SYNC(ctx);
    tile_pv_pieces<TC, NP>(ctx, P, p.k, b, n0, d0, p.L, acc);
  }
  FG_UNROLL
  for (int q = 0; q < NP; ++q)
    store_tile(ctx, p.out, b, m0, d0 + q * kBD, p.C, p.L, acc[q], p.scale);
}

// grid (⌈C/kBN⌉, ⌈max(L, Lv)/(kNPDkdv kBD)⌉, B). Rows n of dk and dv, in the transposed [n, m] layout:
// pᵀ = exp(scale k_n q_mᵀ − lse_m), dv_n = Σ_m pᵀ g_m, dk_n = scale Σ_m pᵀ ∘ (v_n g_mᵀ − δ_m) q_m.
template <typename T, bool TC>
FG_D void ca_bwd_dkdv_body(const Ctx& ctx, const CaParams<T>& p) {
  FG_SHARED_ALIGNED float P[kBN][kLdP];
  FG_SHARED float lse_s[kBM], delta_s[kBM];
  constexpr int NP = kNPDkdv;
  const int b = ctx.bz, n0 = ctx.bx * kBN, d0 = ctx.by * kBD * NP;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  const bool want_dk = d0 < p.L, want_dv = d0 < p.Lv;  // uniform over the block
  float acc_k[NP][4][4] = {}, acc_v[NP][4][4] = {}, st[4][4], pt[4][4], dpt[4][4];
  for (int m0 = 0; m0 < p.C; m0 += kBM) {
    load_rows(ctx, lse_s, p.lse, b, m0, p.C);
    load_rows(ctx, delta_s, p.delta, b, m0, p.C);
    FG_SYNC(ctx);
    tile_dot<TC>(ctx, p.k, p.q, b, n0, m0, p.L, st);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int r = tr + kTR * i, c = tc + kTR * j;
        const bool valid = n0 + r < p.C && m0 + c < p.C;
        pt[i][j] = valid ? expf(st[i][j] * p.scale - lse_s[c]) : 0.f;
      }
    if (want_dv) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) P[tr + kTR * i][tc + kTR * j] = pt[i][j];
      FG_SYNC(ctx);
      tile_pv_pieces<TC, NP>(ctx, P, p.g, b, m0, d0, p.Lv, acc_v);
    }
    if (want_dk) {
      tile_dot<TC>(ctx, p.v, p.g, b, n0, m0, p.Lv, dpt);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int c = tc + kTR * j;
          P[tr + kTR * i][c] = pt[i][j] * (dpt[i][j] - delta_s[c]);
        }
      FG_SYNC(ctx);
      tile_pv_pieces<TC, NP>(ctx, P, p.q, b, m0, d0, p.L, acc_k);
    }
    FG_SYNC(ctx);  // lse_s / delta_s are reloaded next iteration
  }
  FG_UNROLL
  for (int q = 0; q < NP; ++q) {
    store_tile(ctx, p.out, b, n0, d0 + q * kBD, p.C, p.L, acc_k[q], p.scale);
    store_tile(ctx, p.out2, b, n0, d0 + q * kBD, p.C, p.Lv, acc_v[q], 1.f);
  }
}

// ------------------------------------------------------------------------------------------------
// Contrastive channel attention. a = X_A, xb = X_B, g = dOut: (B, C, L); eta (B,) fp32.

template <typename T>
struct CoParams {
  Mat<T> a, xb, g;
  const float* eta;
  const float *lse_a, *lse_b, *delta, *eps;
  float *lse_out_a, *lse_out_b, *delta_out, *eps_out;
  T* out;   // fwd: out; bwd: dA
  T* out2;  // bwd: dB
  int C, L;
  float scale;
};

// grid (⌈C/kBM⌉, 2, B): y = 0 gives lse of X_A, y = 1 of X_B. Row log-sum-exp of scale · X Xᵀ.
template <typename T, bool TC>
FG_D void co_lse_body(const Ctx& ctx, const CoParams<T>& p) {
  FG_SHARED_ALIGNED float P[kBM][kLdP];
  FG_SHARED float m_s[kBM], l_s[kBM];
  const int b = ctx.bz, m0 = ctx.bx * kBM;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  const Mat<T>& x = ctx.by == 0 ? p.a : p.xb;
  float* lse = ctx.by == 0 ? p.lse_out_a : p.lse_out_b;
  if (ctx.tid < kBM) {
    m_s[ctx.tid] = -INFINITY;
    l_s[ctx.tid] = 0.f;
  }
  float s[4][4];
  for (int n0 = 0; n0 < p.C; n0 += kBN) {
    tile_dot<TC>(ctx, x, x, b, m0, n0, p.L, s);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        P[tr + kTR * i][tc + kTR * j] = n0 + tc + kTR * j < p.C ? s[i][j] * p.scale : -INFINITY;
    FG_SYNC(ctx);
    if (ctx.tid < kBM) {
      const float* row = P[ctx.tid];
      float mx = -INFINITY;
      for (int c = 0; c < kBN; ++c) mx = fmaxf(mx, row[c]);
      const float m_new = fmaxf(m_s[ctx.tid], mx);
      float sum = 0.f;
      for (int c = 0; c < kBN; ++c) sum += expf(row[c] - m_new);
      l_s[ctx.tid] = l_s[ctx.tid] * expf(m_s[ctx.tid] - m_new) + sum;
      m_s[ctx.tid] = m_new;
    }
    FG_SYNC(ctx);
  }
  if (ctx.tid < kBM && m0 + ctx.tid < p.C)
    lse[int64_t(b) * p.C + m0 + ctx.tid] = m_s[ctx.tid] + logf(l_s[ctx.tid]);
}

// grid (⌈C/kBM⌉, ⌈L/(kNPFwd kBD)⌉, B). out = |P_A − η P_B| X_A with P recomputed from lse (second pass:
// the |·| between softmax and product rules out the online rescaling).
template <typename T, bool TC>
FG_D void co_fwd_body(const Ctx& ctx, const CoParams<T>& p) {
  FG_SHARED_ALIGNED float P[kBM][kLdP];
  FG_SHARED float lse_a[kBM], lse_b[kBM];
  constexpr int NP = kNPFwd;
  const int b = ctx.bz, m0 = ctx.bx * kBM, d0 = ctx.by * kBD * NP;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  const float eta = p.eta[b];
  load_rows(ctx, lse_a, p.lse_a, b, m0, p.C);
  load_rows(ctx, lse_b, p.lse_b, b, m0, p.C);
  FG_SYNC(ctx);
  float acc[NP][4][4] = {}, sa[4][4], sb[4][4];
  for (int n0 = 0; n0 < p.C; n0 += kBN) {
    tile_dot<TC>(ctx, p.a, p.a, b, m0, n0, p.L, sa);
    tile_dot<TC>(ctx, p.xb, p.xb, b, m0, n0, p.L, sb);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int r = tr + kTR * i, c = tc + kTR * j;
        const bool valid = m0 + r < p.C && n0 + c < p.C;
        P[r][c] = valid ? fabsf(expf(sa[i][j] * p.scale - lse_a[r]) -
                                eta * expf(sb[i][j] * p.scale - lse_b[r]))
                        : 0.f;
      }
    FG_SYNC(ctx);
    tile_pv_pieces<TC, NP>(ctx, P, p.a, b, n0, d0, p.L, acc);
  }
  FG_UNROLL
  for (int q = 0; q < NP; ++q)
    store_tile(ctx, p.out, b, m0, d0 + q * kBD, p.C, p.L, acc[q], 1.f);
}

// grid (⌈C/kBM⌉, 1, B). δ_i = Σ_k P_A,ik G_ik D_ik, ε_i = Σ_k P_B,ik G_ik D_ik with
// D_ik = g_i · a_k and G = sign(P_A − η P_B).
template <typename T, bool TC>
FG_D void co_rowsum_body(const Ctx& ctx, const CoParams<T>& p) {
  FG_SHARED float lse_a[kBM], lse_b[kBM];
  FG_SHARED float red_d[kBM][kTR + 1], red_e[kBM][kTR + 1];
  const int b = ctx.bz, m0 = ctx.bx * kBM;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  const float eta = p.eta[b];
  load_rows(ctx, lse_a, p.lse_a, b, m0, p.C);
  load_rows(ctx, lse_b, p.lse_b, b, m0, p.C);
  FG_SYNC(ctx);
  float dpart[4] = {}, epart[4] = {}, sa[4][4], sb[4][4], d[4][4];
  for (int n0 = 0; n0 < p.C; n0 += kBN) {
    tile_dot<TC>(ctx, p.a, p.a, b, m0, n0, p.L, sa);
    tile_dot<TC>(ctx, p.xb, p.xb, b, m0, n0, p.L, sb);
    tile_dot<TC>(ctx, p.g, p.a, b, m0, n0, p.L, d);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int r = tr + kTR * i, c = tc + kTR * j;
        if (m0 + r >= p.C || n0 + c >= p.C) continue;
        const float pa = expf(sa[i][j] * p.scale - lse_a[r]);
        const float pb = expf(sb[i][j] * p.scale - lse_b[r]);
        const float gd = sign(pa - eta * pb) * d[i][j];
        dpart[i] += pa * gd;
        epart[i] += pb * gd;
      }
  }
  for (int i = 0; i < 4; ++i) {
    red_d[tr + kTR * i][tc] = dpart[i];
    red_e[tr + kTR * i][tc] = epart[i];
  }
  FG_SYNC(ctx);
  if (ctx.tid < kBM && m0 + ctx.tid < p.C) {
    float sd = 0.f, se = 0.f;
    for (int t = 0; t < kTR; ++t) {
      sd += red_d[ctx.tid][t];
      se += red_e[ctx.tid][t];
    }
    p.delta_out[int64_t(b) * p.C + m0 + ctx.tid] = sd;
    p.eps_out[int64_t(b) * p.C + m0 + ctx.tid] = se;
  }
}

// grid (⌈C/kBN⌉, ⌈L/kBD⌉, B). Rows n of dA and dB; [n, m] tiles, the logits being symmetric:
//   dA_n = Σ_m |W_mn| g_m + scale Σ_m (dS_A,nm + dS_A,mn) a_m,   dB_n = scale Σ_m (dS_B..) b_m
//   dS_A,ij = P_A,ij (G_ij D_ij − δ_i),   dS_B,ij = −η P_B,ij (G_ij D_ij − ε_i).
template <typename T, bool TC>
FG_D void co_bwd_body(const Ctx& ctx, const CoParams<T>& p) {
  FG_SHARED_ALIGNED float P[kBN][kLdP];
  FG_SHARED float la_n[kBN], lb_n[kBN], de_n[kBN], ep_n[kBN];
  FG_SHARED float la_m[kBM], lb_m[kBM], de_m[kBM], ep_m[kBM];
  const int b = ctx.bz, n0 = ctx.bx * kBN, d0 = ctx.by * kBD;
  const int tr = ctx.tid / kTR, tc = ctx.tid % kTR;
  const float eta = p.eta[b];
  load_rows(ctx, la_n, p.lse_a, b, n0, p.C);
  load_rows(ctx, lb_n, p.lse_b, b, n0, p.C);
  load_rows(ctx, de_n, p.delta, b, n0, p.C);
  load_rows(ctx, ep_n, p.eps, b, n0, p.C);
  float acc_a[4][4] = {}, acc_b[4][4] = {};
  float sa[4][4], sb[4][4], dmn[4][4], dnm[4][4];
  for (int m0 = 0; m0 < p.C; m0 += kBM) {
    load_rows(ctx, la_m, p.lse_a, b, m0, p.C);
    load_rows(ctx, lb_m, p.lse_b, b, m0, p.C);
    load_rows(ctx, de_m, p.delta, b, m0, p.C);
    load_rows(ctx, ep_m, p.eps, b, m0, p.C);
    FG_SYNC(ctx);
    tile_dot<TC>(ctx, p.a, p.a, b, n0, m0, p.L, sa);    // [n, m] = a_n · a_m
    tile_dot<TC>(ctx, p.xb, p.xb, b, n0, m0, p.L, sb);  // [n, m] = b_n · b_m
    tile_dot<TC>(ctx, p.a, p.g, b, n0, m0, p.L, dmn);   // [n, m] = g_m · a_n = D_mn
    tile_dot<TC>(ctx, p.g, p.a, b, n0, m0, p.L, dnm);   // [n, m] = g_n · a_m = D_nm
    // Overwrite in place: sa <- dS_A, sb <- dS_B, dmn <- |W_mn| (fully unrolled, so the
    // register arrays stay in registers).
    FG_UNROLL
    for (int i = 0; i < 4; ++i)
      FG_UNROLL
      for (int j = 0; j < 4; ++j) {
        const int r = tr + kTR * i, c = tc + kTR * j;
        const bool valid = n0 + r < p.C && m0 + c < p.C;
        const float pa_mn = expf(sa[i][j] * p.scale - la_m[c]);
        const float pb_mn = expf(sb[i][j] * p.scale - lb_m[c]);
        const float pa_nm = expf(sa[i][j] * p.scale - la_n[r]);
        const float pb_nm = expf(sb[i][j] * p.scale - lb_n[r]);
        const float w_mn = pa_mn - eta * pb_mn;
        const float gd_mn = sign(w_mn) * dmn[i][j];
        const float gd_nm = sign(pa_nm - eta * pb_nm) * dnm[i][j];
        // Selects, not multiplies: exp(0 − lse) of padding can be inf.
        sa[i][j] = valid ? p.scale * (pa_mn * (gd_mn - de_m[c]) + pa_nm * (gd_nm - de_n[r])) : 0.f;
        sb[i][j] =
            valid ? -eta * p.scale * (pb_mn * (gd_mn - ep_m[c]) + pb_nm * (gd_nm - ep_n[r])) : 0.f;
        dmn[i][j] = valid ? fabsf(w_mn) : 0.f;
      }
    stage_pv<TC>(ctx, P, dmn, p.g, b, m0, d0, acc_a);
    stage_pv<TC>(ctx, P, sa, p.a, b, m0, d0, acc_a);
    stage_pv<TC>(ctx, P, sb, p.xb, b, m0, d0, acc_b);
  }
  store_tile(ctx, p.out, b, n0, d0, p.C, p.L, acc_a, 1.f);
  store_tile(ctx, p.out2, b, n0, d0, p.C, p.L, acc_b, 1.f);
}

}  // namespace fgattn
