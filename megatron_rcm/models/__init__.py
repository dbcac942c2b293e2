"""Causal Wan-style DiT, its KV cache and its building blocks."""
from .causal_wan import CausalWanModel, Segment, build_model
from .kv_cache import KVCache

__all__ = ["CausalWanModel", "Segment", "build_model", "KVCache"]
