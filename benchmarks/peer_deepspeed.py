"""Side-by-side with DeepSpeed-Ulysses (`deepspeed.sequence.layer.DistributedAttention`) on gloo.

Runs both on the same real process world and the same inputs, compares out/dq/dk/dv with
naive fp64 attention on the full sequence (asserting seqpar's tolerance, printing the
peer's), times forward+backward, and probes bad inputs (uneven sequence shards, heads
not divisible by the degree, kv_heads < degree) to see which side raises a clear error.

    python3 -m venv --system-site-packages /tmp/dsenv && /tmp/dsenv/bin/pip install deepspeed==0.19.8
    /tmp/dsenv/bin/python benchmarks/peer_deepspeed.py --world 4 > docs/peer_deepspeed.md
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.distributed as dist

import seqpar
from seqpar.testing import ProcessWorld
from seqpar.testing.checks import make_inputs, reference_attention


def _sdpa_local(q, k, v, *args, **kwargs):
    """DeepSpeed's local attention: [b, s, h_local, d] in, same out (causal)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True)
    return out.transpose(1, 2)


def _deepspeed_attention():
    """DeepSpeed's Ulysses layer over the already initialised torch.distributed world."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    attn = DistributedAttention(_sdpa_local, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    return lambda a, b, c: attn(a, b, c, 0)  # batch_dim_idx = 0


def _run_side(name, q, k, v, dout, shard, iters):
    """Forward+backward on this rank's shard; returns (out, dq, dk, dv, seconds per iteration)."""
    if name == "deepspeed":
        fn = _deepspeed_attention()
    else:
        ctx = seqpar.init("ulysses")
        fn = lambda a, b, c: ctx.attention(a, b, c, causal=True)  # noqa: E731
    times = []
    for _ in range(iters):
        leaves = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
        dist.barrier()
        t0 = time.perf_counter()
        out = fn(*leaves)
        out.backward(shard(dout))
        times.append(time.perf_counter() - t0)
    return out.detach(), *(t.grad for t in leaves), min(times)


def compare(heads: int, kv_heads: int, seq: int, dtype: str, iters: int) -> dict:
    """Per rank: max error vs fp64 reference of both implementations, and their times."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    q, k, v, dout = make_inputs(1, seq, heads, kv_heads, 64, dt, seed=0)
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*full, causal=True)
    ref_out.backward(dout.double())
    n = seq // world
    rows = slice(rank * n, (rank + 1) * n)
    shard = lambda t: t[:, rows]  # noqa: E731  (contiguous shards, as DeepSpeed expects)
    refs = [ref_out.detach()[:, rows]] + [t.grad[:, rows] for t in full]
    result = {}
    for side in ("seqpar", "deepspeed"):
        try:
            *got, seconds = _run_side(side, q, k, v, dout, shard, iters)
        except AssertionError as e:  # the peer refuses some shapes up front
            result[side] = {"refused": str(e).splitlines()[0][:100]}
            continue
        errs = [(g.double() - r).abs().max().item() / max(1.0, r.abs().max().item()) for g, r in zip(got, refs)]
        result[side] = {"errors": dict(zip(("out", "dq", "dk", "dv"), errs)), "seconds": seconds}
    return result


def probe_bad_input(case: str, side: str) -> str:
    """What one side does with a bad input: 'error: ...' or 'ran'."""
    rank = dist.get_rank()
    heads, kv_heads, n = {"uneven_seq": (8, 8, 16), "heads_not_divisible": (6, 6, 16),
                          "kv_heads_below_degree": (8, 2, 16)}[case]
    if case == "uneven_seq" and rank == 0:
        n = 12
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, n, heads, 64, generator=g)
    k, v = torch.randn(1, n, kv_heads, 64, generator=g), torch.randn(1, n, kv_heads, 64, generator=g)
    try:
        if side == "seqpar":
            seqpar.init("ulysses").attention(q, k, v, causal=True)
        else:
            _deepspeed_attention()(q, k, v)
        return "ran without error"
    except Exception as e:  # noqa: BLE001 - we report whatever the peer raises
        return f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default="docs/peer_deepspeed.md")
    args = p.parse_args()
    lines: list[str] = []
    emit = lines.append
    emit(f"# seqpar vs DeepSpeed-Ulysses\n\ncommand: `python benchmarks/peer_deepspeed.py --world {args.world} "
          f"--seq {args.seq}`; machine: {platform.machine()} {torch.get_num_threads()}-thread CPU, gloo, "
          f"torch {torch.__version__}; date: {time.strftime('%Y-%m-%d')}\n")
    emit("Max error vs naive fp64 attention, relative to max(1, |reference|), causal, head_dim 64, batch 1.\n")
    emit("| case | impl | out | dq | dk | dv | fwd+bwd s |\n|---|---|---|---|---|---|---|")
    with ProcessWorld(args.world) as world:
        for heads, kv_heads, dtype in [(8, 8, "float32"), (8, 2, "float32"), (8, 8, "bfloat16")]:
            res = world.run(compare, heads, kv_heads, args.seq, dtype, args.iters)
            for side in ("seqpar", "deepspeed"):
                if "refused" in res[0][side]:
                    emit(f"| h={heads} kv={kv_heads} {dtype} | {side} | refused: {res[0][side]['refused']} ||||")
                    continue
                worst = {f: max(r[side]["errors"][f] for r in res) for f in ("out", "dq", "dk", "dv")}
                secs = max(r[side]["seconds"] for r in res)
                emit(f"| h={heads} kv={kv_heads} {dtype} | {side} | " + " | ".join(f"{worst[f]:.1e}" for f in worst)
                      + f" | {secs:.3f} |")
                if side == "seqpar":
                    assert all(v < (1e-5 if dtype == "float32" else 2e-2) for v in worst.values()), worst
    emit("\n## Bad inputs (each probe in a fresh world: a peer crash takes its processes down)\n")
    emit("| case | seqpar | deepspeed |\n|---|---|---|")
    for case in ("uneven_seq", "heads_not_divisible", "kv_heads_below_degree"):
        row = []
        for side in ("seqpar", "deepspeed"):
            try:
                with ProcessWorld(args.world, timeout=90) as world:
                    row.append(world.run(probe_bad_input, case, side)[0])
            except Exception as e:  # noqa: BLE001 - a hang/crash of the peer is a result too
                row.append(f"process world failed ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
        emit(f"| {case} | {row[0]} | {row[1]} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
