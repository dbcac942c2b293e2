// Hopper (sm_90a) path of the fused masked attention: forward (+LSE), forward+JVP and backward with
// warpgroup MMA (wgmma); the backward's layout is described above its kernel. Why a second kernel:
// mma.sync cannot feed Hopper's tensor cores at their rate, wgmma can (measurements: benchmarks/RESULTS.md).
//
// Layout of the work: a CTA of two consumer warpgroups owns BQ = 128 query rows (64 each); a third, the
// producer, only issues the TMA loads (warp specialisation, below the Cfg). Key tiles of BK
// rows (192 for the forward, whose two rings then fill shared memory; 64 for forward+JVP, which holds
// four accumulators) arrive by TMA in 128-byte-swizzled shared memory (the layout wgmma reads without bank
// conflicts; rows past the sequence end are zero-filled) through two-slot rings, one for K (and Kdot),
// one for V (and Vdot); mbarriers say when a slot is full and when every warp is done with it. Scores
// (S, and for the JVP the tangent Sdot = Qdot K^T + Q Kdot^T) come from smem x smem wgmma; P and
// P*Sdot stay in registers as the A operand of the register x smem wgmma into O (A = sum p v) and the
// tangent accumulator (B = sum p vdot + sum (p sdot) v): two accumulators (docs/design.md, "Attention JVP"). The two
// warpgroups take turns on the tensor cores (ping-pong), so one's softmax hides under the other's
// products. The tile summary (0 skip / 1 full / 2 partial) decides which key tiles are loaded at all
// and which need the element mask; that mask is a host-made bitmap (AttnParams::pair_bits).
// What each of these choices bought is measured in benchmarks/RESULTS.md ("Kernel design history").
//
// Compiled only when CUTLASS/CuTe headers are found (MRCM_WITH_SM90); device code only for sm_90a.
#include "fused_attention_kernels.cuh"
#include "quad_reduce.cuh"

#if defined(MRCM_WITH_SM90)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstring>
#include <type_traits>

#include <cuda.h>  // CUtensorMap (the encode function is fetched at run time: no libcuda link)

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MRCM_SM90_DEVICE 1
#endif

namespace mrcm {
namespace sm90 {

using namespace cute;
namespace GM = cute::SM90::GMMA;

// Warp-specialised: a third warpgroup (the first) only issues the TMA loads and tells the two consumer
// warpgroups each tile's index through shared memory; with setmaxnreg it gives its registers to them
// (FlashAttention-3's structure; before it, one consumer thread also loaded between its products, and every
// consumer thread walked the tile summary: the forward ran 0.85-0.91x as fast; RESULTS.md, fourteenth session).
template <typename T, int D, int BK, bool JVP>
struct Cfg {
  static constexpr int NWG = 2, BQ = 64 * NWG, NT_MMA = 128 * NWG, NT = NT_MMA + 128, SLOTS = 2;
  static constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;  // 128 x 24 + 256 x 240 <= 64 K registers
  // P V of tile j-1 under the softmax of tile j needs P's and the scores' registers at once: more than the
  // 240 of a forward+JVP consumer, which runs P V to completion before the scores (with the overlap it spilled
  // 292 bytes and ran about 0.7x as fast as the two-warpgroup kernel; without it, 160 bytes and 1.07x on the
  // full mask).
  static constexpr bool OVERLAP = !JVP;
  using QKAtom = decltype(GM::ss_op_selector<T, T, float, Shape<_64, Int<BK>, _16>>());
  using PVAtom = decltype(GM::rs_op_selector<T, T, float, Shape<_64, Int<D>, _16>, GM::Major::K, GM::Major::MN>());
  using MmaQK = decltype(make_tiled_mma(QKAtom{}, Layout<Shape<Int<NWG>, _1, _1>>{}));
  using MmaPV = decltype(make_tiled_mma(PVAtom{}, Layout<Shape<Int<NWG>, _1, _1>>{}));
  using LayoutQ = decltype(tile_to_shape(GM::Layout_K_SW128_Atom<T>{}, Shape<Int<BQ>, Int<D>>{}));
  using LayoutK = decltype(tile_to_shape(GM::Layout_K_SW128_Atom<T>{}, Shape<Int<BK>, Int<D>>{}));
  // V^T as the (N = D, K = BK) operand: the same bytes as a K tile, read MN-major.
  using LayoutVt = decltype(composition(LayoutK{}, make_ordered_layout(Shape<Int<D>, Int<BK>>{}, Step<_2, _1>{})));
  using PFrag = Layout<Shape<Shape<_2, _2, _2>, _1, Int<BK / 16>>>;  // A-operand registers of P

  static constexpr int Q_ELEMS = BQ * D, K_ELEMS = BK * D;
  static constexpr int NQ = JVP ? 2 : 1, NKV = JVP ? 4 : 2;  // Q[,Qdot]; K, V[, Kdot, Vdot] per slot pair
  static constexpr int Q_BYTES = Q_ELEMS * int(sizeof(T)), K_BYTES = K_ELEMS * int(sizeof(T));
  // ... + the barriers + each K slot's tile code
  static constexpr int SMEM_BYTES = 1024 + NQ * Q_BYTES + SLOTS * NKV * K_BYTES + (4 * SLOTS + 1) * 8 + SLOTS * 4;
};

// One TMA descriptor per operand: [B, S, H, D] seen as the 4-D tensor (D, H, S, B); a box is 64 channels
// (128 bytes, the swizzle span) of one head over a tile of rows.
struct TmaMaps {
  CUtensorMap q, k, v, tq, tk, tv;
  CUtensorMap dq;  // backward: the fp32 dQ sum, which the kernel adds tiles into (TMA reduce-add)
};

// Rows [row0, row0 + R) of head h, batch b into the swizzled tile at dst (D / 64 boxes, 64 channels each;
// CuTe's SW128 K-major tile keeps each 64-channel half contiguous, R * 128 bytes apart).
template <int R, int D, typename T>
__device__ __forceinline__ void tma_rows(const CUtensorMap* map, T* dst, uint64_t* bar, int row0, int h, int b) {
  constexpr uint64_t EVICT_NORMAL = 0x1000000000000000ull;
#pragma unroll
  for (int half = 0; half < D / 64; ++half)
    SM90_TMA_LOAD_4D::copy(map, bar, EVICT_NORMAL, dst + half * R * 64, half * 64, h, row0, b);
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<cutlass::bfloat16_t>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<cutlass::half_t>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Shared-memory accesses through the shared state space. The tiles' base is aligned by integer
// arithmetic, so plain pointers into it compile to generic loads and stores.
__device__ __forceinline__ float2 lds_f2(const float* ptr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(cute::cast_smem_ptr_to_uint(ptr)) : "memory");
  return v;
}
// The element mask of a partial tile (AttnParams::pair_bits): a row group's NW words from word0, read in pairs and
// shifted right by 2 t, so that bit 8 (j % 4) + c of word j / 4 is the thread's column 8 j + 2 t + c of the
// accumulator fragment (the fragment's column of a tile's 32-token word depends on t only through 2 t).
template <int NW>
__device__ __forceinline__ void mask_words(const AttnParams& p, int group, int word0, int t, uint32_t (&w)[NW]) {
  const uint2* src = reinterpret_cast<const uint2*>(p.pair_bits + (int64_t)group * p.Wp + word0);
#pragma unroll
  for (int i = 0; i < NW / 2; ++i) {
    const uint2 x = __ldg(src + i);
    w[2 * i] = x.x >> (2 * t);
    w[2 * i + 1] = x.y >> (2 * t);
  }
}
// Whether fragment column 8 j + 2 t + c may be attended, from mask_words' words.
__device__ __forceinline__ bool mask_allows(const uint32_t* w, int j, int c) {
  return (w[j / 4] >> (8 * (j % 4) + c)) & 1u;
}
// Stores take shared-window addresses: a thread's stores into a 128-byte-swizzled tile differ by XORs of
// one base address, so the loop holds one base instead of an address per store (those had spilled).
__device__ __forceinline__ void sts_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void sts_f2(uint32_t addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}

// C += A B over every k-block; the first block overwrites C when zero_init.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, const TA& a, const TB& b, TC& c, bool zero_init) {
  mma.accumulate_ = zero_init ? GM::ScaleOut::Zero : GM::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GM::ScaleOut::One;
  }
}

// Next entry at or after kt of a row of the tile summary that is not skipped (n when none). Skipped runs
// are long (a teacher-forcing row skips half the keys or more; block-causal rows end in one), and every
// thread walks them on the critical path, so they are crossed 16 tiles per aligned 16-byte load instead
// of one dependent byte load per tile. Never reads past row[n - 1]. LIVE_FIRST tests the very next entry
// before anything else: faster for the forward kernel, slower for forward+JVP, whose code sits at the
// register limit (benchmarks/RESULTS.md, "Kernel design history").
template <bool LIVE_FIRST>
__device__ __forceinline__ int next_tile(const int8_t* row, int kt, int n) {
  if (LIVE_FIRST) {
    if (kt >= n || row[kt] != 0) return kt;
    ++kt;
  }
  for (; kt < n && (reinterpret_cast<uintptr_t>(row + kt) & 15) != 0; ++kt)
    if (row[kt] != 0) return kt;
  for (; kt + 16 <= n; kt += 16) {
    const uint4 w = *reinterpret_cast<const uint4*>(row + kt);
    if ((w.x | w.y | w.z | w.w) != 0) break;
  }
  while (kt < n && row[kt] == 0) ++kt;
  return kt;
}

// Per warpgroup, turn j issues the scores of tile j and then P V of tile j-1, and runs the softmax of
// tile j as soon as the scores are in: P V of its own and the other warpgroup's turn keep the tensor
// cores busy meanwhile (intra-warpgroup overlap and ping-pong, as in FlashAttention-3). K and V
// live in separate two-slot rings: a K slot is free once the scores of its tile are done, a V slot once
// P V of its tile is, so each load has more than an iteration to land.
template <typename T, int D, int BK, bool JVP>
__global__ void __launch_bounds__(Cfg<T, D, BK, JVP>::NT, 1)
    fwd_kernel(const AttnParams p, const __grid_constant__ TmaMaps maps) {
#if defined(MRCM_SM90_DEVICE)
  using C = Cfg<T, D, BK, JVP>;
  using cutlass::arch::ClusterBarrier;
  using cutlass::arch::ClusterTransactionBarrier;
  constexpr int BQ = C::BQ, NB = BK / 8, ND = D / 8, SL = C::SLOTS;
  constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
  // A row's running max is raised only when a tile beats it by more than this (log2 units), so most
  // tiles skip rescaling O; P stays <= 2^SLACK. fp16 keeps the exact max (P * Sdot could overflow).
  constexpr float SLACK = std::is_same<T, cutlass::half_t>::value ? 0.f : 8.f;
  extern __shared__ char smem_raw[];
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* q_s = base;
  T* qd_s = q_s + C::Q_ELEMS;                                  // JVP only
  T* k_ring = q_s + C::NQ * C::Q_ELEMS;                        // [slot][K, Kdot]
  T* v_ring = k_ring + SL * C::NKV / 2 * C::K_ELEMS;           // [slot][V, Vdot]
  uint64_t* bars = reinterpret_cast<uint64_t*>(v_ring + SL * C::NKV / 2 * C::K_ELEMS);
  uint64_t* full_k = bars;
  uint64_t* empty_k = bars + SL;
  uint64_t* full_v = bars + 2 * SL;
  uint64_t* empty_v = bars + 3 * SL;
  uint64_t* qbar = bars + 4 * SL;
  // The tile code of each K slot, written by the producer before the slot's barrier completes:
  // 2 kt + (1 if the tile needs the element mask), or -1 after the last tile.
  int* code_s = reinterpret_cast<int*>(qbar + 1);
  auto k_tile = [&](int slot, int which) { return k_ring + (slot * (C::NKV / 2) + which) * C::K_ELEMS; };
  auto v_tile = [&](int slot, int which) { return v_ring + (slot * (C::NKV / 2) + which) * C::K_ELEMS; };

  // ct: the thread's index among the consumer (MMA) warpgroups; negative in the producer warpgroup.
  const int tid = threadIdx.x, ct = tid - 128, wg = ct / 128, warp = (ct % 128) / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  // Which row of which head: in launch order, or (cta_order 1, for summaries whose rows get longer) the
  // rows from the last to the first with the heads interleaved, so the whole launch runs longest first.
  // Computed from blockIdx, not looked up: a per-CTA load of the row index cost 2-7% (RESULTS.md).
  const int lin = blockIdx.x + gridDim.x * blockIdx.y;
  const int qt = p.cta_order ? p.Tq - 1 - lin / p.H : (int)blockIdx.x;
  const int h = p.cta_order ? lin % p.H : (int)blockIdx.y, b = blockIdx.z, q0 = qt * BQ;
  const int64_t rs = (int64_t)p.H * D;
  const int64_t qoff = ((int64_t)b * p.Sq * p.H + h) * D;
  // The JVP kernel takes all three tangents (the host passes zeros for a missing one): runtime-optional
  // products would make ptxas serialize the wgmma pipeline.
  constexpr uint32_t ring_bytes = (JVP ? 2 : 1) * C::K_BYTES;  // one slot of either ring
  const int8_t* trow = p.tiles + (int64_t)qt * p.Tk;

  if (tid == 0) {
    for (int s = 0; s < SL; ++s) {
      ClusterBarrier::init(&full_k[s], 1);
      ClusterBarrier::init(&full_v[s], 1);
      ClusterBarrier::init(&empty_k[s], C::NT_MMA / 32);  // one arrival per consumer warp
      ClusterBarrier::init(&empty_v[s], C::NT_MMA / 32);
    }
    ClusterBarrier::init(qbar, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // The loader: thread 0, which does nothing else. The j-th non-skipped tile goes to slot j % SL; refilling a
  // slot waits for the release of the tile SL earlier.
  const bool producer = tid == 0;
  struct Ring {  // one two-slot ring: its barriers, its tiles ([slot][primal, tangent]) and its cursor
    uint64_t* full;
    uint64_t* empty;
    T* tiles;
    const CUtensorMap* primal;
    const CUtensorMap* tangent;
    int j, kt;  // next tile to load: its rank among the non-skipped tiles, and its index
  };
  const int first = next_tile<!JVP>(trow, 0, p.Tk);
  auto needs_mask = [&](int kt) { return trow[kt] == 2 || (kt + 1) * BK > p.Sk; };
  auto produce = [&](Ring& r, bool coded) {
    if (r.kt >= p.Tk) return;
    const int slot = r.j % SL;
    if (r.j >= SL) ClusterBarrier::wait(&r.empty[slot], ((r.j - SL) / SL) & 1);
    if (coded) code_s[slot] = 2 * r.kt + (needs_mask(r.kt) ? 1 : 0);  // released by the arrive below
    ClusterTransactionBarrier::arrive_and_expect_tx(&r.full[slot], ring_bytes);
    T* dst = r.tiles + slot * (C::NKV / 2) * C::K_ELEMS;
    tma_rows<BK, D>(r.primal, dst, &r.full[slot], r.kt * BK, h, b);
    if (JVP) tma_rows<BK, D>(r.tangent, dst + C::K_ELEMS, &r.full[slot], r.kt * BK, h, b);
    ++r.j;
    r.kt = next_tile<!JVP>(trow, r.kt + 1, p.Tk);
  };
  auto load_q = [&]() {
    ClusterTransactionBarrier::arrive_and_expect_tx(qbar, (JVP ? 2 : 1) * C::Q_BYTES);
    tma_rows<BQ, D>(&maps.q, q_s, qbar, q0, h, b);
    if (JVP) tma_rows<BQ, D>(&maps.tq, qd_s, qbar, q0, h, b);
  };
  Ring k_ring_state{full_k, empty_k, k_ring, &maps.k, &maps.tk, 0, first};
  Ring v_ring_state{full_v, empty_v, v_ring, &maps.v, &maps.tv, 0, first};
  if (tid < 128) {  // the producer warpgroup: one thread loads every tile, then ends the K ring with -1
    cutlass::arch::warpgroup_reg_dealloc<C::PRODUCER_REGS>();
    if (producer) {
      load_q();
      while (k_ring_state.kt < p.Tk) {
        produce(k_ring_state, true);
        produce(v_ring_state, false);
      }
      const int slot = k_ring_state.j % SL;
      if (k_ring_state.j >= SL) ClusterBarrier::wait(&empty_k[slot], ((k_ring_state.j - SL) / SL) & 1);
      code_s[slot] = -1;
      ClusterBarrier::arrive(&full_k[slot]);
    }
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<C::CONSUMER_REGS>();
  auto wait_v = [&](int j) { ClusterBarrier::wait(&full_v[j % SL], (j / SL) & 1); };
  // The producer's code of the j-th live tile, read once its K slot is full: after this the K tile is
  // ready too, so the scores need no wait of their own.
  auto code_of = [&](int j) -> int {
    ClusterBarrier::wait(&full_k[j % SL], (j / SL) & 1);
    return code_s[j % SL];
  };
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) ClusterBarrier::arrive(bar);
  };
  // Ping-pong (FlashAttention-3): the warpgroups take turns issuing their products (named barriers 1
  // and 2), so one warpgroup's softmax runs while the other's products keep the tensor cores busy.
  auto turn_wait = [&]() { asm volatile("bar.sync %0, %1;\n" ::"r"(1 + wg), "r"(C::NT_MMA) : "memory"); };
  auto turn_pass = [&]() { asm volatile("bar.arrive %0, %1;\n" ::"r"(2 - wg), "r"(C::NT_MMA) : "memory"); };

  typename C::MmaQK mma_qk;
  typename C::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ct);
  auto thr_pv = mma_pv.get_thread_slice(ct);
  Tensor tSrQ = thr_qk.partition_fragment_A(make_tensor(make_smem_ptr(q_s), typename C::LayoutQ{}));
  Tensor tSrQd = thr_qk.partition_fragment_A(make_tensor(make_smem_ptr(qd_s), typename C::LayoutQ{}));

  Tensor accS = partition_fragment_C(mma_qk, Shape<Int<BQ>, Int<BK>>{});
  Tensor accSd = partition_fragment_C(mma_qk, Shape<Int<BQ>, Int<BK>>{});
  Tensor accO = partition_fragment_C(mma_pv, Shape<Int<BQ>, Int<D>>{});
  Tensor accB = partition_fragment_C(mma_pv, Shape<Int<BQ>, Int<D>>{});
  Tensor rP = make_tensor<T>(typename C::PFrag{});
  Tensor rPS = make_tensor<T>(typename C::PFrag{});
  clear(accO);
  if (JVP) clear(accB);
  auto S = [&](int c, int r, int j) -> float& { return accS(make_coord(c, r, j), 0, 0); };
  auto Sd = [&](int c, int r, int j) -> float& { return accSd(make_coord(c, r, j), 0, 0); };

  const int row_in_tile0 = wg * 64 + warp * 16 + g;
  int qg[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + row_in_tile0 + 8 * r;
    qg[r] = row < p.Sq ? p.q_groups[row] : 0;
  }
  const float sl2 = p.scale * LOG2E;
  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.f, 0.f}, rr[2] = {0.f, 0.f}, alpha[2];

  auto issue_scores = [&](int slot) {
    Tensor tSrK = thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(k_tile(slot, 0)), typename C::LayoutK{}));
    Tensor tSrKd = thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(k_tile(slot, 1)), typename C::LayoutK{}));
    warpgroup_fence_operand(accS);
    if (JVP) warpgroup_fence_operand(accSd);
    warpgroup_arrive();
    wg_gemm(mma_qk, tSrQ, tSrK, accS, true);
    if (JVP) {
      wg_gemm(mma_qk, tSrQd, tSrK, accSd, true);
      wg_gemm(mma_qk, tSrQ, tSrKd, accSd, false);
    }
    warpgroup_commit_batch();
  };
  auto issue_pv = [&](int slot) {
    Tensor tOrV = thr_pv.partition_fragment_B(make_tensor(make_smem_ptr(v_tile(slot, 0)), typename C::LayoutVt{}));
    Tensor tOrVd = thr_pv.partition_fragment_B(make_tensor(make_smem_ptr(v_tile(slot, 1)), typename C::LayoutVt{}));
    warpgroup_fence_operand(accO);
    warpgroup_fence_operand(rP);
    if (JVP) { warpgroup_fence_operand(accB); warpgroup_fence_operand(rPS); }
    warpgroup_arrive();
    wg_gemm(mma_pv, rP, tOrV, accO, false);
    if (JVP) {
      wg_gemm(mma_pv, rP, tOrVd, accB, false);
      wg_gemm(mma_pv, rPS, tOrV, accB, false);
    }
    warpgroup_commit_batch();
  };
  // Scores of the tile with this code (in accS/accSd) -> unnormalised probabilities in place; updates m, l,
  // rr, alpha.
  auto softmax = [&](int code) {
    warpgroup_fence_operand(accS);
    if (JVP) warpgroup_fence_operand(accSd);
    if (code & 1) {
      // The row group's bits of this tile's keys (host-made, 0 past Sk). Two group lookups per element, a
      // dependent pair of global loads, made these tiles several times dearer than a full one (RESULTS.md).
      constexpr int NW = BK / 32;
      uint32_t w[2][NW];
#pragma unroll
      for (int r = 0; r < 2; ++r) mask_words<NW>(p, qg[r], (code >> 1) * NW, t, w[r]);
#pragma unroll
      for (int j = 0; j < NB; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (!mask_allows(w[r], j, c)) S(c, r, j) = -CUDART_INF_F;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx4[4] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F};  // 4 chains: ILP
#pragma unroll
      for (int j = 0; j < NB; ++j) mx4[j % 4] = fmaxf(mx4[j % 4], fmaxf(S(0, r, j), S(1, r, j)));
      const float mx = quad_max(fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]))) * sl2;
      const float m_old = m[r];
      const bool bump = mx > m_old + SLACK;
      if (bump) m[r] = mx;
      alpha[r] = bump ? exp2f(m_old - mx) : 1.f;
      const float muse = m[r] == -CUDART_INF_F ? 0.f : m[r];
      float ls[4] = {0.f, 0.f, 0.f, 0.f}, rs4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < NB; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pv = exp2f(fmaf(S(c, r, j), sl2, -muse));
          S(c, r, j) = pv;
          ls[j % 4] += pv;
          if (JVP) {
            const float ps = pv * Sd(c, r, j) * p.scale;  // masked: pv = 0
            Sd(c, r, j) = ps;
            rs4[j % 4] += ps;
          }
        }
      l[r] = fmaf(l[r], alpha[r], (ls[0] + ls[1]) + (ls[2] + ls[3]));
      if (JVP) rr[r] = fmaf(rr[r], alpha[r], (rs4[0] + rs4[1]) + (rs4[2] + rs4[3]));
    }
  };
  // After P V of the previous tile has landed: bring O (and B) to the new max, then P into registers.
  auto rescale_and_convert = [&]() {
    warpgroup_fence_operand(accO);
    if (JVP) warpgroup_fence_operand(accB);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (alpha[r] != 1.f) {
#pragma unroll
        for (int j = 0; j < ND; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            accO(make_coord(c, r, j), 0, 0) *= alpha[r];
            if (JVP) accB(make_coord(c, r, j), 0, 0) *= alpha[r];
          }
      }
#pragma unroll
    for (int j = 0; j < NB; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          rP(make_coord(c, r, j % 2), 0, j / 2) = static_cast<T>(S(c, r, j));
          if (JVP) rPS(make_coord(c, r, j % 2), 0, j / 2) = static_cast<T>(Sd(c, r, j));
        }
  };

  ClusterBarrier::wait(qbar, 0);
  int code = code_of(0);
  if (code >= 0) {
    if (wg == 1) turn_pass();  // warpgroup 0 goes first
    turn_wait();
    issue_scores(0);
    turn_pass();
    warpgroup_wait<0>();
    release(&empty_k[0]);
    softmax(code);
    rescale_and_convert();
    int j = 1;
    for (code = code_of(1); code >= 0; ++j, code = code_of(j)) {
      if (!C::OVERLAP) {
        wait_v(j - 1);
        turn_wait();
        issue_pv((j - 1) % SL);
        warpgroup_wait<0>();  // P's registers are free before the scores' are written
        release(&empty_v[(j - 1) % SL]);
        issue_scores(j % SL);
        turn_pass();
        warpgroup_wait<0>();
        release(&empty_k[j % SL]);
        softmax(code);
        rescale_and_convert();
        continue;
      }
      wait_v(j - 1);
      turn_wait();
      issue_scores(j % SL);  // the scores of tile j, then P V of tile j-1, in one turn
      issue_pv((j - 1) % SL);
      turn_pass();
      warpgroup_wait<1>();  // the scores have landed; P V of tile j-1 runs on under the softmax
      release(&empty_k[j % SL]);
      softmax(code);
      warpgroup_wait<0>();
      release(&empty_v[(j - 1) % SL]);
      rescale_and_convert();
    }
    wait_v(j - 1);
    turn_wait();
    issue_pv((j - 1) % SL);
    if (wg == 0) turn_pass();  // warpgroup 1's last turn has no successor
    warpgroup_wait<0>();
    warpgroup_fence_operand(accO);
    if (JVP) warpgroup_fence_operand(accB);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lt = quad_sum(l[r]);
    const float rt = JVP ? quad_sum(rr[r]) : 0.f;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    const int row = q0 + row_in_tile0 + 8 * r;
    if (row < p.Sq) {
      T* orow = (T*)p.o + qoff + (int64_t)row * rs;
      T* drow = JVP ? (T*)p.to + qoff + (int64_t)row * rs : nullptr;
#pragma unroll
      for (int j = 0; j < ND; ++j) {
        const float o0 = accO(make_coord(0, r, j), 0, 0) * inv, o1 = accO(make_coord(1, r, j), 0, 0) * inv;
        *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * t) = pack2<T>(o0, o1);
        if (JVP) {
          const float d0 = (accB(make_coord(0, r, j), 0, 0) - rt * o0) * inv;
          const float d1 = (accB(make_coord(1, r, j), 0, 0) - rt * o1) * inv;
          *reinterpret_cast<uint32_t*>(drow + 8 * j + 2 * t) = pack2<T>(d0, d1);
        }
      }
      if (!JVP && t == 0 && p.lse)
        p.lse[((int64_t)b * p.H + h) * p.Sq + row] = lt > 0.f ? m[r] * LN2 + logf(lt) : -CUDART_INF_F;
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // an image without sm_90a features must never run this kernel (the host checks the device)
#endif
}

// ---------------------------------------------------------------- backward
// One CTA per 128 keys: each warpgroup owns 64 of them and keeps their dK and dV accumulators; the
// query tiles (Q, dO: 64 rows each) stream through a two-slot TMA ring shared by both warpgroups. Per
// query tile: S^T = K Q^T and dP^T = V dO^T (smem x smem; the exponentials of P^T run while dP^T is
// still in flight), P^T = exp(S^T - LSE), dS^T = P^T (dP^T - Delta) in registers, dV += P^T dO and
// dK += dS^T Q (registers x smem). dS^T also goes to shared memory, and dQ = dS K (smem x smem) is split
// between the warpgroups by head-dim half over all 128 keys (head dim 128), so the dQ accumulator is 32
// registers, not 64, and each query element is added once per CTA, not twice; the partial dQ tile goes
// through shared memory to a TMA reduce-add into the fp32 dQ sum, which the TMA unit runs in the
// background instead of 16 vector atomics per thread and tile (each step measured in benchmarks/RESULTS.md).
template <typename T, int D>
struct BwdCfg {
  static constexpr int BK = 128, BQ = 64, NT = 256, SL = 2, KW = 64;  // KW: keys per warpgroup
  static constexpr int NH = D / 64;  // 64-channel halves of a row; with two, each warpgroup owns one of dQ
  using SAtom = decltype(GM::ss_op_selector<T, T, float, Shape<_64, Int<BQ>, _16>>());
  using RAtom = decltype(GM::rs_op_selector<T, T, float, Shape<_64, Int<D>, _16>, GM::Major::K, GM::Major::MN>());
  using QAtom = decltype(GM::ss_op_selector<T, T, float, Shape<_64, _64, _16>, GM::Major::MN, GM::Major::MN>());
  using MmaS = decltype(make_tiled_mma(SAtom{}));  // every product is one warpgroup's
  using MmaR = decltype(make_tiled_mma(RAtom{}));
  using MmaQ = decltype(make_tiled_mma(QAtom{}));
  using LayoutRows = decltype(tile_to_shape(GM::Layout_K_SW128_Atom<T>{}, Shape<_64, Int<D>>{}));  // K, V, Q, dO
  // The same bytes read as the (N = D, K = rows) operand: Q, dO for dK, dV.
  using LayoutRowsT = decltype(composition(LayoutRows{}, make_ordered_layout(Shape<Int<D>, _64>{}, Step<_2, _1>{})));
  // One 64 x 64 swizzled block (a 64-channel half of a row tile, or dS^T as (key, q)) and its transpose:
  // dS as the (M = q, K = key) operand and a K half as the (N = channel, K = key) operand of dQ = dS K.
  using Layout64 = decltype(tile_to_shape(GM::Layout_K_SW128_Atom<T>{}, Shape<_64, _64>{}));
  using Layout64T = decltype(composition(Layout64{}, make_ordered_layout(Shape<_64, _64>{}, Step<_2, _1>{})));
  using PFrag = Layout<Shape<Shape<_2, _2, _2>, _1, Int<BQ / 16>>>;
  static constexpr int TILE = 64 * D, TILE_BYTES = TILE * int(sizeof(T)), DS = 64 * 64;
  static constexpr int DQ = 64 * 64;  // a warpgroup's fp32 dQ tile: two TMA boxes of 64 rows x 32 floats
  // K, V (per warpgroup), the Q/dO ring, dS^T (two buffers per warpgroup), dQ, and per warpgroup the LSE and
  // Delta of its query tile
  static constexpr int SMEM_BYTES = 1024 + (4 + 2 * SL) * TILE_BYTES + 4 * DS * int(sizeof(T)) + 2 * DQ * 4 +
                                    4 * 64 * 4 + (2 * SL + 1) * 8;
  static constexpr int MAX_SMEM = 227 * 1024;
  static __host__ __device__ int col_bytes(int Tq) { return (Tq + 15) / 16 * 16; }
  static __host__ __device__ bool col_staged(int Tq) { return SMEM_BYTES + col_bytes(Tq) <= MAX_SMEM; }
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdCfg<T, D>::NT, 1)
    bwd_kernel(const AttnParams p, const __grid_constant__ TmaMaps maps) {
#if defined(MRCM_SM90_DEVICE)
  using C = BwdCfg<T, D>;
  using cutlass::arch::ClusterBarrier;
  using cutlass::arch::ClusterTransactionBarrier;
  constexpr int BQ = C::BQ, BK = C::BK, SL = C::SL, KW = C::KW, NQ = BQ / 8, NH = C::NH;
  constexpr float LOG2E = 1.4426950408889634f;
  extern __shared__ char smem_raw[];
  T* base = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* k_s = base;                         // [wg] 64 keys x D
  T* v_s = k_s + 2 * C::TILE;            // [wg]
  T* ring = v_s + 2 * C::TILE;           // [slot][Q, dO]
  T* ds_s = ring + 2 * SL * C::TILE;     // [buffer][wg] (key, q)
  float* dq_s = reinterpret_cast<float*>(ds_s + 4 * C::DS);   // [wg][box][64 rows][32], 128B-swizzled
  float* lse_s = dq_s + 2 * C::DQ;                              // [wg][64], log2 units
  float* dl_s = lse_s + 2 * 64;                                // [wg][64]
  uint64_t* full = reinterpret_cast<uint64_t*>(dl_s + 2 * 64);
  uint64_t* empty = full + SL;
  uint64_t* kvbar = empty + SL;
  int8_t* col_s = reinterpret_cast<int8_t*>(kvbar + 1);

  const int tid = threadIdx.x, wg = tid / 128, wt = tid % 128, warp = wt / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, k0 = kt * BK, kw0 = k0 + wg * KW;
  const bool staged = C::col_staged(p.Tq);
  if (staged)
    for (int i = tid; i < p.Tq; i += C::NT) col_s[i] = p.tiles[(int64_t)i * p.Tk + kt];
  const int64_t rs = (int64_t)p.H * D;
  const int64_t koff = ((int64_t)b * p.Sk * p.H + h) * D;
  const int64_t loff = ((int64_t)b * p.H + h) * p.Sq;
  const float sl2 = p.scale * LOG2E;
  T* my_k = k_s + wg * C::TILE;
  T* my_v = v_s + wg * C::TILE;
  float* my_lse = lse_s + wg * 64;
  float* my_dl = dl_s + wg * 64;
  float* my_dq = dq_s + wg * C::DQ;
  const bool dq_issuer = wt == 0;  // issues (and waits for) this warpgroup's dQ reduce-adds

  if (tid == 0) {
    for (int s = 0; s < SL; ++s) {
      ClusterBarrier::init(&full[s], 1);
      ClusterBarrier::init(&empty[s], C::NT / 32);
    }
    ClusterBarrier::init(kvbar, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  // The query tiles this key tile meets: column kt of the tile summary.
  auto tile_kind = [&](int qt) -> int { return staged ? col_s[qt] : p.tiles[(int64_t)qt * p.Tk + kt]; };
  auto next_q = [&](int qt) {
    while (qt < p.Tq && tile_kind(qt) == 0) ++qt;
    return qt;
  };
  const bool producer = tid == 128;
  int pj = 0, pqt = next_q(0);
  auto produce = [&]() {
    if (pqt >= p.Tq) return;
    const int slot = pj % SL;
    if (pj >= SL) ClusterBarrier::wait(&empty[slot], ((pj - SL) / SL) & 1);
    ClusterTransactionBarrier::arrive_and_expect_tx(&full[slot], 2 * C::TILE_BYTES);
    tma_rows<64, D>(&maps.q, ring + (2 * slot) * C::TILE, &full[slot], pqt * BQ, h, b);
    tma_rows<64, D>(&maps.tq, ring + (2 * slot + 1) * C::TILE, &full[slot], pqt * BQ, h, b);  // dO
    ++pj;
    pqt = next_q(pqt + 1);
  };
  if (producer) {
    ClusterTransactionBarrier::arrive_and_expect_tx(kvbar, 4 * C::TILE_BYTES);
    for (int w = 0; w < 2; ++w) {
      tma_rows<64, D>(&maps.k, k_s + w * C::TILE, kvbar, k0 + w * KW, h, b);
      tma_rows<64, D>(&maps.v, v_s + w * C::TILE, kvbar, k0 + w * KW, h, b);
    }
    for (int s = 0; s < SL; ++s) produce();
  }

  typename C::MmaS mma_s;
  typename C::MmaR mma_r;
  typename C::MmaQ mma_q;
  auto thr_s = mma_s.get_thread_slice(wt);
  auto thr_r = mma_r.get_thread_slice(wt);
  auto thr_q = mma_q.get_thread_slice(wt);

  Tensor accS = partition_fragment_C(mma_s, Shape<_64, Int<BQ>>{});
  Tensor accP = partition_fragment_C(mma_s, Shape<_64, Int<BQ>>{});  // dP^T
  Tensor accDK = partition_fragment_C(mma_r, Shape<_64, Int<D>>{});
  Tensor accDV = partition_fragment_C(mma_r, Shape<_64, Int<D>>{});
  Tensor rP = make_tensor<T>(typename C::PFrag{});
  Tensor rDS = make_tensor<T>(typename C::PFrag{});
  clear(accDK);
  clear(accDV);
  auto S = [&](int c, int r, int j) -> float& { return accS(make_coord(c, r, j), 0, 0); };
  auto dP = [&](int c, int r, int j) -> float& { return accP(make_coord(c, r, j), 0, 0); };
  int kg[2];  // this thread's two key rows
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = kw0 + warp * 16 + g + 8 * r;
    kg[r] = key < p.Sk ? p.k_groups[key] : -1;
  }
  auto wg_sync = [&]() { asm volatile("bar.sync %0, %1;\n" ::"r"(1 + wg), "r"(128) : "memory"); };
  auto cta_sync = [&]() { asm volatile("bar.sync 3, 256;\n" ::: "memory"); };
  // dQ columns this warpgroup owns, and the key blocks (warpgroups' dS^T and K) it sums over.
  constexpr int NU = NH == 2 ? 2 : 1;
  const int dq_col0 = NH == 2 ? wg * 64 : 0;

  // LSE and Delta of the next query tile are copied (cp.async, threads 0-63 of each warpgroup) at the end of
  // an iteration, once every reader of the current ones has passed its barrier: no registers held, and the
  // copy lands while the next tile's products run.
  auto prefetch = [&](int qt) {
    const int q = qt * BQ + wt;
    if (wt < 64 && qt < p.Tq) {
      if (q < p.Sq) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(cute::cast_smem_ptr_to_uint(my_lse + wt)),
                     "l"(p.lse + loff + q) : "memory");
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(cute::cast_smem_ptr_to_uint(my_dl + wt)),
                     "l"(p.delta + loff + q) : "memory");
      } else {
        my_lse[wt] = -CUDART_INF_F;
        my_dl[wt] = 0.f;
      }
    }
  };

  ClusterBarrier::wait(kvbar, 0);
  int j = 0;
  prefetch(next_q(0));
  for (int qt = next_q(0); qt < p.Tq; ++j) {
    const int slot = j % SL, q0 = qt * BQ;
    T* q_tile = ring + (2 * slot) * C::TILE;
    T* do_tile = ring + (2 * slot + 1) * C::TILE;
    T* ds_buf = ds_s + (j % 2) * 2 * C::DS;  // two buffers: the other warpgroup may still read the last one
    ClusterBarrier::wait(&full[slot], (j / SL) & 1);
    {  // descriptors are made where used (hoisted, they would hold registers across the loop)
      Tensor tSrK = thr_s.partition_fragment_A(make_tensor(make_smem_ptr(my_k), typename C::LayoutRows{}));
      Tensor tSrV = thr_s.partition_fragment_A(make_tensor(make_smem_ptr(my_v), typename C::LayoutRows{}));
      Tensor tSrQ = thr_s.partition_fragment_B(make_tensor(make_smem_ptr(q_tile), typename C::LayoutRows{}));
      Tensor tSrO = thr_s.partition_fragment_B(make_tensor(make_smem_ptr(do_tile), typename C::LayoutRows{}));
      warpgroup_fence_operand(accS);
      warpgroup_fence_operand(accP);
      warpgroup_arrive();
      wg_gemm(mma_s, tSrK, tSrQ, accS, true);
      warpgroup_commit_batch();
      wg_gemm(mma_s, tSrV, tSrO, accP, true);
      warpgroup_commit_batch();
    }
    if (wt < 64) {  // this tile's LSE into log2 units, in place (once per warpgroup, not 32 loads per thread)
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      const float L = my_lse[wt];
      my_lse[wt] = L == -CUDART_INF_F ? CUDART_INF_F : L * LOG2E;
    }
    const bool need_mask = tile_kind(qt) == 2 || k0 + BK > p.Sk || q0 + BQ > p.Sq;
    if (dq_issuer) tma_store_wait<0>();  // the last tile's reduce-add has read my_dq
    wg_sync();  // LSE / Delta stores visible; my_dq free
    warpgroup_wait<1>();  // S^T has landed; dP^T may still be in flight
    warpgroup_fence_operand(accS);
    // P^T = exp2(S^T scale - LSE). Only tiles that need the element mask read it, in a branch of their own:
    // written as one predicated loop, its loads issued on every tile. The mask of a key row is its group's
    // bits of this tile's 64 queries (host-made, 0 past Sq); a key past Sk has none.
    auto exponentials = [&](auto masked) {
      uint32_t w[2][2] = {{0u, 0u}, {0u, 0u}};
      if (masked)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          if (kg[r] >= 0) mask_words<2>(p, kg[r], q0 / 32, t, w[r]);
#pragma unroll
      for (int jj = 0; jj < NQ; ++jj) {
        const float2 lse2 = lds_f2(my_lse + 8 * jj + 2 * t);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float pv = exp2f(fmaf(S(c, r, jj), sl2, -(c ? lse2.y : lse2.x)));
            if (masked && !mask_allows(w[r], jj, c)) pv = 0.f;
            S(c, r, jj) = pv;
            rP(make_coord(c, r, jj % 2), 0, jj / 2) = static_cast<T>(pv);
          }
        }
      }
    };
    if (need_mask)
      exponentials(std::true_type{});
    else
      exponentials(std::false_type{});
    warpgroup_wait<0>();
    warpgroup_fence_operand(accP);
    Tensor sDSt = make_tensor(make_smem_ptr(ds_buf + wg * C::DS), typename C::Layout64{});  // (key, q)
    // Word (row, 8 jj + 2t) of the swizzled dS^T block lies at the address of (row, 2t) XOR jj * 16 bytes.
    const uint32_t ds_row[2] = {cute::cast_smem_ptr_to_uint(&sDSt(warp * 16 + g, 2 * t)),
                                cute::cast_smem_ptr_to_uint(&sDSt(warp * 16 + g + 8, 2 * t))};
#pragma unroll
    for (int jj = 0; jj < NQ; ++jj) {
      const float2 dl = lds_f2(my_dl + 8 * jj + 2 * t);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float d0 = S(0, r, jj) * (dP(0, r, jj) - dl.x);  // dS^T without the softmax scale
        const float d1 = S(1, r, jj) * (dP(1, r, jj) - dl.y);
        rDS(make_coord(0, r, jj % 2), 0, jj / 2) = static_cast<T>(d0);
        rDS(make_coord(1, r, jj % 2), 0, jj / 2) = static_cast<T>(d1);
        sts_u32(ds_row[r] ^ (jj << 4), pack2<T>(d0, d1));  // one word
      }
    }
    cutlass::arch::fence_view_async_shared();  // dS^T stores -> visible to wgmma
    if (NH == 2) cta_sync(); else wg_sync();   // dQ reads both warpgroups' dS^T

    Tensor tRrOt = thr_r.partition_fragment_B(make_tensor(make_smem_ptr(do_tile), typename C::LayoutRowsT{}));
    Tensor tRrQt = thr_r.partition_fragment_B(make_tensor(make_smem_ptr(q_tile), typename C::LayoutRowsT{}));
    Tensor accQ = partition_fragment_C(mma_q, Shape<_64, _64>{});
    warpgroup_fence_operand(accDV);
    warpgroup_fence_operand(accDK);
    warpgroup_fence_operand(rP);
    warpgroup_fence_operand(rDS);
    warpgroup_fence_operand(accQ);
    warpgroup_arrive();
    wg_gemm(mma_r, rP, tRrOt, accDV, false);
    wg_gemm(mma_r, rDS, tRrQt, accDK, false);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int src = NU == 2 ? u : wg;  // whose keys: both warpgroups' with two halves, else our own
      Tensor tQrDS =
          thr_q.partition_fragment_A(make_tensor(make_smem_ptr(ds_buf + src * C::DS), typename C::Layout64T{}));
      Tensor tQrK = thr_q.partition_fragment_B(
          make_tensor(make_smem_ptr(k_s + src * C::TILE + dq_col0 * 64), typename C::Layout64T{}));
      wg_gemm(mma_q, tQrDS, tQrK, accQ, u == 0);
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(accDV);
    warpgroup_fence_operand(accDK);
    warpgroup_fence_operand(accQ);
    __syncwarp();
    if (lane == 0) ClusterBarrier::arrive(&empty[slot]);  // Q and dO of this slot are no longer read
    if (producer) produce();

    // Partial dQ -> shared memory in the 128-byte swizzle of the TMA boxes (16-byte chunk ^ row % 8:
    // conflict-free float2 stores), then one thread hands both boxes to the TMA unit to add into dQ.
    // Chunk (2 (jd % 4) + t / 2) ^ (row % 8) of a row is chunk t / 2 ^ (row % 8) XOR (jd % 4) * 2.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      const uint32_t a0 = cute::cast_smem_ptr_to_uint(my_dq) + row * 128 + ((t / 2) ^ (row % 8)) * 16 + 8 * (t % 2);
#pragma unroll
      for (int jd = 0; jd < 8; ++jd)
        sts_f2((a0 ^ ((jd % 4) << 5)) + (jd / 4) * 64 * 32 * 4, accQ(make_coord(0, r, jd), 0, 0),
               accQ(make_coord(1, r, jd), 0, 0));
    }
    cutlass::arch::fence_view_async_shared();
    wg_sync();
    if (dq_issuer) {
#pragma unroll
      for (int box = 0; box < 2; ++box)
        SM90_TMA_REDUCE_ADD_4D::copy(&maps.dq, my_dq + box * 64 * 32, dq_col0 + box * 32, h, q0, b);
      tma_store_arrive();
    }
    qt = next_q(qt + 1);
    prefetch(qt);
  }

  if (dq_issuer) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // reduce-adds done
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = kw0 + warp * 16 + g + 8 * r;
    if (key < p.Sk) {
      T* dk = (T*)p.dk + koff + (int64_t)key * rs;
      T* dv = (T*)p.dv + koff + (int64_t)key * rs;
#pragma unroll
      for (int jd = 0; jd < D / 8; ++jd) {
        *reinterpret_cast<uint32_t*>(dk + 8 * jd + 2 * t) =
            pack2<T>(accDK(make_coord(0, r, jd), 0, 0) * p.scale, accDK(make_coord(1, r, jd), 0, 0) * p.scale);
        *reinterpret_cast<uint32_t*>(dv + 8 * jd + 2 * t) =
            pack2<T>(accDV(make_coord(0, r, jd), 0, 0), accDV(make_coord(1, r, jd), 0, 0));
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess || status != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// Descriptor for a contiguous [B, S, H, D] tensor seen as (D, H, S, B), boxes of `cols` channels x `rows`
// rows, 128-byte swizzle (cols * elem_bytes must be 128); false if it cannot be made (the caller checks the
// 16-byte alignment TMA needs).
bool make_map_raw(CUtensorMap* map, const void* ptr, CUtensorMapDataType dt, int elem_bytes, int B, int S, int H,
                  int D, int cols, int rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return false;
  const cuuint64_t e = elem_bytes;
  cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(H), cuuint64_t(S), cuuint64_t(B)};
  cuuint64_t strides[3] = {D * e, cuuint64_t(H) * D * e, cuuint64_t(S) * H * D * e};
  cuuint32_t box[4] = {cuuint32_t(cols), 1, cuuint32_t(rows), 1};
  cuuint32_t elem[4] = {1, 1, 1, 1};
  return encode(map, dt, 4, const_cast<void*>(ptr), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T>
bool make_map(CUtensorMap* map, const void* ptr, int B, int S, int H, int D, int rows) {
  const CUtensorMapDataType dt =
      std::is_same<T, cutlass::bfloat16_t>::value ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return make_map_raw(map, ptr, dt, sizeof(T), B, S, H, D, 64, rows);
}

// Launch with `smem` bytes of dynamic shared memory (above the 48 KiB default, so it must be allowed first).
template <typename Kernel>
cudaError_t run(Kernel kernel, dim3 grid, int threads, int smem, const AttnParams& p, const TmaMaps& maps,
                cudaStream_t stream) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, threads, smem, stream>>>(p, maps);
  return cudaGetLastError();
}

template <typename T, int D, int BK, bool JVP>
cudaError_t launch(const AttnParams& p, cudaStream_t stream) {
  using C = Cfg<T, D, BK, JVP>;
  TmaMaps maps;
  memset(&maps, 0, sizeof(maps));
  bool ok = make_map<T>(&maps.q, p.q, p.B, p.Sq, p.H, D, C::BQ) && make_map<T>(&maps.k, p.k, p.B, p.Sk, p.H, D, BK) &&
            make_map<T>(&maps.v, p.v, p.B, p.Sk, p.H, D, BK);
  if (JVP) {  // all three tangents are required here (fused_attention.cpp passes zeros for a missing one)
    if (!p.tq || !p.tk || !p.tv) return cudaErrorInvalidValue;
    ok = ok && make_map<T>(&maps.tq, p.tq, p.B, p.Sq, p.H, D, C::BQ) &&
         make_map<T>(&maps.tk, p.tk, p.B, p.Sk, p.H, D, BK) && make_map<T>(&maps.tv, p.tv, p.B, p.Sk, p.H, D, BK);
  }
  if (!ok) return cudaErrorInvalidValue;
  return run(fwd_kernel<T, D, BK, JVP>, dim3((p.Sq + C::BQ - 1) / C::BQ, p.H, p.B), C::NT, C::SMEM_BYTES, p, maps,
             stream);
}

template <typename T, int D>
cudaError_t launch_bwd(const AttnParams& p, cudaStream_t stream) {
  using C = BwdCfg<T, D>;
  TmaMaps maps;
  memset(&maps, 0, sizeof(maps));
  const bool ok = make_map<T>(&maps.q, p.q, p.B, p.Sq, p.H, D, 64) && make_map<T>(&maps.tq, p.dout, p.B, p.Sq, p.H, D, 64) &&
                  make_map<T>(&maps.k, p.k, p.B, p.Sk, p.H, D, 64) && make_map<T>(&maps.v, p.v, p.B, p.Sk, p.H, D, 64) &&
                  make_map_raw(&maps.dq, p.dq_accum, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, p.B, p.Sq, p.H, D, 32, 64);
  if (!ok) return cudaErrorInvalidValue;
  const int smem = C::SMEM_BYTES + (C::col_staged(p.Tq) ? C::col_bytes(p.Tq) : 0);
  return run(bwd_kernel<T, D>, dim3((p.Sk + C::BK - 1) / C::BK, p.H, p.B), C::NT, smem, p, maps, stream);
}

// Calls f(element type tag, head-dim constant) for the four supported (dtype, head dim) pairs.
template <typename F>
cudaError_t by_type(int dtype, int head_dim, F&& f) {
  if (dtype == 1) {
    if (head_dim == 128) return f(cutlass::bfloat16_t{}, Int<128>{});
    if (head_dim == 64) return f(cutlass::bfloat16_t{}, Int<64>{});
  } else {
    if (head_dim == 128) return f(cutlass::half_t{}, Int<128>{});
    if (head_dim == 64) return f(cutlass::half_t{}, Int<64>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace sm90

static_assert(SM90_FWD_BK == 192 && SM90_JVP_BK == 64 && SM90_BQ == sm90::Cfg<cutlass::bfloat16_t, 128, 64, true>::BQ,
              "tile sizes in the header must match the sm90 kernels");

cudaError_t launch_fwd_sm90(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream) {
  return sm90::by_type(dtype, head_dim, [&](auto t, auto d) {
    return sm90::launch<decltype(t), decltype(d)::value, SM90_FWD_BK, false>(p, stream);
  });
}
cudaError_t launch_fwd_jvp_sm90(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream) {
  return sm90::by_type(dtype, head_dim, [&](auto t, auto d) {
    return sm90::launch<decltype(t), decltype(d)::value, SM90_JVP_BK, true>(p, stream);
  });
}
cudaError_t launch_bwd_sm90(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream) {
  static_assert(SM90_BWD_BQ == sm90::BwdCfg<cutlass::bfloat16_t, 128>::BQ &&
                SM90_BWD_BK == sm90::BwdCfg<cutlass::bfloat16_t, 128>::BK, "sm90 backward tiles");
  return sm90::by_type(dtype, head_dim,
                       [&](auto t, auto d) { return sm90::launch_bwd<decltype(t), decltype(d)::value>(p, stream); });
}

}  // namespace mrcm
#endif  // MRCM_WITH_SM90
