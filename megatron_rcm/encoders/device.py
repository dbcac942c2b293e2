"""Frozen modules: eval mode, no gradients, a dtype chosen for the device, optional CPU offload."""
from __future__ import annotations

import contextlib

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encoder_dtype(name: str, device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (as Wan runs umT5 and its VAE) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[name]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


class Placement:
    """Where a frozen module computes. With ``offload`` it lives on the CPU and visits ``device`` per call."""

    def __init__(self, module: torch.nn.Module, device, offload: bool = False):
        self.module, self.device, self.offload = freeze(module), torch.device(device), offload
        self.module.to("cpu" if offload else self.device)

    @contextlib.contextmanager
    def active(self):
        if not self.offload:
            yield self.module
            return
        self.module.to(self.device)
        try:
            yield self.module
        finally:
            self.module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
