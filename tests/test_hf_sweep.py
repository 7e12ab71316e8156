"""The decoder-only sweep (issue #19): tiny instances of transformers' causal LMs through seqpar.

In the default suite: the enumeration (every causal-LM model type is swept or skipped with a
reason) and one training step of a representative subset, one per attention family, in ONE
task of the session's 4-rank world. SEQPAR_HF_SWEEP=1 runs every swept model type (minutes;
benchmarks/hf_sweep.py writes the same as the table in docs/models.md) and requires each one to
match stock transformers or to have its reason in checks.hf_sweep.KNOWN.
"""
import os

import pytest

pytest.importorskip("transformers")

from checks.hf_sweep import KNOWN, SKIP, architectures, batch, entries, sweep_rank, verdict

# one per attention family: plain causal, sliding window (every layer), alternating sliding /
# full layer types, attention sinks (+ windows on alternate layers), logit soft-capping,
# decoder layers that drop the attention kwargs (the context held on the modules)
FAMILIES = ["llama", "mistral", "gemma3_text", "gpt_oss", "gemma2", "stablelm"]


@pytest.fixture(scope="module")
def found():
    return architectures()


def test_every_causal_lm_is_swept_or_skipped_with_a_reason(found):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(found) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert set(found.values()) <= {""} | set(SKIP.values())
    assert all(found[t] == "" for t in FAMILIES)
    assert found["bart"] == SKIP["is_encoder_decoder"] and found["gemma3"] == SKIP["multimodal"]
    assert found["bert"] == SKIP["encoder"] and found["mamba"] == SKIP["no_interface"]
    assert set(KNOWN) <= set(found)


def _check(results):
    bad = {r["arch"]: (verdict(r), r.get("error"), r.get("dloss"), r.get("dgrad"), r.get("worst"))
           for r in results if verdict(r) != "exact" and r["arch"] not in KNOWN}
    assert not bad, bad


def test_attention_families_match_stock_transformers(worlds):
    window, ignored = batch()
    results = worlds.run(4, sweep_rank, entries(FAMILIES), window, ignored)[0]
    assert [r["arch"] for r in results] == sorted(FAMILIES)
    assert {r["strategy"] for r in results} == {"ring", "usp", "ulysses", "wallfacer", "fpdt", "allgather"}
    assert all(r["dtype"] == "float64" for r in results)
    _check(results)


@pytest.mark.skipif(os.environ.get("SEQPAR_HF_SWEEP") != "1", reason="the full sweep: SEQPAR_HF_SWEEP=1 (minutes)")
def test_full_sweep(found):
    from seqpar.testing import ProcessWorld

    window, ignored = batch()
    with ProcessWorld(4, timeout=7200.0, pg_timeout=600.0) as world:
        results = world.run(sweep_rank, entries([t for t, reason in found.items() if not reason]), window, ignored)[0]
    _check(results)
