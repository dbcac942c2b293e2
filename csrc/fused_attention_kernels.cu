// FlashAttention-2 style masked attention with mma.sync m16n8k16 (sm_80+): forward (+LSE),
// forward+JVP in one pass, backward. Each warp owns 16 rows; tiles come from a per-mask summary
// (0 skip / 1 full / 2 partial) so skipped tiles are never loaded.
#include "fused_attention_kernels.cuh"
#include "quad_reduce.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

namespace mrcm {
namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

template <typename T> struct Pack;
template <> struct Pack<__half> {
  static __device__ __forceinline__ uint32_t two(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) { return __half22float2(*reinterpret_cast<const __half2*>(&w)); }
  static __device__ __forceinline__ uint32_t raw(__half a, __half b) {
    __half2 h = __halves2half2(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t two(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w)); }
  static __device__ __forceinline__ uint32_t raw(__nv_bfloat16 a, __nv_bfloat16 b) {
    __nv_bfloat162 h = __halves2bfloat162(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <typename T> __device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment (16x16) of row-major M at (r0, c0), leading dim ld.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t* a, const T* M, int ld, int r0, int c0, int g, int t) {
  a[0] = ld32(M + (r0 + g) * ld + c0 + 2 * t);
  a[1] = ld32(M + (r0 + g + 8) * ld + c0 + 2 * t);
  a[2] = ld32(M + (r0 + g) * ld + c0 + 8 + 2 * t);
  a[3] = ld32(M + (r0 + g + 8) * ld + c0 + 8 + 2 * t);
}
// A fragment of A = M^T (A[r][c] = M[c][r]).
template <typename T>
__device__ __forceinline__ void load_a_t(uint32_t* a, const T* M, int ld, int r0, int c0, int g, int t) {
  const T* p = M + (c0 + 2 * t) * ld + r0 + g;
  a[0] = Pack<T>::raw(p[0], p[ld]);
  a[1] = Pack<T>::raw(p[8], p[ld + 8]);
  a[2] = Pack<T>::raw(p[8 * ld], p[9 * ld]);
  a[3] = Pack<T>::raw(p[8 * ld + 8], p[9 * ld + 8]);
}
// B fragment (16x8) with B[k][n] = M[n][k] (M row-major, rows are n): contiguous pairs.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t* b, const T* M, int ld, int n0, int k0, int g, int t) {
  b[0] = ld32(M + (n0 + g) * ld + k0 + 2 * t);
  b[1] = ld32(M + (n0 + g) * ld + k0 + 8 + 2 * t);
}
// B fragment with B[k][n] = M[k][n] (rows are k).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t* b, const T* M, int ld, int k0, int n0, int g, int t) {
  const T* p = M + (k0 + 2 * t) * ld + n0 + g;
  b[0] = Pack<T>::raw(p[0], p[ld]);
  b[1] = Pack<T>::raw(p[8 * ld], p[9 * ld]);
}

// Two B fragments (n-tiles n0 and n0+8) with B[k][n] = M[k][n], via ldmatrix.trans.
template <typename T>
__device__ __forceinline__ void load_b_kn_x4(uint32_t* b, const T* M, int ld, int k0, int n0, int lane) {
  const T* ptr = M + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
}

// Copy rows [r0, r0+R) of a [S, H, D] head slice into smem (ld = D + 8) with cp.async, so every
// 16-byte load of the tile is in flight at once; rows >= S are zero-filled. Call cp_async_wait().
template <typename T, int D, int R, int NT>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int r0, int S, int tid) {
  constexpr int LD = D + 8, CH = D / 8;
#pragma unroll
  for (int i = tid; i < R * CH; i += NT) {
    const int r = i / CH, c = (i % CH) * 8;
    const bool in = r0 + r < S;
    const T* g = in ? src + (int64_t)(r0 + r) * row_stride + c : src;
    const uint32_t saddr = static_cast<uint32_t>(__cvta_generic_to_shared(dst + r * LD + c));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g), "r"(in ? 16 : 0));
  }
}
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// ---------------------------------------------------------------- forward (+ optional JVP)
// JVP=false: O and LSE. JVP=true: O and tangent O (accumulator Bacc = sum p*vdot + (p*sdot) v).
template <typename T, int D, int BQ, int BK, bool JVP>
__global__ void __launch_bounds__(128) fwd_kernel(const AttnParams p) {
  constexpr int NT = 128, LD = D + 8, NB = BK / 8, ND = D / 8;
  extern __shared__ __align__(16) char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BQ * LD;
  T* Vs = Ks + BK * LD;
  T* Qd = Vs + BK * LD;               // JVP only
  T* Kd = Qd + (JVP ? BQ * LD : 0);
  T* Vd = Kd + (JVP ? BK * LD : 0);
  int* qgs = reinterpret_cast<int*>(Vd + (JVP ? BK * LD : 0));
  int* kgs = qgs + BQ;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * BQ;
  const int64_t rs = (int64_t)p.H * D;
  const int64_t qoff = ((int64_t)b * p.Sq * p.H + h) * D, koff = ((int64_t)b * p.Sk * p.H + h) * D;
  const bool has_tq = JVP && p.tq, has_tk = JVP && p.tk, has_tv = JVP && p.tv;
  const bool has_s = has_tq || has_tk;

  load_tile<T, D, BQ, NT>(Qs, (const T*)p.q + qoff, rs, q0, p.Sq, tid);
  if (has_tq) load_tile<T, D, BQ, NT>(Qd, (const T*)p.tq + qoff, rs, q0, p.Sq, tid);
  for (int i = tid; i < BQ; i += NT) qgs[i] = q0 + i < p.Sq ? p.q_groups[q0 + i] : 0;

  const float sl2 = p.scale * LOG2E;
  float acc[ND][4], bacc[JVP ? ND : 1][4];
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.f, 0.f}, rr[2] = {0.f, 0.f};
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) { acc[n][e] = 0.f; if (JVP) bacc[n][e] = 0.f; }

  const int8_t* trow = p.tiles + (int64_t)qt * p.Tk;
  for (int kt = 0; kt < p.Tk; ++kt) {
    const int st = trow[kt];
    if (st == 0) continue;
    const int k0 = kt * BK;
    __syncthreads();
    load_tile<T, D, BK, NT>(Ks, (const T*)p.k + koff, rs, k0, p.Sk, tid);
    load_tile<T, D, BK, NT>(Vs, (const T*)p.v + koff, rs, k0, p.Sk, tid);
    if (has_tk) load_tile<T, D, BK, NT>(Kd, (const T*)p.tk + koff, rs, k0, p.Sk, tid);
    if (has_tv) load_tile<T, D, BK, NT>(Vd, (const T*)p.tv + koff, rs, k0, p.Sk, tid);
    for (int i = tid; i < BK; i += NT) kgs[i] = k0 + i < p.Sk ? p.k_groups[k0 + i] : 0;
    cp_async_wait();
    __syncthreads();

    float s[NB][4], sd[JVP ? NB : 1][4];
#pragma unroll
    for (int n = 0; n < NB; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) { s[n][e] = 0.f; if (JVP) sd[n][e] = 0.f; }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4], ad[4], bf[2];
      load_a(a, Qs, LD, warp * 16, kk * 16, g, t);
      if (has_tq) load_a(ad, Qd, LD, warp * 16, kk * 16, g, t);
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        load_b_nk(bf, Ks, LD, n * 8, kk * 16, g, t);
        Pack<T>::mma(s[n], a, bf);
        if (JVP) {
          if (has_tq) Pack<T>::mma(sd[n], ad, bf);
          if (has_tk) {
            uint32_t bd[2];
            load_b_nk(bd, Kd, LD, n * 8, kk * 16, g, t);
            Pack<T>::mma(sd[n], a, bd);
          }
        }
      }
    }
    const bool need_mask = st == 2 || k0 + BK > p.Sk;
#pragma unroll
    for (int n = 0; n < NB; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] *= sl2;
        if (JVP) sd[n][e] *= p.scale;
        if (need_mask) {
          const int row = warp * 16 + g + (e >= 2 ? 8 : 0), col = n * 8 + 2 * t + (e & 1);
          const bool ok = k0 + col < p.Sk && __ldg(p.allow + qgs[row] * p.G + kgs[col]);
          if (!ok) { s[n][e] = -CUDART_INF_F; if (JVP) sd[n][e] = 0.f; }
        }
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int n = 0; n < NB; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = quad_max(mx);
      const float mnew = fmaxf(m[r], mx);
      const float muse = mnew == -CUDART_INF_F ? 0.f : mnew;
      const float alpha = exp2f(m[r] - muse);
      m[r] = mnew;
      l[r] *= alpha;
      if (JVP) rr[r] *= alpha;
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        acc[n][2 * r] *= alpha; acc[n][2 * r + 1] *= alpha;
        if (JVP) { bacc[n][2 * r] *= alpha; bacc[n][2 * r + 1] *= alpha; }
      }
#pragma unroll
      for (int n = 0; n < NB; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[n][e] = exp2f(s[n][e] - muse);
          l[r] += s[n][e];
          if (JVP) { sd[n][e] *= s[n][e]; rr[r] += sd[n][e]; }
        }
    }
#pragma unroll
    for (int j = 0; j < BK / 16; ++j) {
      uint32_t a[4], as[4];
      a[0] = Pack<T>::two(s[2 * j][0], s[2 * j][1]);
      a[1] = Pack<T>::two(s[2 * j][2], s[2 * j][3]);
      a[2] = Pack<T>::two(s[2 * j + 1][0], s[2 * j + 1][1]);
      a[3] = Pack<T>::two(s[2 * j + 1][2], s[2 * j + 1][3]);
      if (JVP && has_s) {
        as[0] = Pack<T>::two(sd[2 * j][0], sd[2 * j][1]);
        as[1] = Pack<T>::two(sd[2 * j][2], sd[2 * j][3]);
        as[2] = Pack<T>::two(sd[2 * j + 1][0], sd[2 * j + 1][1]);
        as[3] = Pack<T>::two(sd[2 * j + 1][2], sd[2 * j + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < ND; n += 2) {
        uint32_t b4[4];
        load_b_kn_x4(b4, Vs, LD, j * 16, n * 8, lane);
        Pack<T>::mma(acc[n], a, b4);
        Pack<T>::mma(acc[n + 1], a, b4 + 2);
        if (JVP) {
          if (has_s) { Pack<T>::mma(bacc[n], as, b4); Pack<T>::mma(bacc[n + 1], as, b4 + 2); }
          if (has_tv) {
            uint32_t bd[4];
            load_b_kn_x4(bd, Vd, LD, j * 16, n * 8, lane);
            Pack<T>::mma(bacc[n], a, bd);
            Pack<T>::mma(bacc[n + 1], a, bd + 2);
          }
        }
      }
    }
  }

  cp_async_wait();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lt = quad_sum(l[r]);
    const float rt = JVP ? quad_sum(rr[r]) : 0.f;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row < p.Sq) {
      T* orow = (T*)p.o + qoff + (int64_t)row * rs;
      T* trow_out = JVP ? (T*)p.to + qoff + (int64_t)row * rs : nullptr;
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        const float o0 = acc[n][2 * r] * inv, o1 = acc[n][2 * r + 1] * inv;
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t) = Pack<T>::two(o0, o1);
        if (JVP) {
          const float d0 = (bacc[n][2 * r] - rt * o0) * inv, d1 = (bacc[n][2 * r + 1] - rt * o1) * inv;
          *reinterpret_cast<uint32_t*>(trow_out + n * 8 + 2 * t) = Pack<T>::two(d0, d1);
        }
      }
      if (!JVP && t == 0 && p.lse)
        p.lse[((int64_t)b * p.H + h) * p.Sq + row] = lt > 0.f ? m[r] * LN2 + logf(lt) : -CUDART_INF_F;
    }
  }
}

// ---------------------------------------------------------------- backward
// One block per key tile; warps own 16 keys; loops over query tiles. dQ via fp32 atomics.
template <typename T, int D, int BQ, int BK>
__global__ void __launch_bounds__(128) bwd_kernel(const AttnParams p) {
  constexpr int NT = 128, LD = D + 8, NQ = BQ / 8, ND = D / 8, LDS = BQ + 8;
  extern __shared__ __align__(16) char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BK * LD;
  T* Qs = Vs + BK * LD;
  T* Os = Qs + BQ * LD;  // dO tile
  T* Ss = Os + BQ * LD;  // dS^T [BK][BQ]
  float* lse2 = reinterpret_cast<float*>(Ss + BK * LDS);
  float* dlt = lse2 + BQ;
  int* qgs = reinterpret_cast<int*>(dlt + BQ);
  int* kgs = qgs + BQ;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, k0 = kt * BK;
  const int64_t rs = (int64_t)p.H * D;
  const int64_t qoff = ((int64_t)b * p.Sq * p.H + h) * D, koff = ((int64_t)b * p.Sk * p.H + h) * D;
  const int64_t loff = ((int64_t)b * p.H + h) * p.Sq;
  const float sl2 = p.scale * LOG2E;

  load_tile<T, D, BK, NT>(Ks, (const T*)p.k + koff, rs, k0, p.Sk, tid);
  load_tile<T, D, BK, NT>(Vs, (const T*)p.v + koff, rs, k0, p.Sk, tid);
  for (int i = tid; i < BK; i += NT) kgs[i] = k0 + i < p.Sk ? p.k_groups[k0 + i] : 0;

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) { dk[n][e] = 0.f; dv[n][e] = 0.f; }

  for (int qt = 0; qt < p.Tq; ++qt) {
    const int st = p.tiles[(int64_t)qt * p.Tk + kt];
    if (st == 0) continue;
    const int q0 = qt * BQ;
    __syncthreads();
    load_tile<T, D, BQ, NT>(Qs, (const T*)p.q + qoff, rs, q0, p.Sq, tid);
    load_tile<T, D, BQ, NT>(Os, (const T*)p.dout + qoff, rs, q0, p.Sq, tid);
    for (int i = tid; i < BQ; i += NT) {
      const bool in = q0 + i < p.Sq;
      const float L = in ? p.lse[loff + q0 + i] : -CUDART_INF_F;
      lse2[i] = L == -CUDART_INF_F ? CUDART_INF_F : L * LOG2E;
      dlt[i] = in ? p.delta[loff + q0 + i] : 0.f;
      qgs[i] = in ? p.q_groups[q0 + i] : 0;
    }
    cp_async_wait();
    __syncthreads();

    // S^T = K Q^T (rows: this warp's 16 keys, cols: BQ queries)
    float s[NQ][4], dp[NQ][4];
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) { s[n][e] = 0.f; dp[n][e] = 0.f; }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4], av[4], bf[2], bo[2];
      load_a(a, Ks, LD, warp * 16, kk * 16, g, t);
      load_a(av, Vs, LD, warp * 16, kk * 16, g, t);
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
        load_b_nk(bf, Qs, LD, n * 8, kk * 16, g, t);
        Pack<T>::mma(s[n], a, bf);
        load_b_nk(bo, Os, LD, n * 8, kk * 16, g, t);
        Pack<T>::mma(dp[n], av, bo);
      }
    }
    const bool need_mask = st == 2 || k0 + BK > p.Sk || q0 + BQ > p.Sq;
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int krow = warp * 16 + g + (e >= 2 ? 8 : 0), qcol = n * 8 + 2 * t + (e & 1);
        float pv = exp2f(s[n][e] * sl2 - lse2[qcol]);
        if (need_mask) {
          const bool ok = k0 + krow < p.Sk && q0 + qcol < p.Sq && __ldg(p.allow + qgs[qcol] * p.G + kgs[krow]);
          if (!ok) pv = 0.f;
        }
        s[n][e] = pv;
        dp[n][e] = pv * (dp[n][e] - dlt[qcol]);  // dS^T (without scale)
      }
    // dV += P^T dO ; dK += dS^T Q ; stash dS^T for dQ
#pragma unroll
    for (int j = 0; j < BQ / 16; ++j) {
      uint32_t a[4], ad[4];
      a[0] = Pack<T>::two(s[2 * j][0], s[2 * j][1]);
      a[1] = Pack<T>::two(s[2 * j][2], s[2 * j][3]);
      a[2] = Pack<T>::two(s[2 * j + 1][0], s[2 * j + 1][1]);
      a[3] = Pack<T>::two(s[2 * j + 1][2], s[2 * j + 1][3]);
      ad[0] = Pack<T>::two(dp[2 * j][0], dp[2 * j][1]);
      ad[1] = Pack<T>::two(dp[2 * j][2], dp[2 * j][3]);
      ad[2] = Pack<T>::two(dp[2 * j + 1][0], dp[2 * j + 1][1]);
      ad[3] = Pack<T>::two(dp[2 * j + 1][2], dp[2 * j + 1][3]);
      const int r0 = warp * 16 + g, c0 = j * 16 + 2 * t;
      *reinterpret_cast<uint32_t*>(Ss + r0 * LDS + c0) = ad[0];
      *reinterpret_cast<uint32_t*>(Ss + (r0 + 8) * LDS + c0) = ad[1];
      *reinterpret_cast<uint32_t*>(Ss + r0 * LDS + c0 + 8) = ad[2];
      *reinterpret_cast<uint32_t*>(Ss + (r0 + 8) * LDS + c0 + 8) = ad[3];
#pragma unroll
      for (int n = 0; n < ND; n += 2) {
        uint32_t b4[4];
        load_b_kn_x4(b4, Os, LD, j * 16, n * 8, lane);
        Pack<T>::mma(dv[n], a, b4);
        Pack<T>::mma(dv[n + 1], a, b4 + 2);
        load_b_kn_x4(b4, Qs, LD, j * 16, n * 8, lane);
        Pack<T>::mma(dk[n], ad, b4);
        Pack<T>::mma(dk[n + 1], ad, b4 + 2);
      }
    }
    __syncthreads();
    // dQ (rows: this warp's 16 queries) = dS K, summed over this block's keys
    {
      uint32_t a[BK / 16][4];
#pragma unroll
      for (int j = 0; j < BK / 16; ++j) load_a_t(a[j], Ss, LDS, warp * 16, j * 16, g, t);
#pragma unroll
      for (int n = 0; n < ND; n += 2) {
        float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int j = 0; j < BK / 16; ++j) {
          uint32_t b4[4];
          load_b_kn_x4(b4, Ks, LD, j * 16, n * 8, lane);
          Pack<T>::mma(c[0], a[j], b4);
          Pack<T>::mma(c[1], a[j], b4 + 2);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = q0 + warp * 16 + g + 8 * r;
          if (row < p.Sq) {
            float* dst = p.dq_accum + qoff + (int64_t)row * rs + n * 8 + 2 * t;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              atomicAdd(dst + 8 * u, c[u][2 * r]);
              atomicAdd(dst + 8 * u + 1, c[u][2 * r + 1]);
            }
          }
        }
      }
    }
  }
  cp_async_wait();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = k0 + warp * 16 + g + 8 * r;
    if (row < p.Sk) {
      T* dkr = (T*)p.dk + koff + (int64_t)row * rs;
      T* dvr = (T*)p.dv + koff + (int64_t)row * rs;
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        *reinterpret_cast<uint32_t*>(dkr + n * 8 + 2 * t) = Pack<T>::two(dk[n][2 * r] * p.scale, dk[n][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvr + n * 8 + 2 * t) = Pack<T>::two(dv[n][2 * r], dv[n][2 * r + 1]);
      }
    }
  }
}

template <typename K>
cudaError_t launch(K kernel, dim3 grid, size_t smem, const AttnParams& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, bool JVP>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int BQ = JVP ? JVP_BQ : FWD_BQ, BK = JVP ? JVP_BK : FWD_BK, LD = D + 8;
  const size_t smem = (size_t)(BQ + 2 * BK) * LD * sizeof(T) * (JVP ? 2 : 1) + (BQ + BK) * sizeof(int);
  dim3 grid(p.Tq, p.H, p.B);
  return launch(fwd_kernel<T, D, BQ, BK, JVP>, grid, smem, p, stream);
}

template <typename T, int D>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int BQ = BWD_BQ, BK = BWD_BK, LD = D + 8;
  const size_t smem = (size_t)(2 * BK + 2 * BQ) * LD * sizeof(T) + (size_t)BK * (BQ + 8) * sizeof(T) +
                      2 * BQ * sizeof(float) + (BQ + BK) * sizeof(int);
  dim3 grid(p.Tk, p.H, p.B);
  return launch(bwd_kernel<T, D, BQ, BK>, grid, smem, p, stream);
}

template <bool JVP>
cudaError_t dispatch_fwd(const AttnParams& p, int dtype, int d, cudaStream_t s) {
  if (dtype == 0 && d == 64) return run_fwd<__half, 64, JVP>(p, s);
  if (dtype == 0 && d == 128) return run_fwd<__half, 128, JVP>(p, s);
  if (dtype == 1 && d == 64) return run_fwd<__nv_bfloat16, 64, JVP>(p, s);
  if (dtype == 1 && d == 128) return run_fwd<__nv_bfloat16, 128, JVP>(p, s);
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------- backward pre- and post-processing
// Both kernel families need Delta = rowsum(dO * O) in fp32 before the backward and turn the fp32 dQ sum into
// scale * dQ in the input dtype after it; one pass each instead of eager fp32 copies, product, sum, transpose,
// scale and cast (measured in benchmarks/RESULTS.md).
// One warp per (b, s, h) row of D elements; delta is [B, H, S].
template <typename T>
__global__ void delta_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta, int S,
                             int H, int D, int64_t rows) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float acc = 0.f;
  for (int d = 2 * lane; d < D; d += 64) {
    const float2 a = Pack<T>::unpack(*reinterpret_cast<const uint32_t*>(o + row * D + d));
    const float2 c = Pack<T>::unpack(*reinterpret_cast<const uint32_t*>(dout + row * D + d));
    acc = fmaf(a.x, c.x, fmaf(a.y, c.y, acc));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
  if (lane == 0) {
    const int64_t b = row / ((int64_t)S * H), s = (row / H) % S, h = row % H;
    delta[(b * H + h) * S + s] = acc;
  }
}

// out = scale * in, in the output dtype; n is a multiple of 2.
template <typename T>
__global__ void scale_cast_kernel(const float* __restrict__ in, T* __restrict__ out, float scale, int64_t n) {
  for (int64_t i = 2 * ((int64_t)blockIdx.x * blockDim.x + threadIdx.x); i < n; i += 2 * (int64_t)gridDim.x * blockDim.x) {
    const float2 x = *reinterpret_cast<const float2*>(in + i);
    *reinterpret_cast<uint32_t*>(out + i) = Pack<T>::two(x.x * scale, x.y * scale);
  }
}

template <typename T>
cudaError_t run_delta(const void* o, const void* dout, float* delta, int B, int S, int H, int D, cudaStream_t s) {
  const int64_t rows = (int64_t)B * S * H;
  if (rows == 0) return cudaSuccess;
  delta_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, s>>>((const T*)o, (const T*)dout, delta, S, H, D, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_scale_cast(const float* in, void* out, float scale, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n / 2 + 255) / 256;
  scale_cast_kernel<T><<<(unsigned)(blocks < 8192 ? blocks : 8192), 256, 0, s>>>(in, (T*)out, scale, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bwd_delta(const void* o, const void* dout, float* delta, int B, int S, int H, int D, int dtype,
                             cudaStream_t s) {
  return dtype == 0 ? run_delta<__half>(o, dout, delta, B, S, H, D, s)
                    : run_delta<__nv_bfloat16>(o, dout, delta, B, S, H, D, s);
}
cudaError_t launch_scale_cast(const float* in, void* out, float scale, int64_t n, int dtype, cudaStream_t s) {
  return dtype == 0 ? run_scale_cast<__half>(in, out, scale, n, s) : run_scale_cast<__nv_bfloat16>(in, out, scale, n, s);
}

cudaError_t launch_fwd(const AttnParams& p, int dtype, int d, cudaStream_t s) { return dispatch_fwd<false>(p, dtype, d, s); }
cudaError_t launch_fwd_jvp(const AttnParams& p, int dtype, int d, cudaStream_t s) { return dispatch_fwd<true>(p, dtype, d, s); }
cudaError_t launch_bwd(const AttnParams& p, int dtype, int d, cudaStream_t s) {
  if (dtype == 0 && d == 64) return run_bwd<__half, 64>(p, s);
  if (dtype == 0 && d == 128) return run_bwd<__half, 128>(p, s);
  if (dtype == 1 && d == 64) return run_bwd<__nv_bfloat16, 64>(p, s);
  if (dtype == 1 && d == 128) return run_bwd<__nv_bfloat16, 128>(p, s);
  return cudaErrorInvalidValue;
}

}  // namespace mrcm
