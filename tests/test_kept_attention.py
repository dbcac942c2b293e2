"""Kept attention outputs (train.checkpoint_keep_attention): the reference backward, and checkpointed blocks whose
recompute takes the first run's (O, LSE) instead of running attention again, with the gradients of the plain run."""
import contextlib
import dataclasses
import types

import pytest
import torch

from conftest import rel_err
from megatron_rcm.config.errors import ConfigError
from megatron_rcm.ops import attention as A
from megatron_rcm.ops import kept_attention
from megatron_rcm.ops.attention_reference import attention_reference, attention_reference_backward
from megatron_rcm.ops.masks import GroupMask, block_causal_mask, kv_cache_mask, teacher_forcing_mask
from test_model import _inputs, _model


def _qkv(b=2, sq=37, sk=53, h=3, d=16, dtype=torch.float64):
    return (torch.randn(b, s, h, d, dtype=dtype, requires_grad=True) for s in (sq, sk, sk))


MASKS = {  # name -> ((queries, keys), mask of them)
    "none": ((37, 53), lambda sq, sk: None),
    "block_causal": ((40, 40), lambda sq, sk: block_causal_mask(4, sq // 4, 1)),
    "teacher_forcing": ((40, 40), lambda sq, sk: teacher_forcing_mask(2, sq // 4, 1)),
    "cache": ((20, 60), lambda sq, sk: kv_cache_mask([0, 1], (sk - sq) // 2, 3, sq)),  # a chunk vs two cached ones
    # every third query row sees no key
    "rows_masked": ((30, 45), lambda sq, sk: GroupMask(torch.arange(sq) % 3, torch.zeros(sk, dtype=torch.long),
                                                       torch.tensor([[True, False, False], [True, True, False],
                                                                     [False, False, False]]))),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("block_q", [None, 7])  # one block of rows, and several
def test_reference_backward_equals_autograd(name, block_q):
    (sq, sk), make_mask = MASKS[name]
    q, k, v = _qkv(sq=sq, sk=sk)
    mask = make_mask(sq, sk)
    o, lse = attention_reference(q, k, v, mask, return_lse=True)
    do = torch.randn_like(o)
    want = torch.autograd.grad(o, (q, k, v), do)
    got = attention_reference_backward(q.detach(), k.detach(), v.detach(), o.detach(), do, lse.detach(), mask,
                                       block_q=block_q)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert rel_err(g, w) < 1e-12
    if name == "rows_masked":
        assert got[0][:, 2::3].abs().max() == 0  # rows that see no key: no gradient to their queries


def test_reference_backward_in_bf16_is_within_bf16_rounding():
    q, k, v = (t.detach() for t in _qkv())
    o, lse = attention_reference(q, k, v, return_lse=True)
    do = torch.randn_like(o)
    ref = attention_reference_backward(q, k, v, o, do, lse)
    got = attention_reference_backward(*(t.bfloat16() for t in (q, k, v, o, do)), lse.float())
    for g, w in zip(got, ref):
        assert g.dtype == torch.bfloat16 and rel_err(g.double(), w) < 2e-2


@pytest.fixture
def counted_forwards(monkeypatch):
    """The reference backend's split forward, counting its calls (what the recompute must skip)."""
    calls = []
    ref = A._BACKENDS["reference"]
    counting = dataclasses.replace(ref, forward_lse=lambda *a: calls.append(a[0].shape) or ref.forward_lse(*a))
    monkeypatch.setitem(A._BACKENDS, "reference", counting)
    return calls


def _grads(model, run):
    model.zero_grad(set_to_none=True)
    out = run()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _exit_step(model, x, t, ctx):
    """A self-forcing exit step: one chunk with grad against the cache of two earlier ones (written without grad)."""
    cache = model.new_kv_cache(8, 8)
    with torch.no_grad():
        for c in range(2):
            model.forward_chunk(x[:, :, c:c + 1], t[:, c:c + 1], ctx, cache, c, write_cache=True)
    return lambda: model.forward_chunk(x[:, :, 2:3], t[:, 2:3], ctx, cache, 2)[0]


@pytest.mark.parametrize("reentrant", [False, True])  # saved-tensor hooks, or one recompute node per block
@pytest.mark.parametrize("layout", ["block_causal", "teacher_forcing", "exit_chunk"])
def test_checkpointed_blocks_keep_attention_with_the_gradients_of_the_plain_run(counted_forwards, reentrant,
                                                                                  layout):
    model = _model(chunk=1)
    model.reentrant_recompute = reentrant
    x, t, ctx = _inputs()
    tpf = model.tokens_per_frame(8, 8)
    if layout == "block_causal":
        mask = block_causal_mask(x.shape[2], tpf, 1)
        run = lambda: model(x, t, ctx, mask)  # noqa: E731
    elif layout == "teacher_forcing":
        clean = torch.randn_like(x)
        mask = teacher_forcing_mask(x.shape[2], tpf, 1)
        run = lambda: model.forward_teacher_forcing(clean, x, t, ctx, mask)[0]  # noqa: E731
    else:
        run = _exit_step(model, x, t, ctx)
    plain = _grads(model, run)
    model.gradient_checkpointing = True
    recomputed = _grads(model, run)
    counted_forwards.clear()
    model.keep_attention = True
    kept = _grads(model, run)
    assert len(counted_forwards) == len(model.blocks)  # the first runs only: no recompute ran attention
    assert plain.keys() == kept.keys() == recomputed.keys()
    for name in plain:
        assert rel_err(kept[name], plain[name]) < 1e-10, name
        assert rel_err(kept[name], recomputed[name]) < 1e-10, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_kept_outputs_are_let_go_once_handed_over(counted_forwards, reentrant):
    """The recompute's saved tensors hold a kept pair from the hand-over on; the stash does not (torch's reentrant
    checkpoint keeps its recompute closure, and with it the stash, until the whole graph is released)."""
    import weakref

    model = _model()
    model.gradient_checkpointing = model.keep_attention = True
    model.reentrant_recompute = reentrant
    x, t, ctx = _inputs()
    mask = block_causal_mask(x.shape[2], model.tokens_per_frame(8, 8), 1)
    kept = []
    record = kept_attention.AttentionStash.record

    def watched(stash, o, lse):
        record(stash, o, lse)
        kept.append(weakref.ref(stash.kept[-1][0]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kept_attention.AttentionStash, "record", watched)
        out = model(x, t, ctx, mask)
    assert len(kept) == len(model.blocks) and all(r() is not None for r in kept)
    out.square().mean().backward()
    assert all(r() is None for r in kept)  # freed while the graph is still referenced
    assert len(counted_forwards) == len(model.blocks)


def test_a_second_backward_through_a_retained_graph_recomputes_attention(counted_forwards):
    model = _model()
    model.gradient_checkpointing = model.keep_attention = True
    x, t, ctx = _inputs()
    mask = block_causal_mask(x.shape[2], model.tokens_per_frame(8, 8), 1)
    loss = model(x, t, ctx, mask).square().mean()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(counted_forwards) == len(model.blocks)  # the first backward replayed the kept outputs
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert len(counted_forwards) == 2 * len(model.blocks)  # handed over already: the second one recomputed them
    for n, p in model.named_parameters():
        assert rel_err(p.grad, first[n]) < 1e-12, n


def test_stash_refuses_a_recompute_that_differs_from_the_first_run():
    stash = kept_attention.AttentionStash()
    o, lse = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4)
    stash.record(o, lse)
    stash.runs = 1
    with pytest.raises(RuntimeError, match=r"makes \(1, 5, 2, 8\).*checkpoint_keep_attention=false"):
        stash.take(torch.Size([1, 5, 2, 8]), o.dtype)
    got = stash.take(o.shape, o.dtype)
    assert got[0] is not o and got[0].data_ptr() == o.data_ptr()  # a detached alias of the first run's output
    stash.position = 0
    assert stash.take(o.shape, o.dtype) is None  # handed over once
    with pytest.raises(RuntimeError, match="more attention calls"):
        stash.take(o.shape, o.dtype)


def test_keep_without_a_split_backend_or_outside_a_checkpoint_changes_nothing():
    q, k, v = (t.detach() for t in _qkv(dtype=torch.float32))
    assert kept_attention.active() is None
    torch.testing.assert_close(A.attention(q, k, v, backend="sdpa", keep=True), A.attention(q, k, v, backend="sdpa"))
    run = kept_attention.keeping(lambda: A.attention(q, k, v, backend="sdpa", keep=True))
    torch.testing.assert_close(run(), A.attention(q, k, v, backend="sdpa"))  # sdpa: no split forward, nothing kept


@pytest.mark.parametrize("reentrant", [False, True])
def test_training_cudnn_route_keeps_one_backend_per_block_in_both_recompute_modes(reentrant, monkeypatch):
    """MEGATRON_RCM_TRAINING_SDPA=cudnn (ops/attention._cudnn_training) on a checkpointed exit chunk, with cuDNN
    stood in for by the reference formulas with an LSE of another convention (log2 units, a trailing unit dim, as
    cuDNN's is its own). A block's first run and its recompute must take the same backend: torch's reentrant
    checkpoint runs the first one under no_grad, and a backward handed another kernel's LSE would fail or be wrong."""
    log2e = 1.4426950408889634
    calls = {"forward": 0, "backward": 0}

    def forward_lse(q, k, v, mask, scale):
        calls["forward"] += 1
        o, lse = attention_reference(q, k, v, mask=mask, scale=scale, return_lse=True)
        return o, (lse * log2e).unsqueeze(-1)

    def backward(q, k, v, o, do, lse, mask, scale):
        calls["backward"] += 1
        assert lse.shape == q.shape[:1] + q.shape[2:3] + q.shape[1:2] + (1,), "an LSE this backend did not make"
        return attention_reference_backward(q, k, v, o, do, lse.squeeze(-1) / log2e, mask=mask, scale=scale)

    monkeypatch.setattr(A, "TRAINING_SDPA", "cudnn")
    monkeypatch.setattr(A, "_cudnn_applies", lambda path, q, k, mask: mask is None or mask.is_full())
    monkeypatch.setattr(A, "cudnn_forward_lse", forward_lse)
    monkeypatch.setattr(A, "cudnn_backward", backward)
    model = _model(chunk=1)
    model.causal.attention_backend = "auto"
    model.reentrant_recompute = reentrant
    run = _exit_step(model, *_inputs())
    plain = _grads(model, run)
    layers = len(model.blocks)
    assert calls == {"forward": 2 * layers, "backward": 2 * layers}  # self- and cross-attention of each block
    model.gradient_checkpointing = model.keep_attention = True
    calls.update(forward=0, backward=0)
    kept = _grads(model, run)
    # the first run's self- and cross-attention, the recompute's cross-attention (self-attention kept); the
    # reentrant first run's cross-attention is not recorded (no_grad) and takes the inference path
    assert calls == {"forward": (2 if reentrant else 3) * layers, "backward": 2 * layers}
    for name in plain:
        assert rel_err(kept[name], plain[name]) < 1e-10, name


def test_training_cudnn_route_falls_back_only_where_cudnn_declines(monkeypatch):
    """A shape cuDNN declines goes to the other kernels from then on; any other error (here the stash's own) is
    raised, not taken for a declined shape."""
    monkeypatch.setattr(A, "TRAINING_SDPA", "cudnn")
    monkeypatch.setattr(A, "_cudnn_refused", set())
    monkeypatch.setattr(A, "_cudnn_applies", lambda path, q, k, mask: A._cudnn_key(path, q, k) not in A._cudnn_refused)

    def declines(*a):
        raise A.CudnnDeclined("no kernel")

    monkeypatch.setattr(A, "cudnn_forward_lse", declines)
    q, k, v = _qkv()
    o = A.attention(q, k, v, backend="auto")
    assert A._cudnn_key("split", q, k) in A._cudnn_refused
    assert rel_err(o, attention_reference(q, k, v)) < 1e-12
    monkeypatch.setattr(A, "_cudnn_refused", set())
    monkeypatch.setattr(A, "cudnn_forward_lse", A._BACKENDS["reference"].forward_lse)
    runs = []

    def block():  # attends only in its second run: a recompute unlike the first, which the stash refuses
        runs.append(1)
        return A.attention(q, k, v, backend="auto", keep=True) if len(runs) == 2 else None

    run = kept_attention.keeping(block)
    run()
    with pytest.raises(RuntimeError, match="more attention calls"):
        run()
    assert not A._cudnn_refused


def test_inference_route_sends_only_short_calls_to_cudnn(monkeypatch):
    """Unrecorded full-mask forwards go to cuDNN unless they have at least INFERENCE_FUSED_FROM = (queries, keys)
    (the warp-specialised fused forward is the faster one there); both routes give the same values."""
    calls, inside = [], []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    @contextlib.contextmanager
    def backend_only(backend):  # the route's sdpa_kernel(CUDNN_ATTENTION): marks the calls made inside it
        inside.append(backend)
        yield
        inside.pop()

    def sdpa(q, k, v, **kwargs):  # cuDNN's SDPA stood in for by torch's on the CPU; counted only inside the route
        if inside == [A.SDPBackend.CUDNN_ATTENTION]:
            calls.append((q.shape[2], k.shape[2]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(A, "_cudnn_applies", lambda path, q, k, mask: mask is None or mask.is_full())
    monkeypatch.setattr(A, "sdpa_kernel", backend_only)
    monkeypatch.setattr(A, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    monkeypatch.setattr(A, "INFERENCE_FUSED_FROM", (30, 40))
    with torch.no_grad():
        for sq, sk in ((37, 39), (37, 40), (37, 53), (29, 53)):
            q, k, v = _qkv(sq=sq, sk=sk)
            o = A.attention(q, k, v, backend="auto")
            assert rel_err(o, attention_reference(q, k, v)) < 1e-12
    assert calls == [(37, 39), (29, 53)]  # too few keys, too few queries; (37, 40) and (37, 53) take the other path
    q, k, v = _qkv(sq=37, sk=20)
    A.attention(q, k, v, backend="auto")  # recorded by autograd: never the inference route
    assert len(calls) == 2


def test_inference_fused_from_is_two_integers():
    assert A._parse_fused_from("4096,12288") == (4096, 12288)
    for bad in ("4096", "4096,12288,1", "a,b", ""):
        with pytest.raises(ConfigError, match="MEGATRON_RCM_INFERENCE_FUSED_FROM"):
            A._parse_fused_from(bad)
