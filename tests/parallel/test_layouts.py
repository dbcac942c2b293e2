"""Every parallel layout reproduces the single-process model: output, JVP tangent, loss, gradients
and parameters after one AdamW step (float64, gloo, 2-4 local processes), for frame-wise,
chunk-wise and teacher-forcing masks; plus gradient accumulation (``accum``) and KV-cached
streaming (``cache``), the sCM objective's loss and gradients (``scm``, teacher with CFG), the
image-to-video layout (``image``: image tokens through the added cross-attention K/V, teacher forcing) and
checkpointed blocks keeping their attention outputs (``ckpt``, against the plain single process).
Layout strings are ``tp x cp x dp [x pp]``, with ``f`` appended for FSDP2 over the data x context ranks
(``skip``: a grad-enabled forward dropped without backward first, as the trainer's non-finite skip does;
``mp``: bf16 compute / fp32 reduction against the fp32 model) and ``g`` for the GPipe schedule (default
1F1B); ``plan``: the memory planner's parameters per rank and one block's saved activations, exactly.
FSDP2 composed with TP2 and PP2 runs in the trainer tests. A failure lists layout, mask and the
differing tensor."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _launch_ranks import launch  # noqa: E402

MASKS = "frame,chunk,tf"


@pytest.mark.parametrize("nprocs,layout,kinds", [
    (1, "1x1x1", "frame,accum,plan"),  # one process: every hook is a no-op
    (2, "2x1x1", MASKS + ",scm,image,plan,ckpt"),  # TP2 (+ sCM loss, I2V layout, the memory planner's per-rank counts)
    (2, "1x2x1", MASKS + ",accum,cache,cache_first,scm,image,plan,ckpt"),  # CP2 (+ grad accumulation, KV cache, sCM, I2V)
    (2, "1x1x2", MASKS),  # DP2, ZeRO-1 AdamW
    (4, "2x2x1", MASKS + ",accum,cache,cache_first,scm"),  # TP2 x CP2
    (4, "2x1x2", "tf"),  # TP2 x DP2
    (4, "1x2x2", "chunk,tf"),  # CP2 x DP2
    (2, "1x1x1x2", MASKS + ",plan,ckpt"),  # PP2 (1F1B, 2 micro-batches)
    (4, "2x1x1x2", "tf"),  # TP2 x PP2
    (4, "1x2x1x2", "tf"),  # CP2 x PP2
    (4, "1x1x2x2", "frame"),  # DP2 x PP2
    (8, "2x2x1x2", "tf"),  # TP2 x CP2 x PP2 (issue 8's 3-D layout, on CPU)
    (2, "1x1x2f", MASKS + ",accum,cache,skip,mp,plan,ckpt"),  # FSDP2 over DP2
    (2, "1x2x1f", "tf,cache,scm"),  # FSDP2 over the context ranks (gradients summed, not averaged)
    (2, "1x1x1x2g", "tf"),  # PP2 under GPipe
], ids=["single", "tp2", "cp2", "dp2", "tp2-cp2", "tp2-dp2", "cp2-dp2", "pp2", "tp2-pp2", "cp2-pp2", "dp2-pp2",
        "tp2-cp2-pp2", "fsdp-dp2", "fsdp-cp2", "pp2-gpipe"])
def test_layout_matches_single_process(nprocs, layout, kinds):
    errors = launch("_worker.py", nprocs, [layout, kinds], timeout=150)
    assert not errors, f"layout tp x cp x dp [x pp] = {layout}:\n" + "\n".join(errors[:30])
