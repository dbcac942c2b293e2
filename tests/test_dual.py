"""Each tangent rule against torch.func.jvp of the same primal function (float64)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from megatron_rcm.ops import dual


def _check(rule, primal_fn, *primals):
    tangents = [torch.randn_like(p) for p in primals]
    y, ty = rule(*[v for pair in zip(primals, tangents) for v in pair])
    ry, rty = torch.func.jvp(primal_fn, tuple(primals), tuple(tangents))
    assert rel_err(y, ry) < 1e-13
    assert rel_err(ty, rty) < 1e-11


X = lambda: torch.randn(3, 5, 16, dtype=torch.float64)  # noqa: E731


def test_layer_norm():
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    _check(lambda x, tx: dual.layer_norm(x, tx, w, b, 1e-6), lambda x: F.layer_norm(x, (16,), w, b, 1e-6), X())
    _check(lambda x, tx: dual.layer_norm(x, tx, eps=1e-6), lambda x: F.layer_norm(x, (16,), eps=1e-6), X())


def test_rms_norm():
    w = torch.randn(16, dtype=torch.float64)
    _check(lambda x, tx: dual.rms_norm(x, tx, w, 1e-6), lambda x: F.rms_norm(x, (16,), w, 1e-6), X())


def test_layer_norm_without_a_tangent_equals_the_primal_of_the_tangent_path():
    """Tangent-free LayerNorms take torch's own kernel: the same values as the primal of the dual formulas."""
    w, b, x = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64), X()
    tx = torch.randn_like(x)
    for fast, dual_path in ((dual.layer_norm(x, None, w, b, 1e-6), dual.layer_norm(x, tx, w, b, 1e-6)),
                            (dual.layer_norm(x, None, eps=1e-6), dual.layer_norm(x, tx, eps=1e-6))):
        assert fast[1] is None and rel_err(fast[0], dual_path[0]) < 1e-14
    half = x.to(torch.bfloat16)  # computed in fp32, returned in the input's dtype
    y, _ = dual.layer_norm(half, None, w.float(), b.float(), 1e-6)
    assert y.dtype == torch.bfloat16 and rel_err(y, F.layer_norm(x, (16,), w, b, 1e-6)) < 1e-2


def test_tangent_free_paths_equal_the_primal_of_the_tangent_path():
    """rms_norm, modulate and gated_residual take one-kernel paths without a tangent (F.rms_norm, addcmul): in
    float64 they equal the dual formulas' primal; in bf16 with an fp32 gate / weight (autocast's residual stream)
    within one bf16 rounding of it, in the same dtype."""
    w, x, tx = torch.randn(16, dtype=torch.float64), X(), X()
    sh, sc, g = X()[:, :1], X()[:, :1], X()[:, :1]
    cases = [(lambda *a: dual.rms_norm(a[0], a[1], w, 1e-6), (x,)),
             (lambda *a: dual.modulate(a[0], a[1], a[2], a[3], a[4], a[5]), (x, sh, sc)),
             (lambda *a: dual.gated_residual(a[0], a[1], a[2], a[3], a[4], a[5]), (x, X(), g))]
    for fn, primals in cases:
        fast, _ = fn(*[v for p in primals for v in (p, None)])
        slow, _ = fn(*[v for p in primals for v in (p, torch.randn_like(p))])
        assert rel_err(fast, slow) < 1e-14
    half = x.to(torch.bfloat16)
    for fast, slow in ((dual.rms_norm(half, None, w.float(), 1e-6)[0], dual.rms_norm(half, tx, w.float(), 1e-6)[0]),
                       (dual.gated_residual(half, None, half, None, g.float(), None)[0],
                        dual.gated_residual(half, tx, half, tx, g.float(), tx)[0])):
        assert fast.dtype == slow.dtype == torch.bfloat16
        assert ((fast.float() - slow.float()).abs() <= slow.float().abs() * 2**-7 + 1e-30).all()


def test_rope_equals_the_pairwise_rotation():
    """apply_rope's (pair * cos + swapped pair * signed sin) is the rotation of each interleaved pair."""
    from megatron_rcm.models.rope import apply_rope, grid_positions, rope_angles, rope_tables

    pos = grid_positions(2, 3, 4, frame_offset=5)
    q = torch.randn(2, pos.shape[0], 3, 24, dtype=torch.float64)
    ang = rope_angles(pos, 24)
    x1, x2 = q[..., 0::2], q[..., 1::2]
    c, s = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
    ref = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    assert rel_err(apply_rope(q, *rope_tables(pos, 24, torch.float64)), ref) < 1e-14


@pytest.mark.parametrize("name", ["gelu_tanh", "silu"])
def test_activations(name):
    ref = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}[name]
    _check(getattr(dual, name), ref, X() * 3)


def test_linear_modulate_residual():
    w, b = torch.randn(7, 16, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    _check(lambda x, tx: dual.linear(x, tx, w, b), lambda x: F.linear(x, w, b), X())
    _check(dual.modulate, lambda x, sh, sc: x * (1 + sc) + sh, X(), X(), X())
    _check(dual.gated_residual, lambda x, br, g: x + br * g, X(), X(), X())


def test_sinusoidal_embedding_matches_diffusers_and_its_derivative():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.rand(6, dtype=torch.float64) * 1000
    y, _ = dual.sinusoidal_embedding(t.float(), None, 32)
    ref = get_timestep_embedding(t.float(), 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert rel_err(y, ref) < 1e-6
    _check(lambda a, ta: dual.sinusoidal_embedding(a, ta, 32),
           lambda a: dual.sinusoidal_embedding(a, None, 32)[0], t)
