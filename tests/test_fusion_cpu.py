"""CPU: the fusion switch never changes CPU results and leaves calls eager (compiled only on CUDA)."""
import torch

from megatron_rcm.ops import dual, fusion


def test_fusable_stays_eager_off_cuda(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    x, tx = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    ref = dual.layer_norm.eager(x, tx)
    for flag in (False, True):
        fusion.set_enabled(flag)
        try:
            y, ty = dual.layer_norm(x, tx)
        finally:
            fusion.set_enabled(False)
        assert torch.equal(y, ref[0]) and torch.equal(ty, ref[1])
    assert compiled == []  # CPU tensors never reach torch.compile


def test_eager_if_keeps_collective_calls_eager():
    calls = []

    def reduce(ms, mxd):
        calls.append(1)
        return ms, mxd

    x, tx = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    y, ty = dual.rms_norm(x, tx, None, 1e-6, reduce=reduce)
    y2, ty2 = dual.rms_norm(x, tx, None, 1e-6)
    assert calls == [1] and torch.allclose(y, y2) and torch.allclose(ty, ty2)
