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
    with pytest.raises(ValueError, match="not divisible by 8 .* nearest valid lengths: 8 and 16"):
        TokenLayout("zigzag", 4).check(12)
    with pytest.raises(ValueError, match="shortest valid length: 8"):
        TokenLayout("zigzag", 4).check(4)
    with pytest.raises(ValueError, match="unknown layout"):
        TokenLayout("spiral", 2)
    with pytest.raises(ValueError, match=">= 1"):
        TokenLayout("contiguous", 0)


def _even_split(kind: str, outer: int, inner: int, chunks: int, n: int) -> bool:
    """Brute force, independent of granularity(): do the outer split (2*outer zigzag chunks,
    outer stripes or ranges) and the inner split (chunks*inner pieces of each outer list)
    all come out equal?"""
    tokens = torch.arange(n)
    if kind == "striped":
        outer_lists = [tokens[o::outer] for o in range(outer)]
    elif kind == "zigzag":
        parts = tokens.tensor_split(2 * outer)
        if len({len(p) for p in parts}) > 1:
            return False
        outer_lists = [torch.cat([parts[o], parts[2 * outer - 1 - o]]) for o in range(outer)]
    else:
        outer_lists = list(tokens.tensor_split(outer))
    if n == 0 or len({len(x) for x in outer_lists}) > 1:
        return False
    return len({len(p) for p in outer_lists[0].tensor_split(inner * chunks)}) == 1


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("outer,inner,chunks", [(1, 1, 1), (4, 1, 1), (2, 2, 1), (3, 2, 1), (2, 3, 1), (1, 4, 2),
                                                (2, 2, 3), (4, 2, 1), (2, 4, 1)])
def test_granularity_is_exactly_the_valid_lengths(kind, outer, inner, chunks):
    """check(n) passes iff the two-level split of n tokens is even; failures name the nearest
    valid lengths; every valid n shards into equal, disjoint pieces."""
    layout = TokenLayout(kind, outer, inner, chunks)
    g = layout.granularity()
    for n in range(0, 4 * g + 2):
        assert (layout.error(n) is None) == _even_split(kind, outer, inner, chunks, n), (n, layout.error(n))
        if layout.error(n) is None:
            assert torch.equal(torch.sort(layout.all_indices(n)).values, torch.arange(n))
            assert {layout.local_indices(n, r).numel() for r in range(layout.size)} == {n // layout.size}
        elif n > g:
            assert f"nearest valid lengths: {n // g * g} and {n // g * g + g}" in layout.error(n)


def test_usp_zigzag_granularity_is_lcm_not_product():
    assert TokenLayout("zigzag", 2, 2).granularity() == 4  # was 2*ring*ulysses = 8
    assert TokenLayout("zigzag", 2, 4).granularity() == 8  # was 16
    assert TokenLayout("zigzag", 4, 1).granularity() == 8  # ring alone: unchanged
    assert "nearest valid lengths: 508 and 512" in TokenLayout("zigzag", 2, 2).error(510)


def _coverage_errors(kind: str, outer: int, pairs_fn, n: int) -> list:
    """(q rank, kv rank) pairs whose blocks do not cover exactly the position-based causal mask."""
    layout = TokenLayout(kind, outer)
    local = n // outer
    bad = []
    for qr in range(outer):
        q_pos = layout.local_indices(n, qr)
        for kr in range(outer):
            k_pos = layout.local_indices(n, kr)
            want = k_pos[None, :] <= q_pos[:, None]
            got = torch.zeros(local, local, dtype=torch.int64)
            for q_rows, kv_rows, causal in pairs_fn(kind, True, qr, kr, local):
                block = torch.ones(local, local, dtype=torch.int64)[q_rows, kv_rows]
                if causal:
                    assert block.shape[0] == block.shape[1]
                    block = block.tril()
                got[q_rows, kv_rows] += block
            if got.max() > 1 or not torch.equal(got.bool(), want):  # a key counted twice, or mask differs
                bad.append((qr, kr))
    return bad


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("outer", [2, 3, 4])
def test_block_pairs_cover_exactly_the_causal_mask(kind, outer):
    """Union of the blocks of every (q rank, kv rank) pair == position-based causal mask, with
    >= 4 tokens per rank (at 2, striped's shifted diagonal block is 1x1 and its mask invisible)."""
    n = TokenLayout(kind, outer).granularity() * 4
    assert n // outer >= 4
    assert _coverage_errors(kind, outer, block_pairs, n) == []
    assert block_pairs(kind, False, 0, 1, 4) == [(slice(None), slice(None), False)]


def test_coverage_check_sees_a_missing_shifted_diagonal_mask():
    """The check above catches striped's shifted diagonal computed without its mask."""
    def unmasked(kind, causal, q_rank, kv_rank, n_local):
        pairs = block_pairs(kind, causal, q_rank, kv_rank, n_local)
        return [(q, kv, c and kv_rank <= q_rank) for q, kv, c in pairs]  # kv_rank > q_rank: mask dropped

    assert _coverage_errors("striped", 4, unmasked, 8) == []  # 2 tokens per rank: invisible
    assert _coverage_errors("striped", 4, unmasked, 16) != []  # 4 tokens per rank: caught
