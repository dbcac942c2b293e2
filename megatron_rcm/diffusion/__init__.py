"""Pure, per-frame-timestep-aware diffusion schedules, conversions, guidance and samplers."""
from .flow_matching import (bcast, fm_noise, fm_target, fm_x0_eps, sample_fm_times, time_shift, WAN_T_SCALE)
from .trigflow import (fm_from_trig, trig_from_fm, trig_F_from_v, v_from_trig_F, trig_noise, trig_x0,
                       sample_trig_times, trig_F_and_dFdt)
from .guidance import cfg_combine, cfg_denoise_fn
