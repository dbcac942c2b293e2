"""Streaming few-step generation with the rolling KV cache (text-to-video and world-model modes)."""
from .streaming import ChunkOutput, StreamConfig, generate_video, one_hot_actions, stdin_action_reader, stream_video

__all__ = ["ChunkOutput", "StreamConfig", "generate_video", "one_hot_actions", "stdin_action_reader", "stream_video"]
