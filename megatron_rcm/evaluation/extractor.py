"""A tiny conv3d class classifier on the synthetic set: its features feed the Frechet distance and
its predictions give motion accuracy. Colour is random per video, so it must read the motion."""
from __future__ import annotations

import os

import torch
from torch import nn
from safetensors.torch import load_file

from ..utils.files import save_safetensors


class VideoFeatureExtractor(nn.Module):
    def __init__(self, num_classes: int = 8, channels: int = 3, width: int = 32):
        super().__init__()
        self.num_classes, self.channels, self.width = num_classes, channels, width
        self.body = nn.Sequential(
            nn.Conv3d(2 * channels, width // 2, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)), nn.GELU(),
            nn.Conv3d(width // 2, width, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(width, width * 2, 3, stride=(2, 2, 2), padding=1), nn.GELU(),
        )
        self.head = nn.Linear(width * 2, num_classes)

    def features_and_logits(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,C,F,H,W] in [-1,1] -> (features [B, 2*width], logits [B, num_classes])."""
        x = video.float()
        diff = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], 2)  # motion cue
        feats = self.body(torch.cat([x, 4 * diff], 1)).mean(dim=(2, 3, 4))
        return feats, self.head(feats)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(video)[1]

    def save(self, path: str) -> None:
        meta = {"num_classes": str(self.num_classes), "channels": str(self.channels), "width": str(self.width)}
        save_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "VideoFeatureExtractor":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        model = cls(int(meta.get("num_classes", 8)), int(meta.get("channels", 3)), int(meta.get("width", 32)))
        model.load_state_dict(load_file(path))
        return model.eval()


def train_feature_extractor(dataset, steps: int = 200, seed: int = 0, lr: float = 5e-3,
                            cache_path: str | None = None, log_every: int = 0) -> VideoFeatureExtractor:
    """Train on batches from ``dataset`` (an iterator of batch dicts with latents/class_id).

    With ``cache_path`` an existing file is loaded instead of training, and a fresh result saved there.
    """
    if cache_path and os.path.exists(cache_path):
        return VideoFeatureExtractor.load(cache_path)
    torch.manual_seed(seed)
    num_classes = getattr(getattr(dataset, "cfg", None), "num_classes", 8)
    model = VideoFeatureExtractor(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    it = iter(dataset)
    model.train()
    for step in range(steps):
        batch = next(it)
        loss = nn.functional.cross_entropy(model(batch["latents"]), batch["class_id"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"extractor step {step} loss {loss.item():.3f}")
    model.eval()
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        model.save(cache_path)
    return model


@torch.no_grad()
def classifier_accuracy(model: VideoFeatureExtractor, videos: torch.Tensor, class_ids: torch.Tensor) -> float:
    model.eval()
    return float((model(videos).argmax(-1) == class_ids.long()).float().mean())
