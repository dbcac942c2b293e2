"""The teacher's ODE trajectory at a student's sampling levels: the data of ODE-regression initialisation
(CausVid; Self-Forcing's ``ode`` init), made offline by ``generate-data --trajectory K`` or on the fly by the
``ode_regression`` objective.

A causal teacher (an earlier phase) is solved chunk by chunk with its KV cache, as it is sampled
(:func:`~megatron_rcm.inference.streaming.stream_chunks`); a bidirectional one (a diffusers Wan folder) over
the whole video with full attention, as ``generate-data --teacher`` samples it. Either way the ODE grid is
the shifted uniform grid with the student's levels inserted (:func:`~megatron_rcm.diffusion.samplers.
trajectory_grid`), and the states at those levels are returned with the final x0.
"""
from __future__ import annotations

from functools import partial

import torch

from ..diffusion.samplers import euler_fm, multistep2_fm, ode_trajectory
from ..network import Condition, Denoiser

SOLVERS = {"multistep2": multistep2_fm, "euler": euler_fm}
ATTEND = ("block_causal", "full")


@torch.no_grad()
def teacher_trajectory(teacher: Denoiser, cond: Condition, noise: torch.Tensor, levels, steps: int, shift: float,
                       guidance: float, attend: str = "block_causal", solver: str = "multistep2", fresh_noise=None):
    """(x0 [B, C, F, H, W], states [B, K, C, F, H, W]): the ``steps``-step CFG ODE from ``noise`` and its states at
    the K FM ``levels``. ``fresh_noise(shape)``: noise for a noisy-context teacher's cached copies."""
    from .streaming import stream_chunks

    if attend not in ATTEND:
        raise ValueError(f"teacher attention must be one of {ATTEND}, got {attend!r}")
    run = partial(ode_trajectory, SOLVERS[solver], steps=steps, shift=shift, keep_levels=list(levels))
    if attend == "full":  # the state stays in the noise's precision between steps (as bidirectional_sample)
        def denoise(x, s):
            return teacher.velocity(x, s, cond, attend="full", guidance=guidance)[0].to(noise.dtype)

        x0, states = run(denoise_fn=denoise, noise=noise)
        return x0, torch.stack(states, dim=1)
    b, c, f, h, w = noise.shape
    layout = teacher.layout(noise)
    starts = iter(torch.split(noise, [n * teacher.patch_frames for n in layout.sizes], dim=2))
    chunk_states = []

    def sampler(denoise, start, _chunk):
        x0, states = run(denoise_fn=denoise, noise=start)
        chunk_states.append(torch.stack(states, dim=1))
        return x0

    actions = None if cond.actions is None else (lambda chunk, _frames: cond.actions[:, layout.frame_slice(chunk)])
    chunks = stream_chunks(teacher, cond, f, h, w, sampler, lambda _chunk, _shape: next(starts), guidance, actions,
                           fresh_noise=fresh_noise, sync=lambda: None)
    x0 = torch.cat([out.frames for out in chunks], dim=2)
    return x0, torch.cat(chunk_states, dim=3)


def trajectory_levels(k: int, shift: float = 1.0) -> list[float]:
    """The K student levels ``generate-data --trajectory K`` stores: K evenly spaced Wan timesteps from 1000
    (the few-step samplers' default grid), shifted by ``shift``."""
    from ..selfforcing.rollout import denoise_levels
    from .streaming import default_timesteps

    return denoise_levels(default_timesteps(k), shift)


@torch.no_grad()
def sample_trajectory(model, prompts: dict, data_cfg, steps: int, guidance: float, seed: int, shift: float,
                      levels) -> dict:
    """A causal teacher phase's ODE samples with their trajectories, from the same noise as ``teacher_sample``:
    {"latents": x0, "trajectory": states [B, K, ...], "trajectory_levels": [B, K]} (float32, CPU)."""
    net, d = Denoiser.of(model), data_cfg
    generator = torch.Generator().manual_seed(seed)
    device = prompts["context"].device
    noise = torch.randn(len(prompts["context"]), d.channels, d.num_frames, d.height, d.width, generator=generator)
    was_training = net.model.training
    net.model.eval()
    fresh = lambda shape: torch.randn(shape, generator=generator).to(device, net.dtype)  # noqa: E731
    x0, states = teacher_trajectory(net, Condition(prompts["context"], prompts["uncond_context"],
                                                   prompts.get("actions")), noise.to(device, net.dtype), levels, steps,
                                    shift, guidance, fresh_noise=fresh)
    net.model.train(was_training)
    k = torch.tensor(levels, dtype=torch.float32).expand(len(x0), -1).contiguous()
    return {"latents": x0.float().cpu(), "trajectory": states.float().cpu(), "trajectory_levels": k}
