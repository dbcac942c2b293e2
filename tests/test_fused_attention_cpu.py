"""CPU-side checks of the fused attention backend: mask packing, dispatch fallback, build hook."""
import gc
import os

import torch

from conftest import load_script
from megatron_rcm.ops import attention as A
from megatron_rcm.ops import fused_attention as fa
from megatron_rcm.ops import masks as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_build():
    return load_script("csrc/build.py")


def test_pack_mask_matches_tile_summary_and_caches():
    mask = M.teacher_forcing_mask(3, 130, 1)
    m = fa.pack_mask(mask, 780, 780, fa.JVP_TILES, "cpu")
    g = m.num_groups
    assert m.rows_grow  # teacher-forcing rows get longer towards the end
    assert m.q_groups.dtype == torch.int32 and m.k_groups.dtype == torch.int32
    assert m.allow.dtype == torch.uint8 and m.allow.shape == (g * g,) and g == mask.num_groups
    assert torch.equal(m.allow.bool().view(g, g), mask.allow)
    bq, bk = fa.JVP_TILES
    assert m.tiles.dtype == torch.int8 and m.tiles.shape == (-(-780 // bq), -(-780 // bk))
    assert torch.equal(m.tiles, mask.tile_summary(*fa.JVP_TILES))
    again = fa.pack_mask(mask, 780, 780, fa.JVP_TILES, "cpu")
    assert again.tiles is m.tiles  # cached per mask object
    other = fa.pack_mask(mask, 780, 780, fa.FWD_TILES, "cpu")
    assert other.tiles.shape == (-(-780 // fa.FWD_TILES[0]), -(-780 // fa.FWD_TILES[1]))


def _unpack_bits(words: torch.Tensor, g: int) -> torch.Tensor:
    w = words.view(g, -1).long() & 0xFFFFFFFF
    return ((w[:, :, None] >> torch.arange(32)) & 1).reshape(g, -1).bool()


def test_pair_bits_give_each_token_its_dense_mask_row_or_column():
    """The sm_90a kernels' element mask: the key bits of row q_groups[q] are row q of the dense mask and the query
    bits of row k_groups[k] its column k, then zeros up to the tile grid (so a token past the end is masked
    too), in an even number of words per group."""
    g = torch.Generator().manual_seed(3)
    masks = [M.teacher_forcing_mask(6, 37, 2), M.block_causal_mask(4, 61, 1), M.full_mask(90, 203),
             M.kv_cache_mask([0, 2, 3], 50, 4, num_query_tokens=50)]
    groups = 7  # random groups and allow matrix: bits at every position of a word, the sign bit included
    masks.append(M.GroupMask(torch.randint(0, groups, (150,), generator=g), torch.randint(0, groups, (333,), generator=g),
                             torch.rand(groups, groups, generator=g) < 0.5))
    for mask in masks:
        sq, sk = mask.shape
        dense = mask.dense()
        for tiles in (fa.SM90_FWD_TILES, fa.SM90_JVP_TILES, fa.SM90_BWD_TILES):
            m = fa.pack_mask(mask, sq, sk, tiles, "cpu")
            for bits, n, tokens, side in ((m.key_bits, sk, m.tiles.shape[1] * tiles[1], dense),
                                          (m.query_bits, sq, m.tiles.shape[0] * tiles[0], dense.t())):
                words = tokens // 32
                assert bits.dtype == torch.int32 and bits.numel() == m.num_groups * words and words % 2 == 0
                unpacked = _unpack_bits(bits, m.num_groups)
                rows = (m.q_groups if side is dense else m.k_groups).long()
                assert torch.equal(unpacked[rows, :n], side) and not unpacked[:, n:].any()
    full = fa.pack_mask(None, 100, 70, fa.SM90_FWD_TILES, "cpu")
    assert _unpack_bits(full.key_bits, 1)[0].tolist() == [True] * 70 + [False] * 122
    assert _unpack_bits(full.query_bits, 1)[0].tolist() == [True] * 100 + [False] * 28
    try:
        fa.pair_bitmap(torch.ones(1, 1, dtype=torch.bool), torch.zeros(70, dtype=torch.int32), 64)
    except ValueError:
        pass
    else:
        raise AssertionError("a bitmap shorter than the tokens was accepted")


def test_longest_rows_first_only_for_growing_rows_and_short_launches():
    assert fa.rows_grow(M.block_causal_mask(4, 64, 1).tile_summary(64, 64))
    assert not fa.rows_grow(M.full_mask(300).tile_summary(64, 64))
    assert not fa.rows_grow(torch.tensor([[1, 1], [1, 0]], dtype=torch.int8))  # rows shrink: keep launch order
    sms = 132
    assert fa.cta_order(True, 74 * 12, sms) == 1  # block-causal 9,360 tokens, 12 heads: 6.7 waves
    assert fa.cta_order(True, 256 * 12, sms) == 0  # 32,760 tokens: 23 waves, heads stay apart (L2)
    assert fa.cta_order(False, 74 * 12, sms) == 0  # equal rows: nothing to balance
    assert fa.cta_order(True, fa.LONGEST_FIRST_MAX_WAVES * sms, sms) == 1
    assert fa.cta_order(True, fa.LONGEST_FIRST_MAX_WAVES * sms + 1, sms) == 0
    m = fa.pack_mask(M.block_causal_mask(4, 64, 1), 256, 256, fa.FWD_TILES, "cpu")
    assert m.rows_grow and fa.forward_order(False, m, torch.empty(1, 256, 2, 64)) == 0  # mma.sync: launch order


def test_pack_cache_entry_dies_with_mask():
    mask = M.block_causal_mask(2, 100, 1)
    fa.pack_mask(mask, 200, 200, fa.FWD_TILES, "cpu")
    key = id(mask)
    assert key in fa._PACK_CACHE
    del mask
    gc.collect()
    assert key not in fa._PACK_CACHE


def test_pack_cache_entry_dies_with_mask_and_its_device_copy():
    mask = M.block_causal_mask(2, 100, 1)
    on = mask.to("meta")
    fa.pack_mask(on, 200, 200, fa.FWD_TILES, "meta")
    key = id(mask)
    assert key in fa._PACK_CACHE and on.host() is mask
    del mask, on
    gc.collect()
    assert key not in fa._PACK_CACHE


def test_pack_none_mask_is_full_and_shape_checked():
    m = fa.pack_mask(None, 100, 70, fa.FWD_TILES, "cpu")
    assert m.num_groups == 1 and not m.rows_grow
    assert (m.tiles == M.TILE_FULL).all() and m.tiles.shape == (-(-100 // fa.FWD_TILES[0]), 2)
    for sq, sk in ((100, 70), (128, 256), (1, 1)):  # filled in place: the same as packing a full mask
        for tiles in (fa.FWD_TILES, fa.SM90_FWD_TILES, fa.SM90_BWD_TILES):
            filled, packed = fa.pack_mask(None, sq, sk, tiles, "cpu"), fa.pack_mask(M.full_mask(sq, sk), sq, sk, tiles,
                                                                                   "cpu")
            for a, b in zip(filled, packed):
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    try:
        fa.pack_mask(M.full_mask(10), 11, 10, fa.FWD_TILES, "cpu")
    except ValueError:
        pass
    else:
        raise AssertionError("shape mismatch not caught")


def test_kv_cache_mask_tiles_skip_hidden_chunks():
    mask = M.kv_cache_mask([0, 1, 2, 3], 64, 4, visibility=M.ChunkVisibility(window=2, sink=1))
    tiles = fa.pack_mask(mask, 64, 320, fa.FWD_TILES, "cpu").tiles
    assert tiles.tolist() == [[M.TILE_FULL, M.TILE_SKIP, M.TILE_SKIP, M.TILE_FULL, M.TILE_FULL]]


def test_dispatch_falls_back_on_cpu():
    x = torch.randn(1, 8, 2, 64)
    assert A.resolve_backend("auto", x).name == "sdpa"
    assert not fa.fused_available(x)
    assert not fa.fused_available(x.to(torch.bfloat16))
    if torch.cuda.is_available():
        return
    assert fa._C is None and "fused" not in A.available_backends()


def test_build_hook_returns_nothing_without_cuda():
    build = _load_build()
    if torch.version.cuda is None:
        assert build.get_extensions() == []
    assert [os.path.basename(p) for p in build.source_paths()] == ["fused_attention.cpp", "fused_attention_kernels.cu"]
    assert all(os.path.exists(p) for p in build.source_paths(with_sm90=True))
    assert os.path.basename(build.source_paths(with_sm90=True)[-1]) == "fused_attention_sm90.cu"
    assert build.EXT_NAME == "megatron_rcm._fused_attention_C"


def test_sm90_kernels_need_cutlass_headers_and_an_sm90a_target(tmp_path, monkeypatch):
    build = _load_build()
    assert not build.sm90_enabled(None, None)  # no headers: never
    assert build.sm90_enabled(None, "/inc")  # default arch flags include sm_90a
    assert build.sm90_enabled("8.0;9.0a", "/inc")
    assert not build.sm90_enabled("8.0;9.0", "/inc")  # plain sm_90 cannot run wgmma kernels
    assert build.SM90A_ARCH in build.arch_flags(True) and build.SM90_ARCH in build.arch_flags(False)
    # CUTLASS_PATH is honoured when it holds cute/tensor.hpp (either the root or its include/)
    (tmp_path / "include" / "cute").mkdir(parents=True)
    (tmp_path / "include" / "cute" / "tensor.hpp").write_text("")
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    assert build.cutlass_include() == str(tmp_path / "include")


def test_sm90_path_is_not_chosen_on_cpu():
    x = torch.randn(1, 8, 2, 64).to(torch.bfloat16)
    assert not fa.use_sm90(x, x, x)
    mask = M.block_causal_mask(2, 4, 1)
    for kind, tiles in (("fwd", fa.FWD_TILES), ("jvp", fa.JVP_TILES), ("bwd", fa.BWD_TILES)):
        sm90, packed = fa.kernel_and_mask(kind, mask, x, x, x, None)
        assert not sm90 and torch.equal(packed[3], mask.tile_summary(*tiles).to(torch.int8))


def test_tile_constants_match_header():
    text = open(os.path.join(ROOT, "csrc", "fused_attention_kernels.cuh")).read()
    for name, (bq, bk) in (("FWD", fa.FWD_TILES), ("JVP", fa.JVP_TILES), ("BWD", fa.BWD_TILES)):
        assert f"{name}_BQ = {bq}, {name}_BK = {bk};" in text
    assert fa.SM90_FWD_TILES[0] == fa.SM90_JVP_TILES[0]
    assert (f"SM90_BQ = {fa.SM90_FWD_TILES[0]}, SM90_FWD_BK = {fa.SM90_FWD_TILES[1]}, "
            f"SM90_JVP_BK = {fa.SM90_JVP_TILES[1]};") in text
