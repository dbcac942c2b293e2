// Plain-CUDA interface of the fused masked attention kernels (no torch types, so the .cu file
// compiles and can be checked without the torch headers).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace mrcm {

// Tensors are contiguous [B, S, H, D]; lse / delta are float32 [B, H, Sq].
struct AttnParams {
  const void* q; const void* k; const void* v;
  const void* tq; const void* tk; const void* tv;  // tangents (JVP only; may be null)
  const void* dout;                                 // backward only
  void* o; void* to;                                // outputs
  float* lse; const float* delta;                   // LSE (fwd writes, bwd reads), rowsum(dO*O)
  float* dq_accum; void* dk; void* dv;              // backward outputs (dq in fp32, unscaled sum)
  const int* q_groups; const int* k_groups; const uint8_t* allow; const int8_t* tiles;
  // sm_90a kernels' element mask, Wp words a row, bit i of row g: whether group g may pair with token i of
  // the other side (0 past its end). Forward kernels: rows are query groups, bits keys (allow[g][k_groups[i]]);
  // backward: rows are key groups, bits queries (allow[q_groups[i]][g]).
  const uint32_t* pair_bits; int Wp;
  int B, H, Sq, Sk, G, Tq, Tk;                      // Tq x Tk tile summary for the kernel's tiles
  float scale;
  int cta_order;  // sm_90a forward kernels: 0 = CTA (x, y) takes row x of head y; 1 = longest rows first over all heads
};

// dtype: 0 = fp16, 1 = bf16. Return cudaError_t of the launch.
cudaError_t launch_fwd(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream);
cudaError_t launch_fwd_jvp(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream);
cudaError_t launch_bwd(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream);
// Backward helpers shared by both kernel families: delta [B, H, S] = rowsum(dout * o) in fp32 (o, dout
// contiguous [B, S, H, D]); out = scale * in cast to dtype (n elements, even).
cudaError_t launch_bwd_delta(const void* o, const void* dout, float* delta, int B, int S, int H, int D, int dtype,
                             cudaStream_t stream);
cudaError_t launch_scale_cast(const float* in, void* out, float scale, int64_t n, int dtype, cudaStream_t stream);

// All kernels run 4 warps, one per 16 rows (BQ=128 with 8 warps measured slower).
// Tile sizes the Python side must summarise the mask with.
constexpr int FWD_BQ = 64, FWD_BK = 64;
constexpr int JVP_BQ = 64, JVP_BK = 32;
constexpr int BWD_BQ = 64, BWD_BK = 64;

// Hopper wgmma path (fused_attention_sm90.cu; built when CUTLASS headers are found, defines
// MRCM_WITH_SM90). Two warpgroups own 128 query rows; runs only on sm_90 devices.
constexpr int SM90_BQ = 128, SM90_FWD_BK = 192, SM90_JVP_BK = 64;  // key tiles: RESULTS.md, "Kernel design history"
constexpr int SM90_BWD_BQ = 64, SM90_BWD_BK = 128;  // backward: one CTA per 128 keys, 64-query tiles
cudaError_t launch_fwd_sm90(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream);
cudaError_t launch_fwd_jvp_sm90(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream);
cudaError_t launch_bwd_sm90(const AttnParams& p, int dtype, int head_dim, cudaStream_t stream);

}  // namespace mrcm
