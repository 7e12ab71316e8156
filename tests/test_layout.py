"""Token layouts and the causal block rules, checked exhaustively against global positions."""
import pytest
import torch

from seqpar.layout import LAYOUTS, TokenLayout, block_pairs


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("outer,inner,chunks", [(1, 1, 1), (4, 1, 1), (2, 2, 1), (3, 2, 1), (1, 4, 2), (2, 2, 3)])
def test_shard_unpermute_roundtrip(kind, outer, inner, chunks):
    layout = TokenLayout(kind, outer, inner, chunks)
    n = layout.granularity() * 2
    x = torch.arange(n).view(1, n, 1) * 10
    shards = [layout.shard(x, r) for r in range(layout.size)]
    assert all(s.shape[1] == n // layout.size for s in shards)
    assert torch.equal(layout.unpermute(torch.cat(shards, 1)), x)
    assert torch.equal(torch.sort(layout.all_indices(n)).values, torch.arange(n))


def test_known_layouts():
    assert TokenLayout("zigzag", 2).local_indices(8, 0).tolist() == [0, 1, 6, 7]
    assert TokenLayout("zigzag", 2).local_indices(8, 1).tolist() == [2, 3, 4, 5]
    assert TokenLayout("striped", 4).local_indices(8, 1).tolist() == [1, 5]
    # USP: ring rank 1 of 2 takes zigzag chunks 1 and 2, its 2 Ulysses ranks split them.
    usp = TokenLayout("zigzag", outer=2, inner=2)
    assert usp.local_indices(16, 2).tolist() == [4, 5, 6, 7] and usp.local_indices(16, 3).tolist() == [8, 9, 10, 11]
    # FPDT: 2 chunks, 2 ranks -> rank r holds piece r of every chunk.
    assert TokenLayout("contiguous", 1, 2, chunks=2).local_indices(8, 1).tolist() == [2, 3, 6, 7]


def test_bad_lengths_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by 8"):
        TokenLayout("zigzag", 4).check(12)
    with pytest.raises(ValueError, match="unknown layout"):
        TokenLayout("spiral", 2)
    with pytest.raises(ValueError, match=">= 1"):
        TokenLayout("contiguous", 0)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("outer", [2, 3, 4])
def test_block_pairs_cover_exactly_the_causal_mask(kind, outer):
    """Union of the blocks of every (q rank, kv rank) pair == position-based causal mask."""
    layout = TokenLayout(kind, outer)
    n = layout.granularity() * 2
    local = n // outer
    for qr in range(outer):
        q_pos = layout.local_indices(n, qr)
        for kr in range(outer):
            k_pos = layout.local_indices(n, kr)
            want = k_pos[None, :] <= q_pos[:, None]
            got = torch.zeros(local, local, dtype=torch.int64)
            for q_rows, kv_rows, causal in block_pairs(kind, True, qr, kr, local):
                block = torch.ones(local, local, dtype=torch.int64)[q_rows, kv_rows]
                if causal:
                    assert block.shape[0] == block.shape[1]
                    block = block.tril()
                got[q_rows, kv_rows] += block
            assert got.max() <= 1, "a key was counted twice"
            assert torch.equal(got.bool(), want), (kind, qr, kr)
    assert block_pairs(kind, False, 0, 1, 4) == [(slice(None), slice(None), False)]
