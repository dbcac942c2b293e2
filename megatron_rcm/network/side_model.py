"""A second model that an objective trains with its own optimizer (DMD's fake score).

The objective only says *what* to minimise (``update(loss_fn)``); *how* a step runs under the
layout (forward + backward through pipeline stages, gradient synchronisation, clipping by the
global norm, a sharded optimizer) is installed by whoever builds it: the trainer for multi-process
runs, :meth:`TrainedSideModel.local` for one process.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .denoiser import Denoiser


def _plain_backward(net: Denoiser, loss_fn: Callable) -> torch.Tensor:
    loss = loss_fn(net)
    loss.backward()
    return loss.detach()


def _plain_sync_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


class TrainedSideModel:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0,
                 backward: Callable | None = None, sync_and_clip: Callable | None = None):
        """``backward(net, loss_fn) -> loss`` runs forward + backward; ``sync_and_clip(model, max_norm) ->
        grad norm`` synchronises and clips the gradients (defaults: one process)."""
        self.model, self.net, self.optimizer = model, Denoiser(model), optimizer
        self.max_norm = grad_clip if grad_clip > 0 else math.inf
        self._backward = backward or _plain_backward
        self._sync_and_clip = sync_and_clip or _plain_sync_and_clip

    @classmethod
    def local(cls, model: torch.nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
              grad_clip: float = 0.0) -> "TrainedSideModel":
        """One process: AdamW over the model's trainable parameters."""
        model.train().requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas),
                                weight_decay=weight_decay)
        return cls(model, opt, grad_clip)

    def update(self, loss_fn: Callable[[Denoiser], torch.Tensor]) -> dict:
        """One optimizer step on ``loss_fn(net)``; returns {"loss", "grad_norm"}."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(self.net, loss_fn)
        grad_norm = self._sync_and_clip(self.model, self.max_norm)
        self.optimizer.step()
        return {"loss": float(loss), "grad_norm": float(grad_norm)}
