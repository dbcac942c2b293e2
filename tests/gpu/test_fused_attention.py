"""GPU checks of the fused attention kernels against the float64 reference (forward, JVP, backward)."""
import math
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    os.environ.setdefault("MEGATRON_RCM_JIT_BUILD", "1")

from megatron_rcm.ops import masks as M  # noqa: E402
from megatron_rcm.ops.attention_reference import attention_reference, attention_reference_jvp  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _fa():
    from megatron_rcm.ops import fused_attention as fa
    if fa._C is None:
        pytest.fail("fused attention extension neither built nor JIT-buildable on this GPU machine")
    return fa


@pytest.fixture(params=["mma_sync", "sm90"])
def kernel_path(request, monkeypatch):
    """Run a test on both the mma.sync kernels and (on a 9.0 GPU, when built) the wgmma kernels."""
    fa = _fa()
    if request.param == "sm90":
        _require_sm90(fa, monkeypatch)
    else:
        monkeypatch.setenv(fa.SM90_ENV, "0")
    assert fa.use_sm90(torch.empty(1, device="cuda")) == (request.param == "sm90")
    return request.param


def _require_sm90(fa, monkeypatch):
    """Route calls to the sm_90a kernels, or skip where they cannot run."""
    if not (getattr(fa._C, "HAS_SM90", False) and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the sm_90a kernels need a compute capability 9.0 GPU and a build that found CUTLASS")
    monkeypatch.setenv(fa.SM90_ENV, "1")


def poison(like, n=4):
    """Fill a cached allocation with NaN and free it, so the kernel's outputs reuse NaN memory."""
    junk = torch.full((like.numel() * n,), float("nan"), device="cuda", dtype=like.dtype)
    del junk


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten or NaN)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


MASKS = {
    "full": lambda: (M.full_mask(200), 200),
    "full_sq_ne_sk": lambda: (M.full_mask(77, 301), None),
    "frame_causal_1560": lambda: (M.block_causal_mask(3, 1560, 1), 4680),
    "chunk_causal": lambda: (M.block_causal_mask(6, 97, 2), 582),
    "teacher_forcing": lambda: (M.teacher_forcing_mask(4, 130, 1), 1040),
    # rows skip 24 (forward tiles) to 48 (JVP tiles) key tiles between live ones: the 16-tiles-per-load walk
    "teacher_forcing_long_skips": lambda: (M.teacher_forcing_mask(8, 390, 1), 6240),
    "window_sink": lambda: (M.block_causal_mask(8, 70, 1, M.ChunkVisibility(window=2, sink=1)), 560),
    "kv_cache": lambda: (M.kv_cache_mask([0, 2, 3], 150, 4, visibility=M.ChunkVisibility(window=2, sink=1)), None),
}


def make(mask, dtype, d, heads=3, batch=2, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sq, sk = mask.shape
    def r(s):
        return torch.randn(batch, s, heads, d, device="cuda", generator=g).to(dtype)
    return r(sq), r(sk), r(sk)


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_forward_and_lse(name, dtype, d, kernel_path):
    fa = _fa()
    mask, _ = MASKS[name]()
    q, k, v = make(mask, dtype, d)
    poison(q)
    o, lse = fa.fused_forward_lse(q, k, v, mask)
    ro, rlse = attention_reference(q.double(), k.double(), v.double(), mask.to("cuda"), return_lse=True)
    assert rel(o, ro) < TOL[dtype]
    fin = torch.isfinite(rlse)
    assert torch.equal(fin, torch.isfinite(lse))
    if fin.any():
        assert (lse[fin].double() - rlse[fin]).abs().max().item() < 2e-2


def test_fully_masked_rows_give_zero(kernel_path):
    fa = _fa()
    # queries of group 1 see nothing
    qg = torch.tensor([0] * 70 + [1] * 70, dtype=torch.int32)
    kg = torch.zeros(90, dtype=torch.int32)
    mask = M.GroupMask(qg, kg, torch.tensor([[True, False], [False, False]]))
    q, k, v = make(mask, torch.bfloat16, 64)
    o, lse = fa.fused_forward_lse(q, k, v, mask)
    assert torch.isfinite(o).all() and o[:, 70:].abs().max().item() == 0
    assert torch.isinf(lse[:, :, 70:]).all()
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    fa.fused_forward(q, k, v, mask).float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[:, 70:].abs().max().item() == 0


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_jvp(name, dtype, d, kernel_path):
    fa = _fa()
    mask, _ = MASKS[name]()
    q, k, v = make(mask, dtype, d, seed=1)
    tq, tk, tv = make(mask, dtype, d, seed=2)
    poison(q, 8)
    o, to = fa.fused_forward_jvp(q, k, v, tq, tk, tv, mask)
    ro, rto = attention_reference_jvp(*(t.double() for t in (q, k, v, tq, tk, tv)), mask=mask.to("cuda"))
    assert rel(o, ro) < TOL[dtype]
    assert rel(to, rto) < 2 * TOL[dtype]


@pytest.mark.parametrize("which", ["q", "k", "v", "qk", "none_kv"])
def test_jvp_partial_tangents(which, kernel_path):
    fa = _fa()
    mask = M.teacher_forcing_mask(3, 101, 1)
    q, k, v = make(mask, torch.bfloat16, 128, seed=3)
    t = make(mask, torch.bfloat16, 128, seed=4)
    sel = {"q": (1, 0, 0), "k": (0, 1, 0), "v": (0, 0, 1), "qk": (1, 1, 0), "none_kv": (1, 0, 0)}[which]
    tq, tk, tv = (x if s else None for x, s in zip(t, sel))
    _, to = fa.fused_forward_jvp(q, k, v, tq, tk, tv, mask)
    d = lambda x: None if x is None else x.double()
    _, rto = attention_reference_jvp(q.double(), k.double(), v.double(), d(tq), d(tk), d(tv), mask=mask.to("cuda"))
    assert rel(to, rto) < 4e-2


@pytest.mark.parametrize("d", [64, 128])
def test_longest_rows_first_walk_gives_identical_results(d, monkeypatch):
    """The sm_90a forward kernels' longest-rows-first walk (an option of those kernels only) just reorders
    CTAs: outputs are bit-identical, and both walks cover every (row, head) (poisoned outputs)."""
    fa = _fa()
    _require_sm90(fa, monkeypatch)
    mask = M.block_causal_mask(5, 300, 1)
    q, k, v = make(mask, torch.bfloat16, d, seed=5)
    tangents = make(mask, torch.bfloat16, d, seed=6)
    outs = []
    for waves, order in ((10**6, 1), (0, 0)):
        monkeypatch.setattr(fa, "LONGEST_FIRST_MAX_WAVES", waves)
        assert fa.cta_order(True, 1000, 132) == order
        poison(q, 8)
        outs.append((*fa.fused_forward_lse(q, k, v, mask), *fa.fused_forward_jvp(q, k, v, *tangents, mask)))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all(), "unwritten (poisoned) output"
        assert torch.equal(a, b)


def test_jvp_vs_finite_differences(kernel_path):
    fa = _fa()
    mask = M.block_causal_mask(3, 150, 1)
    q, k, v = make(mask, torch.float16, 64, heads=2, batch=1, seed=5)
    tq, tk, tv = make(mask, torch.float16, 64, heads=2, batch=1, seed=6)
    _, to = fa.fused_forward_jvp(q, k, v, tq, tk, tv, mask)
    eps = 1e-4
    X = [x.double() for x in (q, k, v)]
    T = [x.double() for x in (tq, tk, tv)]
    mc = mask.to("cuda")
    plus = attention_reference(*(x + eps * t for x, t in zip(X, T)), mask=mc)
    minus = attention_reference(*(x - eps * t for x, t in zip(X, T)), mask=mc)
    assert rel(to, (plus - minus) / (2 * eps)) < 1e-2


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_backward(name, dtype, d, kernel_path):
    fa = _fa()
    mask, _ = MASKS[name]()
    q, k, v = make(mask, dtype, d, seed=7)
    do = make(mask, dtype, d, seed=8)[0]
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    poison(q, 8)
    fa.fused_forward(qs, ks, vs, mask).backward(do)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    attention_reference(qd, kd, vd, mask=mask.to("cuda")).backward(do.double())
    tol = 2 * TOL[dtype]
    for got, ref in ((qs.grad, qd.grad), (ks.grad, kd.grad), (vs.grad, vd.grad)):
        assert rel(got, ref) < tol


def test_backend_dispatch():
    fa = _fa()
    from megatron_rcm.ops.attention import attention, resolve_backend
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q).name == "fused"
    assert resolve_backend("auto", q.float()).name == "sdpa"
    o = attention(q, q, q, backend="fused")
    assert rel(o, attention_reference(q.double(), q.double(), q.double())) < 2e-2


def test_fused_backend_follows_the_jvp_rule():
    """ops/attention.py's rule: the fused JVP builds no graph, so it runs under no_grad (equal to the reference)
    and is refused, naming the fix, while autograd records; the reference/SDPA backends differentiate."""
    _fa()
    from megatron_rcm.ops.attention import attention_jvp

    mask, _ = MASKS["chunk_causal"]()
    q, k, v = make(mask, torch.bfloat16, 64)
    tq, tk, tv = make(mask, torch.bfloat16, 64, seed=1)
    with torch.no_grad():
        o, to = attention_jvp(q, k, v, tq, tk, tv, mask, backend="fused")
    ro, rto = attention_reference_jvp(*(t.double() for t in (q, k, v, tq, tk, tv)), mask)
    assert rel(o, ro) < TOL[torch.bfloat16] and rel(to, rto) < 2 * TOL[torch.bfloat16]
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        attention_jvp(q.requires_grad_(True), k, v, tq, tk, tv, mask, backend="fused")
    o, to = attention_jvp(q.float(), k.float(), v.float(), tq.float(), tk.float(), tv.float(), mask, backend="sdpa")
    assert o.requires_grad and to.requires_grad
