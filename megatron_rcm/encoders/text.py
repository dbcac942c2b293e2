"""The frozen umT5 text encoder of Wan2.1: prompts -> context [B, text_len, width].

Same numbers as ``diffusers.WanPipeline.encode_prompt`` on the same components: the prompt is cleaned
the way the pipeline cleans it, tokenized to ``max_length`` tokens (padding + truncation, EOS added),
encoded with the attention mask, and every embedding past the prompt's own length is set to zero.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .device import Placement, encoder_dtype
from .errors import EncoderError

# Wan2.1's published default negative prompt: `sample_neg_prompt` in wan/configs/shared_config.py of
# github.com/Wan-Video/Wan2.1 (Self-Forcing's configs use the same string as their `negative_prompt`).
DEFAULT_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                           "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                           "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def clean_prompt(text: str) -> str:
    """The cleaning WanPipeline applies before tokenizing (ftfy when installed, HTML unescape, whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 names the load dtype ``dtype``; older releases only know ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class WanTextEncoder:
    """Tokenizer + ``UMT5EncoderModel``, frozen; ``encode(prompts)`` gives the transformer's context."""

    def __init__(self, tokenizer, encoder, max_length: int = 512, device="cpu", offload: bool = False,
                 source: str = ""):
        self.tokenizer, self.max_length, self.source = tokenizer, int(max_length), source
        self.placement = Placement(encoder, device, offload)

    @classmethod
    def from_folders(cls, tokenizer_dir, encoder_dir, max_length: int = 512, dtype: str = "auto", device="cpu",
                     offload: bool = False) -> "WanTextEncoder":
        from transformers import AutoTokenizer, UMT5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in our command output
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as err:  # a broken folder: name it, no trace
            raise EncoderError(f"cannot load the tokenizer from {tokenizer_dir}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}") from None
        try:
            encoder = UMT5EncoderModel.from_pretrained(str(encoder_dir), **_dtype_kwarg(encoder_dtype(dtype, device)))
        except Exception as err:
            raise EncoderError(f"cannot load the umT5 text encoder from {encoder_dir}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return cls(tokenizer, encoder, max_length, device, offload, source=str(Path(encoder_dir)))

    @property
    def width(self) -> int:
        return int(self.placement.module.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    def tokenize(self, prompts: list[str]):
        """(input ids, attention mask) [B, max_length] of the cleaned prompts."""
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        return tok.input_ids, tok.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Context [B, max_length, width] on the encoder's device; rows past each prompt's length are 0."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self.tokenize(prompts)
        with self.placement.active() as encoder:
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = encoder(ids, mask).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)
