"""The error for unusable encoder inputs (missing sub-folder, wrong widths, bad frame counts)."""
from __future__ import annotations

from ..config.errors import ConfigError


class EncoderError(ConfigError):
    """A ConfigError carrying a whole sentence, so the CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str):
        self.key, self.value, self.allowed = "encoders", None, message
        ValueError.__init__(self, message)
