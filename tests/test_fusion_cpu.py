"""CPU: the fusion switch never changes CPU results, and which calls would take the compiled path."""
import pytest
import torch

from megatron_rcm.ops import dual, fusion


class _LooksCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, to exercise the dispatch rule without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def recorder(monkeypatch):
    """torch.compile replaced by a recorder that returns the plain function (no compiler needed)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn.__name__) or fn)
    fusion.reset()
    yield seen
    fusion.set_enabled(False)
    fusion.reset()


def test_fusable_stays_eager_off_cuda_or_when_disabled(recorder):
    x, tx = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    ref = dual.layer_norm.eager(x, tx)
    for flag in (False, True):
        fusion.set_enabled(flag)
        y, ty = dual.layer_norm(x, tx)
        assert torch.equal(y, ref[0]) and torch.equal(ty, ref[1])
    assert recorder == []  # CPU tensors never reach torch.compile
    fusion.set_enabled(False)
    dual.layer_norm(x.as_subclass(_LooksCuda), None)
    assert recorder == []  # disabled: never compiled


def test_cuda_calls_compile_once_except_collective_ones(recorder):
    fusion.set_enabled(True)
    x = torch.randn(3, 8, dtype=torch.float64).as_subclass(_LooksCuda)
    tx = torch.randn(3, 8, dtype=torch.float64)
    dual.rms_norm(x, tx, None, 1e-6)
    dual.rms_norm(x, tx, None, 1e-6)  # cached: compiled once
    calls = []
    y, ty = dual.rms_norm(x, tx, None, 1e-6, reduce=lambda ms, mxd: calls.append(1) or (ms, mxd))
    assert recorder == ["rms_norm"]  # the collective-carrying call stayed eager
    assert calls == [1]
    y2, ty2 = dual.rms_norm.eager(x, tx, None, 1e-6)
    assert torch.allclose(y, y2) and torch.allclose(ty, ty2)
