"""The one error type for bad configuration: it always names the key and what is allowed."""
from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {value!r} is invalid; expected {allowed}")


class UsageError(ConfigError):
    """Bad input that is not one config value (a busy run folder, unusable checkpoints, a run folder that
    cannot serve a command): a plain one-line message; the CLI prints it and exits with code 2.

    ``quiet``: already reported by another process (rank 0 of a torchrun job), so this one exits silently."""

    def __init__(self, message: str, key: str = "<run>", quiet: bool = False):
        self.key, self.value, self.allowed, self.quiet = key, None, message, quiet
        ValueError.__init__(self, message)
