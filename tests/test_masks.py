"""Mask representation: dense expansion, tile summaries and the causal semantics of each builder."""
import math
import random

import pytest
import torch

from megatron_rcm.ops.masks import (TILE_FULL, TILE_PARTIAL, TILE_SKIP, ChunkVisibility, GroupMask,
                                    block_causal_mask, full_mask, kv_cache_mask, teacher_forcing_mask)


def _tile_summary_from_dense(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    tq, tk = math.ceil(dense.shape[0] / bq), math.ceil(dense.shape[1] / bk)
    out = torch.empty(tq, tk, dtype=torch.int8)
    for i in range(tq):
        for j in range(tk):
            tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = TILE_FULL if tile.all() else (TILE_SKIP if not tile.any() else TILE_PARTIAL)
    return out


@pytest.mark.parametrize("trial", range(25))
def test_tile_summary_matches_dense_on_random_group_layouts(trial):
    rng = random.Random(trial)
    g = rng.randint(1, 6)
    sq, sk = rng.randint(1, 90), rng.randint(1, 90)
    # contiguous runs most of the time (like real masks), shuffled ids sometimes
    qg = torch.sort(torch.randint(0, g, (sq,))).values if trial % 3 else torch.randint(0, g, (sq,))
    kg = torch.sort(torch.randint(0, g, (sk,))).values if trial % 4 else torch.randint(0, g, (sk,))
    allow = torch.rand(g, g) < rng.random()
    m = GroupMask(qg, kg, allow)
    bq, bk = rng.choice([1, 4, 7, 16, 64]), rng.choice([1, 5, 8, 32, 128])
    assert torch.equal(m.tile_summary(bq, bk), _tile_summary_from_dense(m.dense(), bq, bk))
    assert m.density() == pytest.approx(m.dense().double().mean().item())


@pytest.mark.parametrize("builder", [block_causal_mask, teacher_forcing_mask])
@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("vis", [ChunkVisibility(), ChunkVisibility(window=2), ChunkVisibility(window=2, sink=1)])
def test_tile_summary_matches_dense_on_causal_masks(builder, chunk, vis):
    m = builder(6, 13, chunk, vis)  # 13 tokens per frame: tiles straddle frames
    for bq, bk in [(16, 16), (64, 32), (13, 26)]:
        assert torch.equal(m.tile_summary(bq, bk), _tile_summary_from_dense(m.dense(), bq, bk))


def _frame_of(num_frames, tpf):
    return torch.arange(num_frames).repeat_interleave(tpf)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_block_causal_semantics(chunk):
    f, tpf = 8, 3
    d = block_causal_mask(f, tpf, chunk).dense()
    c = _frame_of(f, tpf) // chunk
    assert torch.equal(d, c[:, None] >= c[None, :])


@pytest.mark.parametrize("chunk", [1, 2])
def test_teacher_forcing_semantics(chunk):
    f, tpf = 6, 2
    d = teacher_forcing_mask(f, tpf, chunk).dense()
    c = _frame_of(f, tpf) // chunk
    n = f * tpf
    clean_clean, clean_noisy = d[:n, :n], d[:n, n:]
    noisy_clean, noisy_noisy = d[n:, :n], d[n:, n:]
    assert torch.equal(clean_clean, c[:, None] >= c[None, :])
    assert not clean_noisy.any(), "clean tokens must never see noisy ones"
    assert torch.equal(noisy_clean, c[:, None] > c[None, :])
    assert torch.equal(noisy_noisy, c[:, None] == c[None, :])


def test_teacher_forcing_mask_is_about_half_empty_at_wan_scale():
    m = teacher_forcing_mask(21, 1560, 1)
    summary = m.tile_summary(128, 128)  # no S x S tensor is built
    kept = (summary != TILE_SKIP).double().mean().item()
    assert 0.2 < kept < 0.35  # ~26% of the tiles at 21 chunks
    assert m.density() == pytest.approx((21 * 22 / 2 + 21 * 20 / 2 + 21) / (4 * 21 * 21), rel=1e-9)


def test_window_and_sink_visibility():
    vis = ChunkVisibility(window=2, sink=1)
    mat = vis.matrix(5)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(mat, expected)
    assert vis.visible_chunks(4) == [0, 3, 4]


@pytest.mark.parametrize("vis", [ChunkVisibility(), ChunkVisibility(window=3, sink=1)])
def test_kv_cache_mask_equals_rows_of_block_causal_mask(vis):
    f, tpf, chunk = 8, 5, 2
    full = block_causal_mask(f, tpf, chunk, vis).dense()
    tpc = tpf * chunk
    for cur in range(f // chunk):
        cached = list(range(cur))
        m = kv_cache_mask(cached, tpc, cur, visibility=vis).dense()
        rows = full[cur * tpc:(cur + 1) * tpc, : (cur + 1) * tpc]
        assert torch.equal(m, rows)


def test_kv_cache_mask_of_an_endless_stream_has_groups_only_for_the_chunks_present():
    """Chunk 10^6 of a rolling stream: the mask is as small as the cache (groups renumbered), and its dense form
    is the visibility rule (here with a kept chunk the window hides: masked)."""
    vis = ChunkVisibility(window=3, sink=1)
    cached = [0, 999_996, 999_998, 999_999]
    m = kv_cache_mask(cached, 2, 1_000_000, visibility=vis)
    assert m.allow.shape == (5, 5)
    expected = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool).expand(2, -1)
    assert torch.equal(m.dense(), expected)


def test_full_mask_and_is_full():
    assert full_mask(7, 9).dense().all()
    assert full_mask(4).is_full()
    assert not block_causal_mask(4, 2).is_full()
    assert block_causal_mask(1, 5).is_full()


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="8 latent frames are not a whole number of chunks"):
        block_causal_mask(8, 4, 3)
    with pytest.raises(ValueError, match="outside"):
        GroupMask(torch.tensor([0, 3]), torch.tensor([0]), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="window"):
        ChunkVisibility(window=-1)
    with pytest.raises(ValueError, match="current chunk"):
        kv_cache_mask([0, 2], 4, 2)
