// Max and sum over the four lanes of an mma quad: the threads that hold one row of an accumulator
// fragment (mma.sync m16n8 and wgmma alike), for the online softmax of both kernel families.
#pragma once

namespace mrcm {

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace mrcm
