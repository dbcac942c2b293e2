// torch bindings for the fused masked attention kernels (shape checks, allocation, launch).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <optional>
#include "fused_attention_kernels.cuh"

namespace {

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "fused attention supports fp16/bf16 only, got ", t.scalar_type());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "fused attention needs CUDA tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "expected [B, S, H, D]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "expected contiguous tensors");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "q/k/v shape mismatch");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "head dim must be 64 or 128");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtype mismatch");
}

mrcm::AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qg, const at::Tensor& kg,
                             const at::Tensor& allow, const at::Tensor& tiles, int64_t G, double scale) {
  TORCH_CHECK(qg.scalar_type() == at::kInt && kg.scalar_type() == at::kInt, "groups must be int32");
  TORCH_CHECK(allow.scalar_type() == at::kByte && tiles.scalar_type() == at::kChar, "allow uint8, tiles int8");
  TORCH_CHECK(qg.numel() == q.size(1) && kg.numel() == k.size(1), "group ids do not match sequence lengths");
  TORCH_CHECK(allow.numel() == G * G && tiles.dim() == 2, "bad allow / tile summary");
  TORCH_CHECK(qg.is_cuda() && kg.is_cuda() && allow.is_cuda() && tiles.is_cuda(), "mask tensors must be on CUDA");
  mrcm::AttnParams p{};
  p.B = q.size(0); p.Sq = q.size(1); p.H = q.size(2); p.Sk = k.size(1);
  p.G = G; p.Tq = tiles.size(0); p.Tk = tiles.size(1); p.scale = scale;
  p.q_groups = qg.data_ptr<int>(); p.k_groups = kg.data_ptr<int>();
  p.allow = allow.data_ptr<uint8_t>(); p.tiles = tiles.data_ptr<int8_t>();
  return p;
}

#if defined(MRCM_WITH_SM90)
constexpr bool kHasSm90 = true;
#else
constexpr bool kHasSm90 = false;
#endif

// The Hopper kernels run only when built (CUTLASS found) and on a compute capability 9.0 device.
void check_sm90(const at::Tensor& q) {
  TORCH_CHECK(kHasSm90, "this build has no sm_90a kernels (CUTLASS headers were not found at build time)");
  const auto* prop = at::cuda::getDeviceProperties(q.get_device());
  TORCH_CHECK(prop->major == 9 && prop->minor == 0, "the sm_90a kernels need a compute capability 9.0 GPU");
}

void check_tiles(const mrcm::AttnParams& p, int bq, int bk, const char* which) {
  TORCH_CHECK(p.Tq == (p.Sq + bq - 1) / bq && p.Tk == (p.Sk + bk - 1) / bk, "tile summary not made for the ", which,
              " tile sizes (", bq, ", ", bk, ")");
}

// The sm_90a kernels' element mask (AttnParams::pair_bits): G rows of `tokens` bits of the other side, padded to
// the kernel's tiles; an even word count, so the kernels read them in pairs.
void set_pair_bits(mrcm::AttnParams& p, const at::Tensor& bits, int64_t tokens) {
  const int64_t words = tokens / 32;
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.is_cuda() && bits.is_contiguous() && bits.numel() == p.G * words &&
                  tokens % 64 == 0 && reinterpret_cast<uintptr_t>(bits.data_ptr()) % 8 == 0,
              "pair bits must be contiguous int32 [G * ", words, "] on CUDA (8-byte aligned), got ", bits.numel());
  p.pair_bits = reinterpret_cast<const uint32_t*>(bits.data_ptr<int>());
  p.Wp = static_cast<int>(words);
}

int check_order(int64_t order) {
  TORCH_CHECK(order == 0 || order == 1, "cta_order must be 0 (launch order) or 1 (longest rows first), got ", order);
  return static_cast<int>(order);
}

void check_err(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "fused attention launch failed: ", cudaGetErrorString(e)); }

std::vector<at::Tensor> fwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor qg, at::Tensor kg, at::Tensor allow,
                            at::Tensor tiles, at::Tensor key_bits, int64_t G, double scale, bool sm90,
                            int64_t cta_order) {
  check_qkv(q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, qg, kg, allow, tiles, G, scale);
  if (sm90) check_sm90(q);
  check_tiles(p, sm90 ? mrcm::SM90_BQ : mrcm::FWD_BQ, sm90 ? mrcm::SM90_FWD_BK : mrcm::FWD_BK, "forward");
  auto o = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.o = o.data_ptr(); p.lse = lse.data_ptr<float>();
  p.cta_order = check_order(cta_order);
#if defined(MRCM_WITH_SM90)
  if (sm90) {
    set_pair_bits(p, key_bits, static_cast<int64_t>(p.Tk) * mrcm::SM90_FWD_BK);
    check_err(mrcm::launch_fwd_sm90(p, dtype_code(q), q.size(3), at::cuda::getCurrentCUDAStream()));
    return {o, lse};
  }
#endif
  check_err(mrcm::launch_fwd(p, dtype_code(q), q.size(3), at::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

std::vector<at::Tensor> fwd_jvp(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> tq,
                                std::optional<at::Tensor> tk, std::optional<at::Tensor> tv, at::Tensor qg,
                                at::Tensor kg, at::Tensor allow, at::Tensor tiles, at::Tensor key_bits, int64_t G,
                                double scale, bool sm90, int64_t cta_order) {
  check_qkv(q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, qg, kg, allow, tiles, G, scale);
  if (sm90) check_sm90(q);
  check_tiles(p, sm90 ? mrcm::SM90_BQ : mrcm::JVP_BQ, sm90 ? mrcm::SM90_JVP_BK : mrcm::JVP_BK, "JVP");
  auto chk = [&](const std::optional<at::Tensor>& t, const at::Tensor& like) -> const void* {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->sizes() == like.sizes() && t->scalar_type() == like.scalar_type() && t->is_contiguous(),
                "tangent must match its primal (shape, dtype, contiguous)");
    return t->data_ptr();
  };
  auto o = at::empty_like(q);
  auto to = at::empty_like(q);
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.tq = chk(tq, q); p.tk = chk(tk, k); p.tv = chk(tv, v);
  p.o = o.data_ptr(); p.to = to.data_ptr();
  p.cta_order = check_order(cta_order);
#if defined(MRCM_WITH_SM90)
  if (sm90) {  // the wgmma kernel takes all three tangents: a missing one is passed as zeros
    at::Tensor zero;
    if (!p.tq || !p.tk || !p.tv) zero = at::zeros_like(k.numel() >= q.numel() ? k : q);
    if (!p.tq) p.tq = zero.data_ptr();
    if (!p.tk) p.tk = zero.data_ptr();
    if (!p.tv) p.tv = zero.data_ptr();
    set_pair_bits(p, key_bits, static_cast<int64_t>(p.Tk) * mrcm::SM90_JVP_BK);
    check_err(mrcm::launch_fwd_jvp_sm90(p, dtype_code(q), q.size(3), at::cuda::getCurrentCUDAStream()));
    return {o, to};
  }
#endif
  check_err(mrcm::launch_fwd_jvp(p, dtype_code(q), q.size(3), at::cuda::getCurrentCUDAStream()));
  return {o, to};
}

std::vector<at::Tensor> bwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor o, at::Tensor dout, at::Tensor lse,
                            at::Tensor qg, at::Tensor kg, at::Tensor allow, at::Tensor tiles, at::Tensor query_bits,
                            int64_t G, double scale, bool sm90) {
  check_qkv(q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.is_contiguous() && dout.scalar_type() == q.scalar_type(), "bad dO");
  TORCH_CHECK(o.sizes() == q.sizes() && o.is_contiguous() && o.scalar_type() == q.scalar_type(), "bad O");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(o.data_ptr()) % 4 == 0 && reinterpret_cast<uintptr_t>(dout.data_ptr()) % 4 == 0,
              "O and dO must be 4-byte aligned (clone a view that starts at an odd element)");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == q.size(0) * q.size(2) * q.size(1),
              "lse must be contiguous float32 [B, H, Sq]");
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto delta = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  check_err(mrcm::launch_bwd_delta(o.data_ptr(), dout.data_ptr(), delta.data_ptr<float>(), q.size(0), q.size(1),
                                   q.size(2), q.size(3), dtype_code(q), stream));
  auto p = make_params(q, k, qg, kg, allow, tiles, G, scale);
  if (sm90) check_sm90(q);
  check_tiles(p, sm90 ? mrcm::SM90_BWD_BQ : mrcm::BWD_BQ, sm90 ? mrcm::SM90_BWD_BK : mrcm::BWD_BK, "backward");
  auto dq = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>(); p.delta = delta.data_ptr<float>();
  p.dq_accum = dq.data_ptr<float>(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
#if defined(MRCM_WITH_SM90)
  if (sm90) {
    set_pair_bits(p, query_bits, static_cast<int64_t>(p.Tq) * mrcm::SM90_BWD_BQ);
    check_err(mrcm::launch_bwd_sm90(p, dtype_code(q), q.size(3), stream));
  } else
#endif
    check_err(mrcm::launch_bwd(p, dtype_code(q), q.size(3), stream));
  auto dq_out = at::empty_like(q);
  check_err(mrcm::launch_scale_cast(dq.data_ptr<float>(), dq_out.data_ptr(), float(scale), dq.numel(), dtype_code(q),
                                    stream));
  return {dq_out, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "masked attention forward -> (O, LSE)");
  m.def("fwd_jvp", &fwd_jvp, "masked attention forward + JVP -> (O, dO)");
  m.def("bwd", &bwd, "masked attention backward from (q, k, v, O, dO, LSE) -> (dQ, dK, dV)");
  m.attr("HAS_SM90") = kHasSm90;
}
