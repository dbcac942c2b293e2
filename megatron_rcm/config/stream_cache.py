"""The names of the stream-cache policies (``models/kv_cache.py``), torch-free so the CLI can list them."""
from __future__ import annotations

ROPE_POLICIES = ("absolute", "rebase")  # positions of a long stream: keep increasing | window re-based after the sink
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # self-attention K/V: the model's dtype | fp8 with per chunk and head scales
