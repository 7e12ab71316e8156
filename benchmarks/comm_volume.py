"""Communication volume per rank of one attention layer: WallFacer vs ring / Ulysses / USP / all-gather.

Runs every strategy on real gloo process worlds of P = 8 and 16 ranks (CPU; volumes do
not depend on speed), reads the bytes each rank sent per kind from `ctx.comm_stats()`
and prints a markdown report next to the formulas (WallFacer paper, arXiv 2407.00611):
ring P2P 2BNH, WallFacer P2P 2BNH/C and collectives 4BNH(C-1)/P per rank and layer.

    python3 benchmarks/comm_volume.py > docs/comm_volume.md
"""
from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqpar.testing import ProcessWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.wallfacer import comm_volume

MiB = 2 ** 20
COLLECTIVES = ("all_gather", "reduce_scatter", "all_to_all")
KINDS = ("p2p",) + COLLECTIVES


@dataclass
class Case:
    label: str
    strategy: str
    kwargs: dict[str, Any]
    p2p: float  # forward formula, in units of B*N*H*W
    coll: float
    source: str  # where the formula comes from


def cases(ranks: int, heads: int) -> list[Case]:
    """Strategies to measure on `ranks` ranks with their forward formulas (units of BNH words)."""
    p = ranks
    out = [Case("ring", "ring", {}, 2 * (p - 1) / p, 0, "2BNH(P-1)/P (paper: 2BNH)")]
    if heads % p == 0:
        out.append(Case(f"ulysses {p}", "ulysses", {}, 0, 4 * (p - 1) / p ** 2, "4BNH(P-1)/P^2 (a2a of q,k,v,o)"))
    for u in (2, 4):
        if u < p and p % u == 0 and heads % u == 0:
            r = p // u
            out.append(Case(f"usp {u}x{r}", "usp", {"ulysses": u}, 2 * (r - 1) / p, 4 * (u - 1) / (u * p),
                            "P2P 2BNH(r-1)/P, a2a 4BNH(u-1)/(uP)"))
    out.append(Case("allgather", "allgather", {}, 0, 2 * (p - 1) / p, "2BNH(P-1)/P (gather k,v)"))
    for c in (1, 2, 4):
        if p % (c * c) == 0:
            out.append(Case(f"wallfacer C={c}", "wallfacer", {"team_size": c}, 2 / c, 4 * (c - 1) / p,
                            "paper: P2P 2BNH/C, coll 4BNH(C-1)/P"))
    return out


def _stat(per_rank: list[dict[str, int]], kinds, fn) -> float:
    return fn([sum(r.get(k, 0) for k in kinds) for r in per_rank])


def _mean(xs):
    return sum(xs) / len(xs)


def measure(world: ProcessWorld, case: Case, args) -> dict[str, Any]:
    res = world.run(comm_volume, case.strategy, {"layout": "zigzag", **case.kwargs}, batch=args.batch,
                    seq=args.seq, heads=args.heads, head_dim=args.head_dim, dtype="float32", causal=True)
    fwd = [r["forward"] for r in res]
    both = [{k: r["forward"].get(k, 0) + r["backward"].get(k, 0) for k in KINDS} for r in res]
    return {
        "p2p_max": _stat(fwd, ("p2p",), max), "p2p_mean": _stat(fwd, ("p2p",), _mean),
        "coll_max": _stat(fwd, COLLECTIVES, max),
        "msgs": _stat([r["forward_calls"] for r in res], ("p2p",), max),
        "both": {k: _stat(both, (k,), max) for k in KINDS}, "both_total": _stat(both, KINDS, max),
    }


def _mib(x: float) -> str:
    return f"{x / MiB:.2f}"


def report(rows: list[tuple[int, Case, dict]], args, unit: int) -> str:
    lines = [
        "# Communication volume per rank and attention layer", "",
        f"Command: `python3 benchmarks/comm_volume.py` — machine: {args.machine} — date: {args.date}.", "",
        f"Problem: B={args.batch}, N={args.seq}, {args.heads} heads x {args.head_dim} (H={args.heads * args.head_dim}, "
        f"kv_heads = heads), fp32 (W=4 bytes), causal, zigzag layout. One BNH·W = {_mib(unit)} MiB.",
        "Bytes are what each rank *sent* (`ctx.comm_stats()`, algorithmic volume: all-gather and "
        "reduce-scatter count (n-1) shards, all-to-all (n-1)/n of the local tensor). "
        "Max over ranks unless noted.", "",
        "## Forward", "",
        "| P | strategy | P2P MiB (max / mean) | P2P formula | collectives MiB | coll. formula | "
        "P2P / ring | P2P / 2BNH·W | P2P messages | formula source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ring_p2p = {p: m["p2p_max"] for p, c, m in rows if c.strategy == "ring"}
    for p, c, m in rows:
        lines.append(f"| {p} | {c.label} | {_mib(m['p2p_max'])} / {_mib(m['p2p_mean'])} | {_mib(c.p2p * unit)} | "
                     f"{_mib(m['coll_max'])} | {_mib(c.coll * unit)} | {m['p2p_max'] / ring_p2p[p]:.3f} | "
                     f"{m['p2p_max'] / (2 * unit):.3f} | {m['msgs']:.0f} | {c.source} |")
    lines += ["", "## Forward + backward (max over ranks, MiB)", "",
              "| P | strategy | " + " | ".join(KINDS) + " | total |", "|---" * (len(KINDS) + 3) + "|"]
    for p, c, m in rows:
        lines.append(f"| {p} | {c.label} | " + " | ".join(_mib(m["both"][k]) for k in KINDS)
                     + f" | {_mib(m['both_total'])} |")
    return "\n".join(lines + ["", DISCUSSION.format(**_discussion_numbers(rows, args, unit))]) + "\n"


DISCUSSION = """## Reading the numbers

- **P2P is about 1/C of ring attention.** A WallFacer rank sends its team's K/V (C*N/P tokens)
  once for the skewed placement and then rotates it G-1 = P/C^2 - 1 times on its sub-ring:
  G * 2BNH*C/P = 2BNH/C, exactly the paper's formula (max over ranks). Ring attention sends
  its N/P-token block P-1 times, 2BNH(P-1)/P (the paper rounds this to 2BNH). Measured
  ratios vs ring: {ratios}, i.e. P/(C(P-1)), which tends to 1/C; against the paper's ring
  value 2BNH the ratio is exactly 1/C. Ranks whose placement target is themselves skip that
  send (rank (t, a) with t = a*G + t//C and a = t % C), hence mean < max. C = 1 is exactly ring
  attention (same bytes, same results; tested bitwise).
- **Latency steps: P/C^2 instead of P.** The P2P message count per rank is G - 1 rotations plus
  one placement message ({msgs}) against P - 1 for ring; with C = sqrt(P) (P=16, C=4) there is no
  rotation at all, only the placement and the team collectives.
- **Collectives: 4BNH(C-1)/P** for the team all-gather of q, k, v and the reduce-scatter of the
  weighted outputs, plus the all-gather of the partial LSEs [B, h, C*N/P] that the LSE-weighted
  merge needs: (C-1)*C*B*N*h*4/P bytes, a fraction C/(4*head_dim) of the formula
  ({lse_note}). That is why the measured collective column is slightly above the formula.
- **Backward** (second table) mirrors the forward: all-gather of dO and O in the team
  (2BNH(C-1)/P), ring backward on the sub-ring with the K/V placed in forward kept in memory
  (G-1 K/V sends plus G dK/dV sends when G > 1), one reverse-placement P2P returning dK/dV to
  their senders, and reduce-scatters of dQ, dK, dV (3BNH(C-1)/P; gradients travel in the
  accumulation dtype, fp32 here, as in ring attention). Ring attention's backward sends K/V
  P-1 times and dK/dV P times.
- Ulysses and USP move less data still, but Ulysses needs heads divisible by its degree and both
  use all-to-alls across the Ulysses group; all-gather attention trades P2P latency for a
  2BNH(P-1)/P all-gather and the memory of the whole K/V on every rank.
- These are volumes, identical on any hardware; which configuration is faster depends on
  bandwidth and latency per link (intra- vs inter-node, `placement=collectives_intra|rings_intra`),
  which is what `seqpar plan` weighs.
"""


def _discussion_numbers(rows, args, unit) -> dict[str, str]:
    ring = {p: m for p, c, m in rows if c.strategy == "ring"}
    wf = [(p, c, m) for p, c, m in rows if c.strategy == "wallfacer" and c.kwargs["team_size"] > 1]
    ratios = ", ".join(f"P={p} C={c.kwargs['team_size']}: {m['p2p_max'] / ring[p]['p2p_max']:.3f} "
                       f"(1/C = {1 / c.kwargs['team_size']:.3f})" for p, c, m in wf)
    msgs = ", ".join(f"P={p} C={c.kwargs['team_size']}: {m['msgs']:.0f} vs {ring[p]['msgs']:.0f}" for p, c, m in wf)
    lse = ", ".join(f"P={p} C={c.kwargs['team_size']}: +{(m['coll_max'] - c.coll * unit) / 1024:.0f} KiB"
                    for p, c, m in wf)
    return {"ratios": ratios, "msgs": msgs, "lse_note": f"head_dim={args.head_dim}; {lse}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--machine", default="2-core CPU, gloo")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    unit = args.batch * args.seq * args.heads * args.head_dim * 4
    rows = []
    for ranks in args.worlds:
        with ProcessWorld(ranks) as world:
            for case in cases(ranks, args.heads):
                rows.append((ranks, case, measure(world, case, args)))
                print(f"measured P={ranks} {case.label}", file=sys.stderr)
    sys.stdout.write(report(rows, args, unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
