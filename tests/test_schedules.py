import math

import pytest
import torch

from megatron_rcm.diffusion.flow_matching import fm_noise, fm_x0_eps, sample_fm_times, time_shift, bcast
from megatron_rcm.diffusion.trigflow import (fm_from_trig, trig_from_fm, trig_F_from_v, v_from_trig_F, trig_x0,
                                             sample_trig_times)
from megatron_rcm.diffusion import samplers



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

M, Q = 0.3, 0.7  # analytic data x0 ~ N(M, Q^2) per element


def exact_v(x_s, s):
    """Exact FM velocity E[eps - x0 | x_s] at FM level s for Gaussian data (closed form)."""
    s = bcast(s, x_s)
    var = (1 - s) ** 2 * Q**2 + s**2
    dev = x_s - (1 - s) * M
    return s / var * dev - (M + (1 - s) * Q**2 / var * dev)


def exact_trig_dxdt(x_t, t, sd):
    c, n = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
    var = c**2 * Q**2 + n**2 * sd**2
    dev = x_t - c * M
    return -n * (M + c * Q**2 / var * dev) + c * sd * (n * sd / var * dev)


def test_fm_basics():
    x0, eps = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    s = torch.rand(2, 4)
    a, b = fm_x0_eps(fm_noise(x0, eps, s), eps - x0, s)
    assert torch.allclose(a, x0) and torch.allclose(b, eps)
    assert torch.allclose(time_shift(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    assert abs(float(time_shift(torch.tensor(0.5), 3.0)) - 0.75) < 1e-12
    for mode in ("uniform", "logit_normal"):
        s = sample_fm_times((1000,), mode, shift=3.0)
        assert s.min() > 0 and s.max() < 1 and s.mean() > 0.5


def test_trig_fm_time_roundtrip():
    for sd in (0.5, 1.0, 1.7):
        t = torch.rand(5, 3) * (math.pi / 2)
        assert torch.allclose(trig_from_fm(fm_from_trig(t, sd), sd), t)
        tt = sample_trig_times((10000,), sd, -0.8, 1.6)
        assert tt.min() > 0 and tt.max() < math.pi / 2


def test_fm_to_trigflow_exact_on_gaussian():
    """sigma_d F(x_t, t) from the exact FM velocity equals the exact TrigFlow velocity E[dx_t/dt | x_t]."""
    for sd in (0.5, 0.7, 1.0, 2.0):
        x_t = torch.randn(2, 3, 4, 2, 2) * 1.3
        t = torch.rand(2, 4) * 1.5 + 0.02
        D = bcast(torch.cos(t) + sd * torch.sin(t), x_t)
        v = exact_v(x_t / D, fm_from_trig(t, sd))
        F = trig_F_from_v(x_t, v, t, sd)
        assert torch.allclose(sd * F, exact_trig_dxdt(x_t, t, sd), atol=1e-12)
        assert torch.allclose(v_from_trig_F(x_t, F, t, sd), v, atol=1e-12)
        # consistency map with the exact F is the posterior mean E[x0 | x_t]
        c, n = bcast(torch.cos(t), x_t), bcast(torch.sin(t), x_t)
        post = M + c * Q**2 / (c**2 * Q**2 + n**2 * sd**2) * (x_t - c * M)
        assert torch.allclose(trig_x0(x_t, F, t, sd), post, atol=1e-12)


def _rk4(f, x, a, b, n=400):
    h = (b - a) / n
    for i in range(n):
        u = a + i * h
        k1 = f(x, u); k2 = f(x + h / 2 * k1, u + h / 2); k3 = f(x + h / 2 * k2, u + h / 2); k4 = f(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_fm_and_trigflow_odes_same_trajectory():
    sd = 0.6
    x_s = torch.randn(4, 1, 1, 1, 1)
    s_a, s_b = 0.9, 0.2
    fm_end = _rk4(lambda x, s: exact_v(x, torch.full((4, 1), s)), x_s, s_a, s_b)
    t_a, t_b = (float(trig_from_fm(torch.tensor(s), sd)) for s in (s_a, s_b))
    D = lambda t: math.cos(t) + sd * math.sin(t)
    trig_f = lambda x, t: sd * trig_F_from_v(x, exact_v(x / D(t), torch.full((4, 1), float(fm_from_trig(torch.tensor(t), sd)))), torch.full((4, 1), t), sd)
    trig_end = _rk4(trig_f, x_s * D(t_a), t_a, t_b)
    assert torch.allclose(trig_end / D(t_b), fm_end, atol=1e-9)


def test_samplers_on_gaussian():
    eps = torch.randn(64, 1, 2, 1, 1)
    truth = M + Q * eps  # the exact FM ODE maps noise eps to M + Q eps for Gaussian data
    for n in (12, 25):
        e1 = (samplers.euler_fm(exact_v, eps, n, shift=3.0) - truth).abs().max()
        e2 = (samplers.multistep2_fm(exact_v, eps, n, shift=3.0) - truth).abs().max()
        assert e2 < e1 / 2, (n, e1, e2)
    assert (samplers.multistep2_fm(exact_v, eps, 25, shift=1.0) - truth).abs().max() < 0.02
    assert (samplers.euler_fm(exact_v, eps, 400) - truth).abs().max() < 1e-2
    # 1-step CM sampling with the exact F from pure noise returns E[x0] = M
    sd = 0.8
    x0 = samplers.cm_sample(exact_v, eps * sd, sd, times=(math.pi / 2,))
    assert torch.allclose(x0, torch.full_like(x0, M), atol=1e-9)
    x0 = samplers.cm_sample(exact_v, eps * sd, sd, times=(math.pi / 2, 1.0, 0.5), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x0).all()
