"""Wan2.1 building blocks with an optional tangent riding along (see ``ops/dual.py``).

Parameter names and shapes mirror diffusers' ``WanTransformer3DModel`` exactly (``attn1.to_q``,
``attn1.norm_q``, ``ffn.net.0.proj``, ``scale_shift_table`` ...), so a state dict converts by name.
Every ``forward`` takes ``(x, tx)`` and returns ``(y, ty)``; ``tx=None`` is the plain forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops import dual
from ..ops.attention import attention_jvp
from ..ops.fusion import enabled as fusion_enabled
from ..ops.fusion import fusable
from ..ops.masks import GroupMask
from .rope import apply_rope


@dataclass
class AttentionContext:
    """What self-attention needs besides its input: positions, mask, cache, backend."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor  # signed: (-sin, sin) per pair (models/rope.rope_tables)
    mask: GroupMask | None
    backend: str = "auto"
    cache: object | None = None  # KVCache
    cache_chunk: int | None = None  # chunk index being appended when writing the cache
    write_cache: bool = False
    sink_rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # rope_policy='rebase': (cos, sin) of the shift


class Attention(nn.Module):
    """Self- or cross-attention of a Wan block, with q/k RMSNorm across heads.

    ``parallel`` (set by :func:`megatron_rcm.parallel.parallelize_model`, default None = single
    process) supplies the tensor-/context-parallel collectives; see ``megatron_rcm/parallel/model.py``.
    """

    parallel = None

    def __init__(self, dim: int, heads: int, eps: float, added_kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_dim is not None:  # the I2V layout's cross-attention: K/V of the image context too
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _heads(self, x):
        return None if x is None else x.unflatten(-1, (self.heads, -1))

    def project_kv(self, src, tsrc):
        k, tk = dual.linear(src, tsrc, self.to_k.weight, self.to_k.bias)
        k, tk = dual.rms_norm(k, tk, self.norm_k.weight, self.eps, reduce=self._norm_reduce())
        v, tv = dual.linear(src, tsrc, self.to_v.weight, self.to_v.bias)
        return self._heads(k), self._heads(tk), self._heads(v), self._heads(tv)

    def _norm_reduce(self):
        return None if self.parallel is None else self.parallel.norm_reduce

    def _out(self, o, to):
        o, to = o.flatten(-2), None if to is None else to.flatten(-2)
        if self.parallel is not None:  # row-parallel: partial sums all-reduced, bias added once
            return self.parallel.row_linear(o, to, self.to_out[0].weight, self.to_out[0].bias)
        return dual.linear(o, to, self.to_out[0].weight, self.to_out[0].bias)

    def _in(self, x, tx):
        """Column-parallel input: identity forward, gradient all-reduced over TP in backward."""
        return (x, tx) if self.parallel is None else self.parallel.column_input(x, tx)

    def self_attention(self, x, tx, ctx: AttentionContext, layer: int):
        x, tx = self._in(x, tx)
        q, tq = dual.linear(x, tx, self.to_q.weight, self.to_q.bias)
        q, tq = dual.rms_norm(q, tq, self.norm_q.weight, self.eps, reduce=self._norm_reduce())
        q, tq = self._heads(q), self._heads(tq)
        k, tk, v, tv = self.project_kv(x, tx)
        par = self.parallel
        if par is not None and par.cp > 1:  # Ulysses: local tokens x local heads -> all tokens x heads/cp
            q, k, v, tq, tk, tv = par.seq_to_heads(q, k, v, tq, tk, tv)
        rot = lambda t: None if t is None else apply_rope(t, ctx.rope_cos, ctx.rope_sin)  # noqa: E731
        q, tq, k, tk = rot(q), rot(tq), rot(k), rot(tk)
        if ctx.cache is not None:
            k_all, v_all, cached = ctx.cache.attended(layer, k, v, ctx.sink_rotation)
            if ctx.write_cache:
                ctx.cache.append(layer, ctx.cache_chunk, k, v)
            if cached:  # cached keys/values carry no tangent
                def zeros_before(t):
                    return None if t is None else torch.cat([t.new_zeros(t.shape[0], cached, *t.shape[2:]), t], 1)

                tk, tv = zeros_before(tk), zeros_before(tv)
                k, v = k_all, v_all
        o, to = attention_jvp(q, k, v, tq, tk, tv, mask=ctx.mask, backend=ctx.backend, keep=True)
        if par is not None and par.cp > 1:
            o, to = par.heads_to_seq(o, to)
        return self._out(o, to)

    def project_image_kv(self, image):
        """Keys/values of the embedded image context (I2V layout): added projections, RMSNorm across heads on K."""
        k, _ = dual.linear(image, None, self.add_k_proj.weight, self.add_k_proj.bias)
        k, _ = dual.rms_norm(k, None, self.norm_added_k.weight, self.eps, reduce=self._norm_reduce())
        v, _ = dual.linear(image, None, self.add_v_proj.weight, self.add_v_proj.bias)
        return self._heads(k), self._heads(v)

    def _context_kv(self, cache_layer, slots: tuple[str, str], project, weight):
        """K/V of a tangent-free context: from the stream's cache if there, else projected (and kept there).

        The cache holds detached tensors, so a call that trains the projection (``weight`` requires grad
        and autograd records: a self-forcing rollout's gradient step) projects afresh: reusing K/V cached
        by an earlier no-grad step would silently leave the text/image projections untrained.
        """
        trains = torch.is_grad_enabled() and weight.requires_grad
        if cache_layer is not None and not trains and getattr(cache_layer, slots[0]) is not None:
            return getattr(cache_layer, slots[0]), getattr(cache_layer, slots[1])
        k, v = project()
        if cache_layer is not None and getattr(cache_layer, slots[0]) is None:
            setattr(cache_layer, slots[0], k.detach()), setattr(cache_layer, slots[1], v.detach())
        return k, v

    def cross_attention(self, x, tx, context, cache_layer=None, backend: str = "auto", image=None):
        """Attend to the (tangent-free) text context, and with the I2V layout to the embedded image context
        (the two attention outputs are summed before ``to_out``); their keys/values may come from the cache."""
        x, tx = self._in(x, tx)
        if self.parallel is not None:
            context, _ = self.parallel.column_input(context, None)
        q, tq = dual.linear(x, tx, self.to_q.weight, self.to_q.bias)
        q, tq = dual.rms_norm(q, tq, self.norm_q.weight, self.eps, reduce=self._norm_reduce())
        q, tq = self._heads(q), self._heads(tq)
        k, v = self._context_kv(cache_layer, ("cross_k", "cross_v"),
                                lambda: self.project_kv(context, None)[::2],  # (k, v) of (k, tk, v, tv)
                                self.to_k.weight)
        o, to = attention_jvp(q, k, v, tq, None, None, mask=None, backend=backend)
        if self.add_k_proj is not None:
            if image is not None and self.parallel is not None:
                image, _ = self.parallel.column_input(image, None)
            ki, vi = self._context_kv(cache_layer, ("image_k", "image_v"), lambda: self.project_image_kv(image),
                                      self.add_k_proj.weight)
            oi, toi = attention_jvp(q, ki, vi, tq, None, None, mask=None, backend=backend)
            o, to = dual.add(o, to, oi, toi)
        return self._out(o, to)


class _GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear; keys ``net.0.proj`` and ``net.2`` as in diffusers."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    parallel = None  # see Attention.parallel

    def forward(self, x, tx):
        if self.parallel is not None:
            x, tx = self.parallel.column_input(x, tx)
        h, th = dual.linear(x, tx, self.net[0].proj.weight, self.net[0].proj.bias)
        h, th = dual.gelu_tanh(h, th)
        if self.parallel is not None:
            return self.parallel.row_linear(h, th, self.net[2].weight, self.net[2].bias)
        return dual.linear(h, th, self.net[2].weight, self.net[2].bias)


def _up(x, tx):
    """Norms run in >= fp32 and hand fp32 to the modulation (diffusers' FP32LayerNorm)."""
    return dual.upcast(x), None if tx is None else dual.upcast(tx)


@fusable
def _norm_modulate(x, tx, shift, tshift, scale, tscale, eps: float, dtype: torch.dtype):
    """LayerNorm (no affine, fp32) -> AdaLN modulation -> cast: one fused kernel when fusion is on."""
    n, tn = dual.layer_norm(*_up(x, tx), eps=eps)
    h, th = dual.modulate(n, tn, shift, tshift, scale, tscale)
    return h.to(dtype), None if th is None else th.to(dtype)


@fusable
def _norm_affine(x, tx, weight, bias, eps: float, dtype: torch.dtype):
    """Affine LayerNorm in fp32, cast back (the cross-attention input norm)."""
    n, tn = dual.layer_norm(*_up(x, tx), weight, bias, eps=eps)
    return n.to(dtype), None if tn is None else tn.to(dtype)


def _modulation_vectors(mod):
    """[B, F, 6, D] -> six [B, F, 1, D] modulation vectors. With fusion on they are tensors of their own
    (tiny copies: per frame, not per token): as views of one tensor they alias each other, and the compiled
    consumers (ops/fusion.py) then guard on their shared base and recompile per call site. Eager runs keep
    the views (six copy kernels per block would only add launches)."""
    vectors = [t.unsqueeze(2) for t in mod.unbind(2)]
    return [v.contiguous() for v in vectors] if fusion_enabled() else vectors


def _per_frame(x, frames: int):
    """[B, S, D] -> [B, frames, S/frames, D] so per-frame modulation broadcasts over a frame's tokens."""
    return None if x is None else x.unflatten(1, (frames, -1))


class WanBlock(nn.Module):
    """Self-attention, text (+ image, I2V layout) cross-attention and FFN, each under per-frame AdaLN modulation."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, eps: float, cross_attn_norm: bool = True,
                 added_kv_dim: int | None = None):
        super().__init__()
        self.eps = eps
        self.attn1 = Attention(dim, heads, eps)
        self.attn2 = Attention(dim, heads, eps, added_kv_dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attn_norm else None
        self.ffn = FeedForward(dim, ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, tx, temb, ttemb, context, ctx: AttentionContext, layer: int, image=None):
        """x [B, S, D]; temb [B, F, 6, D] per-frame modulation (F frames of S/F tokens each); ``image`` the
        embedded image context of the I2V layout (None otherwise)."""
        frames = temb.shape[1]
        mod = self.scale_shift_table.unsqueeze(0) + dual.upcast(temb)  # [B, F, 6, D]
        m = _modulation_vectors(mod)  # 6 x [B, F, 1, D]
        tm = [None] * 6 if ttemb is None else _modulation_vectors(dual.upcast(ttemb))
        shift, scale, gate, c_shift, c_scale, c_gate = m
        t_shift, t_scale, t_gate, tc_shift, tc_scale, tc_gate = tm
        xf, txf = _per_frame(x, frames), _per_frame(tx, frames)

        h, th = _norm_modulate(xf, txf, shift, t_shift, scale, t_scale, self.eps, x.dtype)
        h, th = h.flatten(1, 2), None if th is None else th.flatten(1, 2)
        a, ta = self.attn1.self_attention(h, th, ctx, layer)
        xf, txf = dual.gated_residual(xf, txf, _per_frame(a, frames), _per_frame(ta, frames), gate, t_gate)

        x, tx = xf.flatten(1, 2), None if txf is None else txf.flatten(1, 2)
        if self.norm2 is not None:
            n, tn = _norm_affine(x, tx, self.norm2.weight, self.norm2.bias, self.eps, x.dtype)
        else:
            n, tn = x, tx
        cache_layer = None if ctx.cache is None else ctx.cache.layers[layer]
        c, tc = self.attn2.cross_attention(n, tn, context, cache_layer, backend=ctx.backend, image=image)
        x, tx = dual.add(x, tx, c, tc)

        xf, txf = _per_frame(x, frames), _per_frame(tx, frames)
        h, th = _norm_modulate(xf, txf, c_shift, tc_shift, c_scale, tc_scale, self.eps, x.dtype)
        f, tf = self.ffn(h, th)
        xf, txf = dual.gated_residual(xf, txf, f, tf, c_gate, tc_gate)
        return xf.flatten(1, 2), None if txf is None else txf.flatten(1, 2)
