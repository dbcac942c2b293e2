"""Prompt switching mid-stream (``generate --prompts-at "0:a red disk;8:a blue square"``): the schedule.

Each entry names the chunk index from which its prompt conditions the stream. The streaming loop
(:func:`~megatron_rcm.inference.streaming.stream_chunks`, ``condition_at``) re-caches the kept context under the
new prompt at each switch (LongLive's KV re-cache): the K/V of the chunks still in the window are recomputed from
their cached latents with the new text, so their cross-attended old prompt no longer pulls the video back.
On the synthetic recipe the prompt is a class id, written ``class=K``.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from ..config.errors import ConfigError
from ..network import Condition

FLAG = "--prompts-at"
FORMAT = "CHUNK:PROMPT entries separated by ';', the first at chunk 0, chunk indices increasing"


def parse_prompts_at(text: str, n_chunks: int, classes: int | None = None) -> list[tuple[int, str | int]]:
    """``"0:a;8:b"`` -> [(0, "a"), (8, "b")]; with ``classes`` (synthetic data) each prompt is ``class=K`` and
    becomes the int K. A bad string is a ConfigError naming the flag and the format."""
    example = "'0:class=1;2:class=3'" if classes is not None else "'0:a red disk moving right;8:a blue square'"
    entries = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        head, sep, prompt = part.partition(":")
        if not sep or not head.strip().isdigit() or not prompt.strip():
            raise ConfigError(FLAG, text, f"{FORMAT}, e.g. {example} (bad entry {part!r})")
        entries.append((int(head), prompt.strip()))
    if not entries or entries[0][0] != 0:
        raise ConfigError(FLAG, text, f"{FORMAT}, e.g. {example} (the first entry must be at chunk 0)")
    chunks = [c for c, _ in entries]
    if any(b <= a for a, b in zip(chunks, chunks[1:])):
        raise ConfigError(FLAG, text, f"{FORMAT}, e.g. {example} (chunk indices {chunks} do not increase)")
    if chunks[-1] >= n_chunks:
        raise ConfigError(FLAG, text, f"chunk indices below the stream's {n_chunks} chunks (got {chunks[-1]}; "
                          "--frames sets the length)")
    if classes is None:
        return entries
    out = []
    for chunk, prompt in entries:
        key, sep, value = prompt.partition("=")
        if key.strip() != "class" or not sep or not value.strip().isdigit() or int(value) >= classes:
            raise ConfigError(FLAG, text, f"{FORMAT} with class prompts 'class=K', K in [0, {classes}) "
                              f"(data.num_classes), e.g. {example} (bad prompt {prompt!r})")
        out.append((chunk, int(value)))
    return out


@dataclass(frozen=True)
class ConditionSchedule:
    """Chunk index -> the Condition in force (the same object until the next switch, which is how the stream
    tells a switch)."""

    starts: tuple[int, ...]
    conditions: tuple[Condition, ...]

    def __post_init__(self):
        if not self.starts or self.starts[0] != 0 or len(self.starts) != len(self.conditions):
            raise ValueError("a condition schedule needs one condition per start chunk, the first at chunk 0")

    def __call__(self, chunk: int) -> Condition:
        return self.conditions[bisect_right(self.starts, chunk) - 1]

    @property
    def switches(self) -> tuple[int, ...]:
        return self.starts[1:]
