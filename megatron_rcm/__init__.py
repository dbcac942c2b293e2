"""megatron_rcm: distill causal video diffusion transformers into few-step streaming generators."""

__version__ = "0.1.0"
