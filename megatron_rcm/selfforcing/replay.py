"""Replayed backprop for the self-forcing rollout (Causal-rCM's ``replayed_training``).

The rollout runs entirely without gradients and keeps, per chunk, the exit step's input and level plus
a KV cache that never evicts. The returned video is the output of :class:`_ReplayedExitSteps`: in
backward it recomputes each chunk's exit step with gradients against the cache as that chunk saw it
(``KVCache.before``), backpropagates that chunk's part of the incoming gradient into the parameters and
frees the chunk's graph before the next one. Peak memory: one chunk's graph (instead of one per chunk);
compute: one extra exit forward per chunk. The loss above the video (DMD) is unchanged.

Why an autograd Function and not ``torch.utils.checkpoint``: the rollout has already computed every
chunk's output, so the forward is not run again; the inner backward accumulates into the parameters'
``.grad`` like the direct rollout's would (the same values, see ``tests/test_replayed_backprop.py``).
"""
from __future__ import annotations

import torch

from ..network import Condition, Denoiser


class _ReplayedExitSteps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, video, replay):
        ctx.replay = replay
        return video.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.replay(grad)
        return None, None, None


def replayed(video: torch.Tensor, net: Denoiser, cond: Condition, layout, cache, exits_in: list,
             held=None) -> torch.Tensor:
    """``video`` (no graph) as a tensor whose backward replays each chunk's exit step (see module docstring).

    ``exits_in[i] = (x, s)``: chunk i's exit-step input and level; ``cache``: the rollout's non-evicting cache;
    ``held``: chunk 0's held first frames (``HeldFrames``: given to the replayed step as to the rollout's; their
    output is the given frames, so no gradient flows there).
    """
    pt = net.patch_frames
    device_type = video.device.type
    autocast = torch.is_autocast_enabled(device_type)
    autocast_dtype = torch.get_autocast_dtype(device_type) if autocast else None

    def replay(grad: torch.Tensor) -> None:
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast):
            for chunk, (x, s) in enumerate(exits_in):
                frames = layout.frame_slice(chunk, pt)
                g = grad[:, :, frames]
                x_in, s_in = (x, s) if held is None or chunk else held.inputs(x, s)
                if held is not None and not chunk:
                    g = torch.cat([torch.zeros_like(g[:, :, :held.frames]), g[:, :, held.frames:]], dim=2)
                v, _ = net.chunk(x_in, s_in, cond.frames(layout.frame_slice(chunk)), cache.before(chunk), chunk)
                torch.autograd.backward(x - s * v, g)

    anchor = torch.zeros((), device=video.device, requires_grad=True)
    return _ReplayedExitSteps.apply(anchor, video.detach(), replay)
