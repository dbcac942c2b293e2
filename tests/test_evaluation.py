import math

import numpy as np
import pytest
import torch

from megatron_rcm.data import DataConfig, build_dataset
from megatron_rcm.evaluation import (VideoFeatureExtractor, classifier_accuracy, evaluate_samples,
                                     frechet_distance, frechet_distance_gaussians, train_feature_extractor)
from megatron_rcm.utils.video import StreamingVideoWriter, read_video, write_video


def test_frechet_known_gaussians():
    # identical -> 0; mean shift only -> |dmu|^2
    cov = torch.tensor([[2.0, 0.3], [0.3, 1.0]])
    assert abs(frechet_distance_gaussians(torch.zeros(2), cov, torch.zeros(2), cov)) < 1e-9
    assert abs(frechet_distance_gaussians(torch.zeros(2), cov, torch.tensor([3.0, 4.0]), cov) - 25) < 1e-9
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    want = float(((a.sqrt() - b.sqrt()) ** 2).sum()) + 1.0
    got = frechet_distance_gaussians(torch.zeros(3), torch.diag(a), torch.tensor([1.0, 0, 0]), torch.diag(b))
    assert abs(got - want) < 1e-9
    # commuting (co-rotated) covariances: same closed form in the rotated basis
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    got = frechet_distance_gaussians(torch.zeros(3), q @ torch.diag(a).double() @ q.T,
                                     torch.tensor([1.0, 0, 0]), q @ torch.diag(b).double() @ q.T)
    assert abs(got - want) < 1e-8
    # scalar case: (m1-m2)^2 + (s1-s2)^2 with s = std
    assert abs(frechet_distance_gaussians([0.0], [[9.0]], [1.0], [[1.0]]) - (1 + 4)) < 1e-9
    # singular covariance stays finite and non-negative
    sing = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert frechet_distance_gaussians(torch.zeros(2), sing, torch.zeros(2), sing) == pytest.approx(0, abs=1e-6)


def test_frechet_from_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0, 0], dtype=torch.float64)
    # N(0, I) vs N((1,0,0), 4I): 1 + 3 * (1 - 2)^2 = 4
    assert frechet_distance(x, y) == pytest.approx(4.0, abs=0.15)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    path = tmp_path_factory.mktemp("fx") / "extractor.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is as fast and far faster on a busy machine
    try:
        model = train_feature_extractor(build_dataset(DataConfig(seed=1), batch_size=16), steps=60, seed=0,
                                        cache_path=str(path))
    finally:
        torch.set_num_threads(threads)
    return model, path


def test_extractor_accuracy_and_cache(extractor):
    model, path = extractor
    held = next(build_dataset(DataConfig(seed=12345), batch_size=128))
    acc = classifier_accuracy(model, held["latents"], held["class_id"])
    assert acc > 0.5  # chance is 1/8
    again = VideoFeatureExtractor.load(str(path))
    assert torch.allclose(again(held["latents"][:4]), model(held["latents"][:4]), atol=1e-5)
    # cache hit: loads instead of training (zero steps would otherwise give chance accuracy)
    cached = train_feature_extractor(None, steps=0, cache_path=str(path))
    assert classifier_accuracy(cached, held["latents"], held["class_id"]) == acc


def noisy_fd_scale(videos, model):
    """Total feature variance: the natural scale of the Frechet distance for these videos."""
    with torch.no_grad():
        f, _ = model.features_and_logits(videos)
    return float(f.double().var(0).sum())


def test_evaluate_samples(extractor):
    model, _ = extractor
    b = next(build_dataset(DataConfig(seed=7), batch_size=32))
    teacher, cls = b["latents"], b["class_id"]
    same = evaluate_samples(teacher, teacher, cls, model)
    assert same["mse"] == 0 and same["fd"] < 1e-3 * noisy_fd_scale(teacher, model) and same["psnr"] > 100
    assert len(same["mse_per_frame"]) == 8 and same["motion_acc_teacher"] > 0.5
    noisy = evaluate_samples(teacher + 0.3 * torch.randn_like(teacher), teacher, cls, model)
    worse = evaluate_samples(teacher.flip(2), teacher, cls, model)  # time-reversed: wrong motion
    assert noisy["mse"] > 0 and math.isfinite(noisy["psnr"]) and noisy["fd"] > 0
    assert worse["motion_acc_student"] < same["motion_acc_student"] - 0.4
    plain = evaluate_samples(teacher, teacher, cls)
    assert "fd" not in plain and plain["mse"] == 0


def test_video_writers(tmp_path):
    b = next(build_dataset(DataConfig(), batch_size=4))
    for name in ("one.gif", "one.mp4"):
        path = write_video(str(tmp_path / name), b["latents"][0], scale=2)
        frames = read_video(path)
        assert frames.shape == (8, 64, 64, 3)
        want = ((b["latents"][0, :, 0].permute(1, 2, 0) + 1) * 127.5).numpy()
        err = np.abs(frames[0, ::2, ::2].astype(float) - want).mean()
        assert err < (12 if path.endswith(".gif") else 20)  # lossy codecs, but the same picture
    grid = read_video(write_video(str(tmp_path / "grid.gif"), b["latents"], scale=1))
    assert grid.shape[0] == 8 and grid.shape[1] > 64
    with StreamingVideoWriter(str(tmp_path / "stream.gif"), scale=1) as w:
        for t in range(0, 8, 2):
            w.append(b["latents"][0, :, t:t + 2])  # chunks as they arrive
        w.append(b["latents"][0, :, 0])  # a single frame
    assert w.frames_written == 9 and read_video(w.path).shape == (9, 32, 32, 3)
