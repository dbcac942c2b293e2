"""Student-vs-teacher quality numbers: per-frame MSE/PSNR, Frechet distance, motion accuracy."""
from __future__ import annotations

import torch


def per_frame_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B,C,F,H,W] x2 -> [F] mean squared error per frame (over batch, channels, pixels)."""
    return ((a.double() - b.double()) ** 2).mean(dim=(0, 1, 3, 4))


def psnr_from_mse(mse: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB for data spanning ``data_range`` (2 for [-1, 1] videos)."""
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_gaussians(mu1, cov1, mu2, cov2) -> float:
    """|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), symmetric-eigen form (no scipy)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, cov1, cov2))
    s1 = _sqrtm_psd(cov1)
    inner = s1 @ cov2 @ s1
    tr_cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_cross)
    return max(fd, 0.0)  # rank-deficient covariances can round a true 0 to a tiny negative


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (N >= 2)."""
    a, b = feats_a.double(), feats_b.double()
    return frechet_distance_gaussians(a.mean(0), torch.cov(a.T).reshape(a.shape[1], a.shape[1]),
                                      b.mean(0), torch.cov(b.T).reshape(b.shape[1], b.shape[1]))


@torch.no_grad()
def evaluate_samples(student_videos: torch.Tensor, teacher_videos: torch.Tensor, class_ids: torch.Tensor,
                     extractor=None) -> dict:
    """Compare student and teacher videos generated for the same prompts and seeds.

    Returns mse, psnr (and per-frame lists); with a feature extractor also fd (Frechet distance of
    extractor features) and motion_acc_student / motion_acc_teacher (class accuracy w.r.t. prompt).
    """
    s, t = student_videos.float().clamp(-1, 1), teacher_videos.float().clamp(-1, 1)
    mse_f = per_frame_mse(s, t)
    out = {"mse": float(mse_f.mean()), "psnr": float(psnr_from_mse(mse_f.mean())),
           "mse_per_frame": mse_f.tolist(), "psnr_per_frame": psnr_from_mse(mse_f).tolist()}
    if extractor is not None:
        extractor.eval()
        fs, ls = extractor.features_and_logits(s)
        ft, lt = extractor.features_and_logits(t)
        out["fd"] = frechet_distance(fs, ft) if s.shape[0] >= 2 else float("nan")
        cls = class_ids.long()
        out["motion_acc_student"] = float((ls.argmax(-1) == cls).float().mean())
        out["motion_acc_teacher"] = float((lt.argmax(-1) == cls).float().mean())
    return out
