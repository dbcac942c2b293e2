"""Self forcing: on-policy chunk-by-chunk student rollouts with the KV cache, as at inference."""
from .rollout import RolloutConfig, RolloutResult, denoise_levels, sample_chunk, self_forcing_rollout

__all__ = ["RolloutConfig", "RolloutResult", "denoise_levels", "sample_chunk", "self_forcing_rollout"]
