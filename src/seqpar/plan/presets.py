"""Named clusters of published results (`seqpar plan --cluster NAME`): each a `Cluster` (its
hardware, and the one assumption set of its GPU generation) and the run the paper's figure was
measured on; see docs/planner.md "Against the papers' own tables" and tests/test_plan_papers.py."""
from __future__ import annotations

from dataclasses import dataclass

from .inputs import Cluster

__all__ = ["ClusterPreset", "CLUSTER_PRESETS"]


@dataclass(frozen=True)
class ClusterPreset:
    """A published setup: the cluster (its generation's assumptions, docs/planner.md "Against the
    papers' own tables") and the run the figure was measured on
    (`seqpar plan --cluster NAME` uses them where no flag is given)."""

    cluster: Cluster
    model: str
    seq_len: int
    zero: int
    checkpointing: bool
    figure: str       # what was published
    metric: str       # "ratio": best WallFacer / best ring step time; "mfu": of the best `strategy`;
    # "hybrid": best tp8 (TP-sp alone) / best tp4 x `strategy` step time; "max_seq": the longest fitting sequence
    published: float
    strategy: str
    optimizer_offload: bool = False


# One set of assumptions per hardware generation (docs/planner.md, "Against the papers' own
# tables"): dense layers at `efficiency`; attention (FlashAttention-2) at `attn_efficiency` on long
# calls and below it on short ones, a call of L tokens at attn_efficiency x L / (L + 512): each
# query and key row costs a fixed 256 pairs' time (tile loads, O/lse or dK/dV writes, the
# ring's merge of out/lse in fp32, the launch). 512 is the order of the merge alone on either
# generation: ~1.5-3 KB of HBM traffic per query row and head (0.75-1.5 ns on A100, 0.45-0.9 ns
# on H100) against 4 x 128 flops per key (2.3 ps at 0.7 x 312 TFLOP/s, 1.5 ps at 0.35 x 989):
# 300-650 keys. FA2 reaches ~70% of A100 peak on long calls but only ~35% of H100's: it is not
# Hopper-tuned (no wgmma/TMA); the dense layers reach 0.6 on both.
_A100_SET = dict(efficiency=0.6, attn_efficiency=0.7, attn_half_tokens=512)
_H100_SET = dict(efficiency=0.6, attn_efficiency=0.35, attn_half_tokens=512)
# hardware facts (links, peak, memory) per cluster, the generation's assumptions with them
_H100 = dict(intra_bw=450.0, inter_bw=50.0, intra_lat=5.0, inter_lat=20.0, tflops=989.0, memory_gib=80.0,
             **_H100_SET)
_A100 = dict(intra_bw=300.0, inter_bw=25.0, intra_lat=5.0, inter_lat=20.0, tflops=312.0, **_A100_SET)
# A800: an A100 with NVLink cut to 400 GB/s bidirectional (200 per direction); the three USP presets
# share these numbers (one node, or two with 4 x 200 Gb/s NICs each)
_A800 = dict(_A100, intra_bw=200.0, memory_gib=80.0, zero_traffic=True, node_inter_bw=100.0)

CLUSTER_PRESETS: dict[str, ClusterPreset] = {
    # 4 nodes x 8 H100 (NVLink 450 GB/s per direction); 400 Gb/s per GPU port, 4 NDR NICs per
    # node shared by its 8 GPUs (200 GB/s); ZeRO-3 traffic.
    "wallfacer-h100-32": ClusterPreset(
        Cluster(32, 8, **_H100, zero_traffic=True, node_inter_bw=200.0),
        "llama-7b", 65536, 3, False, "WallFacer: +77.12% throughput over ring attention (7B, 64K, 32 H100)",
        "ratio", 1.7712, "wallfacer"),
    # 2 nodes x 16 A100 (NVSwitch 300 GB/s); 4 HDR 200 Gb/s NICs per node (100 GB/s) shared by 16 GPUs.
    "wallfacer-a100-32": ClusterPreset(
        Cluster(32, 16, **_A100, memory_gib=80.0, zero_traffic=True, node_inter_bw=100.0),
        "llama-3b", 65536, 3, False, "WallFacer: +62.87% throughput over ring attention (3B, 64K, 32 A100, 16/node)",
        "ratio", 1.6287, "wallfacer"),
    # 2 nodes x 8 A800 (NVLink 400 GB/s bidirectional: 200 per direction); 4 x 200 Gb/s NICs per node.
    "usp-a800-16": ClusterPreset(
        Cluster(16, 8, **_A800),
        "llama3-8b", 212992, 3, True, "USP: 47% MFU, LLaMA3-8B, 208K tokens, 2 x 8 A800", "mfu", 0.47, "usp"),
    # the same nodes, ZeRO-1 without activation checkpointing: model states (1/16 of the optimizer,
    # whole weights and grads per tp shard) decide what fits; sequence parallelism alone does not at
    # 208K, the longest sequence that fits needs tp8 x ring2
    "usp-a800-16-longest": ClusterPreset(
        Cluster(16, 8, **_A800),
        "llama3-8b", 212992, 1, False, "USP: the longest LLaMA3-8B sequence on 2 x 8 A800, 208K, needs tp8 x ring2",
        "max_seq", 212992, "ring"),
    # one node of 8 A800: tensor parallelism inside the node with Ulysses (tp4 x ulysses2) against TP-sp alone
    "usp-a800-8": ClusterPreset(
        Cluster(8, 8, **_A800),
        "llama-7b", 65536, 1, False, "USP: Llama2-7B at 64K on 8 A800, tp4 x ulysses2 ~10% faster than TP-sp (tp8)",
        "hybrid", 1.10, "ulysses"),
    # 1 node x 4 A100-40GB (NVLink); FPDT's per-chunk block pipeline (its own recompute of the
    # projections and MLP, attention not recomputed: no block checkpointing) with chunks, K/V and
    # AdamW states in host memory: ZeRO-3's 30 GiB of states per GPU leave no room otherwise.
    "fpdt-a100-4": ClusterPreset(
        Cluster(4, 4, **_A100, memory_gib=40.0, zero_traffic=True),
        "llama3-8b", 2097152, 3, False, "FPDT: 8B at 2M tokens on 4 A100-40GB, > 55% MFU", "mfu", 0.55, "fpdt",
        optimizer_offload=True),
}
