"""Streaming few-step generation with the rolling KV cache (text-to-video and world-model modes).

Names load on first use, so the CLI can register the run-folder commands without importing torch."""
_STREAMING = ("ChunkOutput", "StreamConfig", "generate_video", "one_hot_actions", "stdin_action_reader",
              "stream_video")


def __getattr__(name: str):
    if name in _STREAMING:
        from . import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_STREAMING)
