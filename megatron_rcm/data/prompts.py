"""Prompt files: one prompt per line, UTF-8; blank lines and ``#`` comment lines are skipped.

Every problem names the file and, where there is one, the line: a missing or unreadable file, bytes
that are not UTF-8, control characters (a binary file passed by mistake), and a file without prompts.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from ..config.errors import ConfigError


class PromptFileError(ConfigError):
    def __init__(self, message: str):
        self.key, self.value, self.allowed = "prompts", None, message
        ValueError.__init__(self, message)


def _bad_char(text: str) -> str | None:
    for ch in text:
        if ch != "\t" and unicodedata.category(ch) in ("Cc", "Cs"):
            return f"U+{ord(ch):04X}"
    return None


def parse_prompt_lines(data: bytes, source: str = "<prompts>") -> list[str]:
    """The prompts in ``data`` (the bytes of a prompt file); ``source`` names it in errors."""
    prompts = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(f"{source}, line {number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                  f"{err.start + 1}); save the prompt file as UTF-8") from None
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        bad = _bad_char(text)
        if bad is not None:
            raise PromptFileError(f"{source}, line {number}: control character {bad} in the prompt (is this a text "
                                  "file with one prompt per line?)")
        prompts.append(text)
    if not prompts:
        raise PromptFileError(f"{source} holds no prompts: write one prompt per line (blank lines and lines "
                              "starting with # are skipped)")
    return prompts


def read_prompts(path) -> list[str]:
    """The prompts of the file at ``path`` (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PromptFileError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    return parse_prompt_lines(data, str(path))
