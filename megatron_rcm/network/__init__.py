"""The network seam: how objectives, the self-forcing rollout, samplers and streaming call the DiT.

:class:`Denoiser` (flow-matching time in, Wan time scale, masks, CFG and the pipeline broadcast
inside), :class:`Condition` (text, CFG and action conditioning), :class:`BatchNoise` /
:class:`StepContext` (noise for the global batch under any data-parallel layout) and
:class:`TrainedSideModel` (a second model an objective trains, e.g. DMD's fake score).
"""
from .condition import Condition
from .context import NoisyContext, TeacherForcingContext
from .denoiser import (MASK_KINDS, WAN_T_SCALE, ChunkCache, Denoiser, combine_guidance, wan_timesteps_to_levels)
from .noise import BatchNoise, StepContext
from .side_model import TrainedSideModel

__all__ = ["Condition", "NoisyContext", "TeacherForcingContext",
           "Denoiser", "ChunkCache", "MASK_KINDS", "WAN_T_SCALE", "combine_guidance",
           "wan_timesteps_to_levels", "BatchNoise", "StepContext", "TrainedSideModel"]
