"""The one error type for bad configuration: it always names the key and what is allowed."""
from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {value!r} is invalid; expected {allowed}")
