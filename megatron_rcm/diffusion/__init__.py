"""Pure, per-frame-timestep-aware diffusion schedules, conversions and samplers (flow-matching time)."""
from .flow_matching import bcast, fm_noise, fm_sigmas, fm_target, fm_x0_eps, sample_fm_times, time_shift
from .trigflow import (fm_from_trig, sample_trig_times, trig_F_and_dFdt, trig_F_from_v, trig_from_fm, trig_x0,
                       v_from_trig_F)
