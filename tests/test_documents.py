"""Packed documents (cu_seqlens): every strategy matches fp64 attention with the block-diagonal
document mask (out, lse, dq, dk, dv to 1e-10) on real gloo worlds; masked-out blocks are not
computed; bad cu_seqlens raise the same ValueError on every rank."""
import random

import pytest
import torch

from checks.documents import (
    doc_error,
    doc_exactness_all,
    doc_flops,
    doc_positions,
    expected_pairs,
    packed_loader_batch,
    packed_training,
)
from checks.train import run_training
from seqpar.documents import DocMask, Documents, visible_pairs
from seqpar.layout import TokenLayout, document_zigzag

CASES = [  # (strategy, init kwargs) on 4 ranks
    ("ring", {"layout": "contiguous"}), ("ring", {"layout": "zigzag"}), ("ring", {"layout": "striped"}),
    ("ulysses", {}), ("usp", {"ulysses": 2, "layout": "zigzag"}), ("usp", {"ring": 4, "layout": "striped"}),
    ("allgather", {"layout": "zigzag"}), ("lss", {}),
    ("wallfacer", {"team_size": 1}), ("wallfacer", {"team_size": 2}),
    ("wallfacer", {"team_size": 2, "placement": "rings_intra"}),
    ("fpdt", {"chunks": 2}), ("fpdt", {"chunks": 4, "offload": True}),
    ("ring", {"layout": "documents"}), ("usp", {"ulysses": 2, "layout": "documents"}),
    ("allgather", {"layout": "documents"}), ("wallfacer", {"team_size": 2, "layout": "documents"}),
    ("ulysses", {"layout": "documents"}),
]


@pytest.mark.parametrize("strategy,kwargs", CASES, ids=lambda c: str(c))
def test_every_strategy_is_exact_with_documents(worlds, strategy, kwargs):
    """Patterns: documents straddling rank/chunk boundaries, shorter than a block, one document
    (= plain causal), many 1-token documents, one cu_seqlens per batch row; causal and not; GQA."""
    for rank, res in enumerate(worlds.run(4, doc_exactness_all, strategy, kwargs)):
        for case, r in res.items():
            for field in ("out", "lse", "dq", "dk", "dv"):
                assert r[field] < 1e-10, f"rank {rank} {case}: {field} error {r[field]:.3e}"


def test_sub_blocks_cover_exactly_the_visible_entries():
    """DocMask.pairs on every layout's block pairs equals the brute-force mask, entry by entry."""
    rng = random.Random(0)
    for _ in range(150):
        n, p = rng.choice([16, 32, 48]), rng.choice([1, 2, 4])
        cu = [0] + sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) + [n]
        layout, causal = TokenLayout(rng.choice(["contiguous", "zigzag", "striped"]), outer=p), rng.random() < 0.6
        mask = DocMask(Documents.from_rows([tuple(cu)]), causal)
        doc = torch.searchsorted(torch.tensor(cu), torch.arange(n), right=True)
        for qr in range(p):
            for kr in range(p):
                qp, kp = layout.outer_indices(n, qr), layout.outer_indices(n, kr)
                want = (doc[qp][:, None] == doc[kp][None, :]) & ((kp[None, :] <= qp[:, None]) | (not causal))
                got = torch.zeros(want.shape, dtype=torch.int)
                for _, rows, cols, tri in mask.pairs(qp, kp):
                    block = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.int)
                    got[rows, cols] += block.tril() if tri else block
                assert torch.equal(got, want.int()), (cu, layout, qr, kr, causal)


@pytest.mark.parametrize("strategy,kwargs", [("ring", {"layout": "zigzag"}), ("ulysses", {}),
                                             ("wallfacer", {"team_size": 2}), ("fpdt", {"chunks": 2})])
def test_masked_blocks_are_not_computed(worlds, strategy, kwargs):
    """A packed batch of 8-token documents computes exactly its visible pairs: 9/129 of a causal
    128-token sequence, forward and backward."""
    seq, cu = 128, list(range(0, 129, 8))
    stats = worlds.run(4, doc_flops, strategy, kwargs, cu, seq)
    want = expected_pairs(cu, True)
    assert sum(s["forward_pairs"] for s in stats) == want == sum(s["backward_pairs"] for s in stats)
    assert want / expected_pairs([0, seq], True) == pytest.approx(9 / 129)
    assert all(s["forward_flops"] == 4 * 4 * s["forward_pairs"] for s in stats)  # head_dim 4


def test_visible_pairs():
    assert visible_pairs([0, 4, 6], True) == 10 + 3 and visible_pairs([0, 4, 6], False) == 16 + 4


BAD_CU = [  # (per-rank cu_seqlens, default cu_seqlens, message fragment)
    ({}, [1, 10, 32], "must start at 0"),
    ({}, [0, 10, 30], "must end at the (global) sequence length"),
    ({}, [0, 10, 10, 32], "strictly increasing"),
    ({}, torch.tensor([0.0, 32.0]), "1-D integer tensor"),
    ({}, [[0, 32]], "one tensor per batch row"),
    ({2: [0, 12, 32]}, [0, 10, 32], "differ between ranks"),
    ({1: [0, 5, 32]}, [5, 32], "must start at 0"),  # only one rank's boundaries are valid
]


@pytest.mark.parametrize("per_rank,default,message", BAD_CU, ids=[b[-1] for b in BAD_CU])
def test_bad_cu_seqlens_raise_the_same_error_on_every_rank(worlds, per_rank, default, message):
    errors = worlds.run(4, doc_error, "ring", {"layout": "zigzag"}, per_rank, default)
    assert errors[0] and len(set(errors)) == 1 and message in errors[0], errors


def test_positions_restart_in_each_document(worlds):
    cu, seq = [0, 5, 18, 32], 32
    for r in worlds.run(4, doc_positions, "ring", {"layout": "zigzag"}, cu, seq):
        starts = [max(c for c in cu[:-1] if c <= p) for p in r["global"]]
        assert r["doc"] == [p - s for p, s in zip(r["global"], starts)]
        assert r["rows"] == [r["doc"], r["global"]]


@pytest.mark.parametrize("outer", [1, 2, 4, 8])
def test_document_zigzag_is_a_balanced_partition(outer):
    """Every rank holds N/outer sorted positions, each document in 2*outer zigzag chunks."""
    cu = (0, 3, 300, 301, 310, 777, 1024)
    parts = document_zigzag(cu, outer)
    assert sorted(torch.cat(parts).tolist()) == list(range(1024))
    assert all(p.numel() == 1024 // outer and bool((p[1:] > p[:-1]).all()) for p in parts)
    work = [visible_pairs(list(cu), True, p) for p in parts]
    assert max(work) / (sum(work) / outer) < 1.05


@pytest.mark.parametrize("strategy,kwargs,model", [
    ("ring", {"layout": "zigzag"}, {}),
    ("usp", {"ulysses": 2, "layout": "documents"}, {}),
    ("fpdt", {"chunks": 4, "offload": True}, {"chunked_blocks": True}),
], ids=["ring", "usp", "fpdt-chunked-blocks"])
def test_packed_training_matches_one_process(worlds, strategy, kwargs, model):
    """3 AdamW steps of the tiny Transformer on packed documents (fp32): 4 ranks == 1 process."""
    ref = worlds.run(1, packed_training, "local")[0]
    for losses in worlds.run(4, packed_training, strategy, kwargs, model=model):
        assert losses == pytest.approx(ref, abs=1e-6, rel=0), (losses, ref)


# -- training: `seqpar train --pack-documents` -------------------------------------------------------------
def test_packed_loader_finds_each_windows_documents():
    """Document starts inside each window, including one right after it (its label is ignored)."""
    import numpy as np

    from seqpar.data import Packed, SequenceLoader
    starts = np.array([0, 3, 10, 11, 17, 30])
    loader = SequenceLoader(np.arange(40), seq_len=7, batch=3, vocab_size=40, doc_starts=starts, seed=5)
    for step in range(20):
        packed = loader.documents_at(step)
        for o, row, cu in zip(loader.global_offsets(step), packed.starts, packed.cu_seqlens()):
            assert row == tuple(int(s - o) for s in starts if o < s <= o + 7)
            assert cu.tolist() == [0, *(s for s in row if s < 7), 7]
    packed = Packed(((3, 7), ()), 7)
    assert packed.ignored_labels().nonzero().tolist() == [[0, 2], [0, 6]]
    assert packed.mean_document_length == 14 / 3


def test_shard_batch_packs_labels_and_positions(worlds):
    """4 ranks, zigzag: gathered labels never cross a document start, positions restart at 0."""
    tokens, starts, seq = list(range(300)), [0, 7, 9, 30, 31, 45, 77, 100, 101, 150, 190, 260], 32
    for r in worlds.run(4, packed_loader_batch, "ring", {"layout": "zigzag"}, tokens, starts, seq):
        for o, labels, positions, cu in zip(r["offsets"], r["labels"], r["positions"], r["cu"]):
            for i in range(seq):
                begins_next = (o + i + 1) in starts
                assert labels[i] == (-100 if begins_next else o + i + 1), (o, i)
                start = max(s for s in starts if s <= o + i)
                assert positions[i] == o + i - max(start, o), (o, i)
            assert cu == [0, *(s - o for s in starts if o < s < o + seq), seq]


@pytest.fixture(scope="module")
def separated_corpus(tmp_path_factory):
    """stdlib bytes cut into documents of 4..40 tokens, each ended by separator token 0 (.npy)."""
    import numpy as np

    from seqpar.data import stdlib_corpus
    text = np.fromfile(stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=40_000), dtype=np.uint8)
    assert not (text == 0).any()
    rng, pieces, at = np.random.default_rng(0), [], 0
    while at < len(text):
        n = int(rng.integers(4, 40))
        pieces += [text[at:at + n], [0]]
        at += n
    path = tmp_path_factory.mktemp("tokens") / "docs.npy"
    np.save(path, np.concatenate(pieces).astype(np.int64))
    return str(path)


PACKED_TRAIN = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64, batch=2, steps=3,
                    warmup=1, lr=1e-2, min_lr=1e-3, dtype="float32", eval_every=0, eval_batches=1,
                    checkpoint_every=0, progress=False, plot=False, strategy="local", layout="contiguous",
                    doc_separator=0)


@pytest.mark.parametrize("strategy,overrides", [("ring", {"layout": "zigzag"}), ("wallfacer", {"layout": None}),
                                                ("usp", {"ulysses": 2, "layout": "documents", "batch": 1, "dp": 2,
                                                         "sp": 2}),
                                                ("fpdt", {"layout": None, "chunks": 2, "offload": True,
                                                          "chunked_blocks": True, "offload_activations": True})],
                         ids=["ring", "wallfacer", "usp", "fpdt-chunked-blocks"])
def test_packed_training_run_matches_one_process(worlds, separated_corpus, tmp_path, strategy, overrides):
    """The training loop on separator-packed data (fp32): 4 ranks == 1 process to 1e-6, and the
    losses differ from the unpacked run (the test sees the document mask)."""
    base = {**PACKED_TRAIN, "data": separated_corpus}
    ref = worlds.run(1, run_training, {**base, "out_dir": str(tmp_path / "ref")})[0]["losses"]
    got = worlds.run(4, run_training, {**base, "strategy": strategy, "out_dir": str(tmp_path / "sp"),
                                       **overrides})[0]["losses"]
    assert got == pytest.approx(ref, abs=1e-6, rel=0), (got, ref)
    if strategy == "ring":
        plain = worlds.run(1, run_training, {**base, "doc_separator": -1, "pack_documents": False,
                                             "out_dir": str(tmp_path / "plain")})[0]["losses"]
        assert abs(plain[0] - ref[0]) > 1e-3, (plain, ref)


def test_stdlib_corpus_documents_are_its_files(tmp_path):
    """The stdlib corpus's index marks exactly the files it concatenates."""
    import hashlib
    import sysconfig
    from pathlib import Path

    import numpy as np

    from seqpar.data import find_documents, open_tokens, stdlib_corpus
    data = find_documents(open_tokens(stdlib_corpus(tmp_path, max_bytes=200_000)), None)
    starts, blob = data.doc_starts, np.asarray(data.tokens).tobytes()
    assert starts[0] == 0 and len(starts) > 5
    root = Path(sysconfig.get_paths()["stdlib"])
    digests = {hashlib.sha1(f.read_bytes()).hexdigest() for f in root.rglob("*.py") if "site-packages" not in f.parts}
    for a, b in zip(starts[:-1], starts[1:]):  # every complete document is one whole stdlib file
        assert hashlib.sha1(blob[a:b]).hexdigest() in digests


def test_corrupt_document_index_is_a_clear_error(tmp_path):
    from seqpar.data import find_documents, open_tokens
    path = tmp_path / "data.txt"
    path.write_bytes(b"x" * 100)
    (tmp_path / "data.txt.docs.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a valid .npy file"):
        find_documents(open_tokens(path), None)
    import numpy as np
    np.save(tmp_path / "data.txt.docs.npy", np.array([0, 50, 40]))
    with pytest.raises(ValueError, match="strictly increasing offsets"):
        find_documents(open_tokens(path), None)


@pytest.mark.parametrize("kwargs", [{"team_size": 2}, {"team_size": 2, "layout": "documents"},
                                    {"team_size": 2, "placement": "rings_intra", "layout": "striped"}])
def test_wallfacer_sub_rings_are_exact_with_documents(worlds, kwargs):
    """8 ranks, C=2: KV travel on C^2=4 sub-rings of length 2 (more than one ring step) under the
    document mask."""
    for rank, res in enumerate(worlds.run(8, doc_exactness_all, "wallfacer", kwargs, 64)):
        for case, r in res.items():
            for field in ("out", "lse", "dq", "dk", "dv"):
                assert r[field] < 1e-10, f"rank {rank} {case}: {field} error {r[field]:.3e}"
