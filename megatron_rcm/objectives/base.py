"""Shared teacher-forcing plumbing: the [clean ; noisy] mask, per-chunk times, guided teacher calls.

Every objective here trains on the TF sequence: noisy chunk i sees clean chunks < i and itself, all
frames of a chunk share one noise level and chunks draw independent levels.

Under pipeline parallelism the model calls go through ``outputs_on_every_stage``: outputs are
broadcast from the last stage (which keeps its own, differentiable ones), so objectives run
unchanged on every stage; only the last stage's loss is used.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from ..diffusion.guidance import cfg_combine
from ..ops.masks import teacher_forcing_mask
from ..parallel.pipeline import outputs_on_every_stage


class Objective(Protocol):
    def loss(self, student, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...


class TFContext:
    """Per-batch TF geometry: mask, chunking, and thin wrappers over ``forward_teacher_forcing``."""

    def __init__(self, model, batch: dict):
        x0 = batch["latents"]
        self.x0, self.ctx = x0, batch["context"]
        self.uctx, self.actions = batch.get("uncond_context"), batch.get("actions")
        b, _, f, h, w = x0.shape
        pt = model.patch[0]
        self.frames = f // pt  # patched frames = timestep entries
        self.chunk = model.causal.chunk_frames
        if self.frames % self.chunk:
            raise ValueError(f"{self.frames} latent frames are not a whole number of {self.chunk}-frame chunks")
        self.n_chunks = self.frames // self.chunk
        self.batch = b
        self.mask = teacher_forcing_mask(self.frames, model.tokens_per_frame(h, w), self.chunk, model.visibility())
        self.pt = pt

    def chunk_to_frames(self, t_chunk):
        """[B, n_chunks] -> per-frame [B, frames]."""
        return t_chunk.repeat_interleave(self.chunk, dim=1)

    def chunk_mean(self, e):
        """Mean of e [B, C, F, H, W] over each chunk's elements -> [B, n_chunks]."""
        b = e.shape[0]
        e = e.transpose(1, 2).reshape(b, self.n_chunks, -1)
        return e.mean(-1)

    def chunk_norm(self, e):
        """Per-(sample, chunk) L2 norm of e, broadcast back to e's shape [B, 1, F, 1, 1]."""
        b = e.shape[0]
        n = e.transpose(1, 2).reshape(b, self.n_chunks, -1).norm(dim=-1)
        return n.repeat_interleave(self.chunk * self.pt, dim=1)[:, None, :, None, None]

    def run(self, model, noisy, t_wan, ctx=None, tangent=None, t_tangent=None, interval=None, interval_tangent=None):
        """Velocity (and tangent) for the noisy copy given the clean context x0.

        ``interval`` (Wan scale t - r) only for interval (MeanFlow) models; None keeps their default r = 0.
        """
        out = model.forward_teacher_forcing(self.x0, noisy, t_wan, self.ctx if ctx is None else ctx, self.mask,
                                            tangent=tangent, timestep_tangent=t_tangent, actions=self.actions,
                                            interval=interval, interval_tangent=interval_tangent)
        return outputs_on_every_stage(model, out, (noisy, tangent))

    def guided(self, model, noisy, t_wan, scale: float, tangent=None, t_tangent=None):
        """CFG velocity (and tangent) with [cond ; uncond] batched in one TF forward."""
        if scale == 1.0 or self.uctx is None:
            return self.run(model, noisy, t_wan, tangent=tangent, t_tangent=t_tangent)
        cat = lambda a: None if a is None else torch.cat([a, a])
        acts = cat(self.actions)
        out = model.forward_teacher_forcing(cat(self.x0), cat(noisy), cat(t_wan), torch.cat([self.ctx, self.uctx]),
                                            self.mask, tangent=cat(tangent), timestep_tangent=cat(t_tangent),
                                            actions=acts)
        v, dv = outputs_on_every_stage(model, out, (cat(noisy), cat(tangent)))
        vc, vu = v.chunk(2)
        v = cfg_combine(vc, vu, scale)
        if dv is not None:
            dvc, dvu = dv.chunk(2)
            dv = cfg_combine(dvc, dvu, scale)
        return v, dv


class AdaptiveWeight(nn.Module):
    """Learned log-weight w(t) (EDM2/sCM uncertainty weighting): loss = exp(-w) L + w, optimum w = log L.

    t is fed as Fourier features of a scalar time code (e.g. log tan t for TrigFlow); zero-init output so
    training starts unweighted.
    """

    def __init__(self, num_features: int = 64, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_features // 2) * scale * 2 * math.pi)
        self.register_buffer("phases", torch.rand(num_features // 2) * 2 * math.pi)
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, code):
        a = code[..., None].float() * self.freqs + self.phases
        feats = torch.cat([torch.cos(a), torch.sin(a)], dim=-1) * math.sqrt(2 / self.freqs.numel())
        return self.linear(feats.to(self.linear.weight.dtype))[..., 0]
