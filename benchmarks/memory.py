"""Peak attention-activation memory per rank vs sequence length: FPDT chunks x offload.

For every (sequence length, configuration) one attention layer runs forward + backward
(causal) on a real gloo world (a fresh world per configuration, so peak RSS is per run)
and `checks.fpdt.attention_memory` measures on every rank, above the
inputs and excluding the layer's interface tensors (out, lse, dq/dk/dv):

- device memory: CPU — `StorageMeter`, the bytes of live tensor storages allocated by
  torch operators, tracked until freed on any thread (FPDT's offloaded chunks sit in a
  numpy-backed host pool outside torch, see attention/fpdt.py ChunkStore); CUDA —
  torch.cuda.max_memory_allocated / memory_allocated (run with --world 1: the gloo
  world cannot move CUDA tensors);
- retained: device bytes held from forward to backward (the saved activations);
- peak: the largest forward or backward working set;
- host: FPDT's host-store peak; RSS: growth of the process's peak RSS (on CPU host and
  device are the same RAM, so this includes the host store).

Table 1 fixes the chunk count (1, 4, 16) and grows the sequence; table 2 fixes the chunk
size (`--chunk-tokens`), as FPDT does, so the number of chunks grows with the sequence.

    python3 benchmarks/memory.py > docs/memory.md
    python3 benchmarks/memory.py --quick          # small grid, a minute
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from seqpar.testing import ProcessWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.fpdt import attention_memory

MiB = 2 ** 20


def configs(chunk_counts: list[int]) -> list[tuple[str, str, dict]]:
    """(label, strategy, init kwargs): Ulysses as the unchunked reference, then FPDT."""
    out = [("ulysses", "ulysses", {})]
    for offload in (False, True):
        out += [(f"fpdt u={u}" + (" offload" if offload else ""), "fpdt", {"chunks": u, "offload": offload})
                for u in chunk_counts]
    return out


def measure(world: int, strategy: str, kwargs: dict, seq: int, args) -> dict:
    """Run one configuration in a fresh world; the worst rank's numbers."""
    with ProcessWorld(world, timeout=1800) as w:
        results = w.run(attention_memory, strategy, kwargs, seq=seq, heads=args.heads, head_dim=args.head_dim,
                        dtype=args.dtype, causal=True)
    keys = ("retained", "peak", "host_peak", "rss_growth", "seconds", "input_bytes")
    return {k: max(r[k] for r in results) for k in keys} | {"device": results[0]["device"]}


def mib(x: float) -> str:
    return f"{x / MiB:.2f}"


def table(rows: list[tuple[str, int, int, dict]]) -> list[str]:
    lines = ["| config | seq | chunk tokens | inputs q,k,v | retained | peak | host | RSS growth | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, seq, chunk, r in rows:
        lines.append(f"| {label} | {seq} | {chunk} | {mib(r['input_bytes'])} | {mib(r['retained'])} | "
                     f"{mib(r['peak'])} | {mib(r['host_peak'])} | {mib(r['rss_growth'])} | {r['seconds']:.1f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (Ulysses degree)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="fixed global chunk size of table 2")
    parser.add_argument("--fixed-seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="seqs 2048 4096, fixed-seqs 2048 4096 8192")
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.fixed_seqs = [2048, 4096], [2048, 4096, 8192]

    t0 = time.time()
    rows = [(label, seq, seq // kw.get("chunks", 1), measure(args.world, strategy, kw, seq, args))
            for seq in args.seqs for label, strategy, kw in configs(args.chunks)]
    fixed = [(f"fpdt u={seq // args.chunk_tokens}" + (" offload" if off else ""), seq, args.chunk_tokens,
              measure(args.world, "fpdt", {"chunks": seq // args.chunk_tokens, "offload": off}, seq, args))
             for off in (False, True) for seq in args.fixed_seqs]
    device = rows[0][3]["device"]
    out = [
        "# Attention activation memory: FPDT chunking and host offload",
        "",
        f"Command: `python3 {' '.join(['benchmarks/memory.py'] + sys.argv[1:])}`  ",
        f"Machine: {'2-core CPU, gloo' if device == 'cpu' else torch.cuda.get_device_name()}; "
        f"torch {torch.__version__}, Python {platform.python_version()}; "
        f"date {datetime.date(2026, 11, 23).isoformat()}; total run {time.time() - t0:.0f} s.  ",
        f"Layer: one causal attention, batch 1, {args.heads} heads x {args.head_dim}, {args.dtype}, "
        f"{args.world} ranks (Ulysses degree {args.world}); MiB per rank, worst rank.",
        "",
        "Columns: *inputs* = this rank's q, k, v (for scale); *retained* = device memory held from",
        "forward to backward; *peak* = largest forward/backward working set on the device; both",
        "exclude the inputs and the interface tensors out, lse, dq, dk, dv. *host* = FPDT host",
        "store peak. *RSS growth* = growth of the process's peak RSS during the call (fresh process",
        "after a 1/16-length warm-up; CPU: host and device are the same RAM, so it includes the host",
        "store, and it is coarse: the allocator keeps freed pages). Device memory on CPU = live bytes",
        "of tensor storages allocated by torch operators (`tests/checks/fpdt.py: StorageMeter`); offloaded",
        "chunks live in a numpy-backed host pool outside torch. *time* includes the meter's overhead.",
        "",
        "## 1. Fixed number of chunks (chunk size grows with the sequence)",
        "",
        *table(rows),
        "",
        f"## 2. Fixed chunk size of {args.chunk_tokens} tokens (chunks = seq / {args.chunk_tokens}), as FPDT",
        "",
        *table(fixed),
        "",
    ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
