"""GPU: FSDP2 on NCCL with the compiled elementwise chains, fp32 and bf16 compute (tests/gpu/_fsdp_worker.py).

On CPU the same layouts are checked against one process in float64 with gloo (tests/parallel/); what only a
GPU runs is here: NCCL collectives, ``torch.compile`` of the fused chains inside FSDP units, the fused attention
kernel and bf16 compute under FSDP's mixed-precision policy. One GPU: FSDP2 of size 1; all visible GPUs (up to
4): DP over them.
"""
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))


@pytest.mark.parametrize("gpus", [1, 2])
def test_fsdp2_matches_the_plain_model_on_gpu(gpus, tmp_path):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    from _launch_ranks import launch

    errors = launch("../gpu/_fsdp_worker.py", gpus, [], timeout=600)  # (a path from tests/parallel)
    assert not errors, "\n".join(errors[:20])
