"""Reference attention: forward vs a naive softmax, explicit JVP vs torch.func.jvp and finite differences."""
import pytest
import torch

from conftest import rel_err
from megatron_rcm.ops.attention import attention, attention_jvp, resolve_backend
from megatron_rcm.ops.attention_reference import attention_reference, attention_reference_jvp
from megatron_rcm.ops.masks import block_causal_mask, full_mask, kv_cache_mask, teacher_forcing_mask

MASKS = {
    "none": lambda: None,
    "full": lambda: full_mask(24),
    "frame": lambda: block_causal_mask(6, 4, 1),
    "chunk": lambda: block_causal_mask(6, 4, 2),
    "tf": lambda: teacher_forcing_mask(3, 4, 1),
}


def _qkv(sq=24, sk=24, b=2, h=3, d=8, dtype=torch.float64):
    return [torch.randn(b, s, h, d, dtype=dtype) for s in (sq, sk, sk)]


def _naive(q, k, v, dense):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if dense is not None:
        s = s.masked_fill(~dense, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("name", MASKS)
def test_forward_matches_naive_softmax(name):
    mask = MASKS[name]()
    q, k, v = _qkv()
    ref = _naive(q, k, v, None if mask is None else mask.dense())
    assert rel_err(attention_reference(q, k, v, mask), ref) < 1e-13
    assert rel_err(attention_reference(q, k, v, mask, block_q=5), ref) < 1e-13  # ragged query blocks


@pytest.mark.parametrize("name", MASKS)
def test_explicit_jvp_matches_torch_func_jvp(name):
    mask = MASKS[name]()
    q, k, v = _qkv()
    tq, tk, tv = _qkv()
    o, to = attention_reference_jvp(q, k, v, tq, tk, tv, mask, block_q=7)
    ro, rto = torch.func.jvp(lambda a, b, c: attention_reference(a, b, c, mask), (q, k, v), (tq, tk, tv))
    assert rel_err(o, ro) < 1e-13
    assert rel_err(to, rto) < 1e-10


def test_jvp_with_missing_tangents_treats_them_as_zero():
    mask = teacher_forcing_mask(3, 4, 1)
    q, k, v = _qkv()
    tq, _, _ = _qkv()
    _, to = attention_reference_jvp(q, k, v, tq, None, None, mask)
    z = torch.zeros_like(q)
    _, rto = torch.func.jvp(lambda a, b, c: attention_reference(a, b, c, mask), (q, k, v), (tq, z, z))
    assert rel_err(to, rto) < 1e-10


def test_jvp_matches_central_finite_differences():
    mask = block_causal_mask(6, 4, 2)
    q, k, v = _qkv()
    tq, tk, tv = _qkv()
    eps = 1e-6
    plus = attention_reference(q + eps * tq, k + eps * tk, v + eps * tv, mask)
    minus = attention_reference(q - eps * tq, k - eps * tk, v - eps * tv, mask)
    _, to = attention_reference_jvp(q, k, v, tq, tk, tv, mask)
    assert rel_err(to, (plus - minus) / (2 * eps)) < 1e-7


def test_backward_gradcheck():
    mask = teacher_forcing_mask(2, 3, 1)
    q, k, v = [t.requires_grad_() for t in _qkv(sq=12, sk=12, b=1, h=2, d=4)]
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, mask, block_q=5), (q, k, v))


def test_kv_cache_shapes_and_lse():
    mask = kv_cache_mask([0, 1], 4, 2)
    q, k, v = _qkv(sq=4, sk=12)
    o, lse = attention_reference(q, k, v, mask, return_lse=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-13
    assert o.shape == q.shape


def test_fully_masked_rows_give_zero():
    from megatron_rcm.ops.masks import GroupMask
    mask = GroupMask(torch.tensor([0, 1, 1]), torch.tensor([0, 0]), torch.tensor([[True, False], [False, False]]))
    q, k, v = _qkv(sq=3, sk=2)
    o = attention_reference(q, k, v, mask)
    assert torch.isfinite(o).all() and o[:, 1:].abs().max() == 0
    _, to = attention_reference_jvp(q, k, v, *_qkv(sq=3, sk=2), mask)
    assert torch.isfinite(to).all() and to[:, 1:].abs().max() == 0


def test_dispatch_on_cpu_uses_reference_and_rejects_unknown_backend():
    q, k, v = _qkv()
    assert resolve_backend("auto", q).name == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, backend="nope")
    mask = block_causal_mask(6, 4, 2)
    assert rel_err(attention(q, k, v, mask, backend="sdpa"), attention_reference(q, k, v, mask)) < 1e-12
    o, to = attention_jvp(q, k, v, None, None, None, mask)
    assert to is None and rel_err(o, attention_reference(q, k, v, mask)) < 1e-13


def _contract_check(name, device="cpu", dtype=torch.float64, atol=1e-10):
    """The JVP rule of ops/attention.py for backend ``name``: equal outputs under no_grad, and with autograd
    recording either gradients equal to the reference's (through the JVP formulas) or a clear refusal."""
    from megatron_rcm.ops.attention import _BACKENDS

    mask = block_causal_mask(6, 4, 2)
    q, k, v, tq, tk, tv = (t.to(device) for t in _qkv(dtype=dtype) + _qkv(dtype=dtype))
    with torch.no_grad():
        ref = attention_reference_jvp(q, k, v, tq, tk, tv, mask)
        got = attention_jvp(q, k, v, tq, tk, tv, mask, backend=name)
    assert not got[0].requires_grad and not got[1].requires_grad
    assert rel_err(got[0], ref[0]) < atol and rel_err(got[1], ref[1]) < atol
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, tq, tk, tv)]
    w = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    if not _BACKENDS[name].jvp_differentiable:
        with pytest.raises(RuntimeError, match="torch.no_grad"):
            attention_jvp(*leaves, mask, backend=name)
        return
    o, to = attention_jvp(*leaves, mask, backend=name)
    grads = torch.autograd.grad((o * w[0]).sum() + (to * w[1]).sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ro, rto = attention_reference_jvp(*ref_leaves, mask)
    ref_grads = torch.autograd.grad((ro * w[0]).sum() + (rto * w[1]).sum(), ref_leaves)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < atol


@pytest.mark.parametrize("name", ["reference", "sdpa"])
def test_every_cpu_backend_follows_the_jvp_rule(name):
    _contract_check(name)


def test_a_backend_without_a_differentiable_jvp_is_refused_while_autograd_records():
    from megatron_rcm.ops.attention import _BACKENDS, AttentionBackend, register_backend

    def detached_jvp(*args):
        with torch.no_grad():
            return attention_reference_jvp(*args[:7], scale=args[7])

    register_backend(AttentionBackend("detached_test", _BACKENDS["reference"].forward, detached_jvp,
                                      lambda t: True, jvp_differentiable=False))
    try:
        _contract_check("detached_test")
    finally:
        del _BACKENDS["detached_test"]
