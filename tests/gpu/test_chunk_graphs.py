"""GPU: streams whose chunk forwards replay CUDA graphs equal the same streams run eagerly (network/chunk_graphs.py)."""
import pytest
import torch

from megatron_rcm.config.model import CausalConfig, model_preset
from megatron_rcm.inference.streaming import StreamConfig, stream_video
from megatron_rcm.models import build_model
from megatron_rcm.network import Condition
from megatron_rcm.network.chunk_graphs import ChunkGraphs
from megatron_rcm.ops import fusion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _model(window=2, sink=1):
    torch.manual_seed(0)
    cfg = model_preset("small", num_layers=2, param_dtype="bfloat16", text_len=16)  # head dim 128: the fused kernel
    return build_model(cfg, CausalConfig(chunk_frames=2, window_chunks=window, sink_chunks=sink)).cuda().eval()


def _ctx(model, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, 16, model.cfg.text_dim, device="cuda", generator=g, dtype=torch.bfloat16)


def _video(model, ctx, graphs: bool, condition_at=None, **options):
    g = torch.Generator(device="cuda").manual_seed(3)
    cfg = StreamConfig(steps=2, cuda_graphs=graphs, **options)
    out = stream_video(model, ctx, 16, 16, 16, cfg, generator=g, condition_at=condition_at)
    return torch.cat([o.frames for o in out], dim=2)


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compiled(request):
    fusion.set_enabled(request.param)
    yield request.param
    fusion.set_enabled(False)


@pytest.mark.parametrize("rope", ["rebase", "absolute"])
def test_graphed_stream_equals_eager(compiled, rope):
    """8 chunks of 2 frames past a window of 2 + 1 sink, two prompts in a row (the second video replays the first
    one's graphs), then a prompt switch with re-cache mid-stream."""
    model = _model()
    options = dict(rope_policy=rope, trained_frames=6)
    graphs = ChunkGraphs.of(model)
    for seed in (1, 2):
        ctx = _ctx(model, seed)
        ref = _video(model, ctx, False, **options)
        before = graphs.captured
        got = _video(model, ctx, True, **options)
        assert rel(got, ref) < 2e-3, seed
        if seed == 2:
            assert graphs.captured == before and graphs.replayed > 0
    other = Condition(_ctx(model, 9))

    def at(chunk):
        return other if chunk >= 5 else Condition(ctx)

    ref = _video(model, ctx, False, condition_at=at, **options)
    got = _video(model, ctx, True, condition_at=at, **options)
    assert rel(got, ref) < 2e-3


def test_auto_inference_attention_takes_cudnn_and_equals_the_reference():
    """Full-mask forwards autograd does not record go to cuDNN on Hopper; masked or recorded ones stay fused;
    all agree with the float64 reference."""
    from megatron_rcm.ops import attention as A
    from megatron_rcm.ops.attention_reference import attention_reference
    from megatron_rcm.ops.masks import block_causal_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for n in (96, 288, 288))
    ref = attention_reference(q.double(), k.double(), v.double())
    with torch.no_grad():
        cudnn = A._cudnn_inference(q, k, v, None, 128 ** -0.5)
        out = A.attention(q, k, v)
    if torch.cuda.get_device_capability() == (9, 0):
        assert cudnn is not None and torch.equal(out, cudnn)
    assert rel(out, ref) < 1e-2
    qr = q.clone().requires_grad_()
    assert A._cudnn_inference(qr, k, v, None, 1.0) is None  # recorded: the fused kernel (and its backward)
    mask = block_causal_mask(6, 48, 2)  # 288 tokens
    assert A._cudnn_inference(k, k, v, mask, 1.0) is None
    with torch.no_grad():
        masked = A.attention(k, k, v, mask)
    assert rel(masked, attention_reference(k.double(), k.double(), v.double(), mask=mask.to("cuda"))) < 1e-2
