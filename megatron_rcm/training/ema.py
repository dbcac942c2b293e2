"""Exponential moving average of a model's parameters (the weights we sample and distill from)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, copy_model: bool = True):
        """``copy_model=False``: ``model`` already is this EMA's own copy (e.g. a copy made before the
        student was sharded for tensor/context parallelism; wrapped models cannot be deep-copied)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = (copy.deepcopy(model) if copy_model else model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
