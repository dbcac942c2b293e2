"""GPU: the frozen encoders in bf16 on CUDA (the `auto` dtype), and CPU offload gives the same numbers."""
import pytest
import torch

from fixtures.tiny_wan_pipeline import TEXT_LEN
from megatron_rcm.encoders import EncodersConfig, load_encoders

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_dtype_is_bf16_on_cuda_and_offload_matches(tiny_wan_pipeline):
    on = load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline)), device="cuda", text_len=TEXT_LEN)
    off = load_encoders(EncodersConfig(diffusers_dir=str(tiny_wan_pipeline), cpu_offload=True), device="cuda",
                        text_len=TEXT_LEN)
    assert on.vae.dtype == torch.bfloat16 and next(on.text.placement.module.parameters()).dtype == torch.bfloat16
    a, b = on.prompt_contexts(["a red cat runs"]), off.prompt_contexts(["a red cat runs"])
    assert a["context"].is_cuda and torch.equal(a["context"], b["context"])
    assert next(off.text.placement.module.parameters()).device.type == "cpu"  # offloaded between calls
    z = torch.randn(1, 4, 3, 4, 4, device="cuda")
    full = on.vae.decode(z)
    assert torch.equal(full, off.vae.decode(z)) and next(off.vae.module.parameters()).device.type == "cpu"
    streamed = on.vae.stream()
    parts = torch.cat([streamed.decode(z[:, :, :1]), streamed.decode(z[:, :, 1:])], dim=2)
    assert ((parts.float() - full.float()).abs().max() < 2e-2)  # bf16: chunked and full decode agree to rounding
