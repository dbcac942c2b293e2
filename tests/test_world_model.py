"""World model end to end: train an action-conditioned causal teacher with the Trainer, steer it with actions.

The synthetic set with ``data.action_dim = 4`` moves one shape by 2 px per frame along angle 2*pi*k/4
for action k (k = 0 right, 1 up, 2 left, 3 down). A teacher trained on it by the ordinary config path
(flow-matching phase, action embedder, TF batches carrying actions; the ``world_model_run`` fixture, which the
browser test of ``serve`` plays too) is then streamed from the same
clean first frame and the same noise under each constant action, and the shape must move the way
each action says.

Measurement (tests/fixtures/world_model.py): the circular (torus) centroid of the shape's intensity per
frame, its frame-to-frame displacement the motion. Two checks per action k, averaged over a batch of start
frames and the generated frames:

* relative: ``d_k - mean_j d_j`` (what the action changes, with any drift common to all actions
  removed) points along the prescribed direction e_k (expected: 2 px per frame along e_k);
* absolute: ``d_k`` itself has a clear positive component along e_k.

An unconditioned model gives the same video for every action, so ``d_k - mean_j d_j = 0`` and the
relative check fails; the test verifies that by zeroing the action embedder of the trained model.
"""
from pathlib import Path

import pytest
import torch

from fixtures.world_model import (ACTIONS, FRAMES, SEED, SIZE, STEP_PX, action_direction, mean_displacement,
                                  torus_centroids)
from megatron_rcm.config.run import load_config
from megatron_rcm.data import DataConfig, build_dataset
from megatron_rcm.inference.run_dir import load_phase_model, load_run_config
from megatron_rcm.inference.streaming import generate_video, one_hot_actions

pytestmark = pytest.mark.usefixtures("one_thread")


def displacements(model, batch) -> torch.Tensor:
    """[ACTIONS, 2]: mean motion under each constant action, all from the same first frames and noise."""
    prefix = batch["latents"][:, :, :1]
    b = prefix.shape[0]
    out = []
    for k in range(ACTIONS):
        video = generate_video(model, batch["context"], FRAMES - 1, SIZE, SIZE, steps=1, prefix=prefix, seed=SEED,
                               action_fn=lambda chunk, _frames, k=k: one_hot_actions([k], ACTIONS, 1, batch=b),
                               log=None)
        out.append(mean_displacement(torch.cat([prefix, video], dim=2)))
    return torch.stack(out)


def action_effects(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relative projection, relative cosine, absolute projection) per action, in px per frame."""
    e = torch.stack([action_direction(k) for k in range(ACTIONS)])
    rel = d - d.mean(0, keepdim=True)
    proj = (rel * e).sum(-1)
    cos = proj / rel.norm(dim=-1).clamp_min(1e-6)
    return proj, cos, (d * e).sum(-1)


def test_centroid_measure_on_rendered_data():
    """The measurement itself: on ground-truth action videos it recovers 2 px per frame along e_k."""
    data = build_dataset(DataConfig(action_dim=ACTIONS, height=SIZE, width=SIZE, num_frames=6), batch_size=16)
    for i in range(2):
        s = data.batch_at(i)
        acts = s["actions"].argmax(-1)  # [B, F]
        c = torus_centroids(s["latents"])
        d = torch.remainder(c[:, 1:] - c[:, :-1] + SIZE / 2, SIZE) - SIZE / 2
        expected = torch.stack([torch.stack([action_direction(int(k)) for k in row]) for row in acts[:, 1:]]) * STEP_PX
        assert (d - expected).abs().max() < 0.1


def test_trained_world_model_follows_actions(world_model_run):
    cfg = load_run_config(world_model_run)
    model = load_phase_model(cfg, "teacher", "model")
    batch = build_dataset(cfg.data, batch_size=8).batch_at(50_000)  # start frames unseen in training
    proj, cos, absolute = action_effects(displacements(model, batch))
    report = (f"px/frame along e_k (of {STEP_PX}): relative {proj.tolist()}, absolute {absolute.tolist()}; "
              f"cosine {cos.tolist()}")
    assert (proj > 0.8).all() and (cos > 0.9).all() and (absolute > 0.5).all(), report

    with torch.no_grad():  # the same model without its action pathway cannot follow actions
        model.action_embedder.linear_2.weight.zero_()
        model.action_embedder.linear_2.bias.zero_()
    proj0, _, _ = action_effects(displacements(model, batch))
    assert (proj0.abs() < 1e-4).all()  # identical videos for every action: the check above would fail


def test_world_model_example_config_is_valid():
    """examples/world_model.yaml (the users' starting point) resolves and validates: actions on both sides."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "world_model.yaml")
    assert cfg.model.action_dim == cfg.data.action_dim == ACTIONS
    assert [p.kind for p in cfg.phases] == ["teacher", "tf_cm", "sf_dmd"]
    assert cfg.causal.window_chunks > 0 and cfg.causal.sink_chunks > 0  # rolling cache for long play
