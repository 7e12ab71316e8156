"""`seqpar verify`: exactness of a strategy vs single-device attention on a local gloo world.

Spawns `--world` processes, runs forward + backward of the strategy on a random problem,
and prints the max error of out, lse, dq, dk, dv against naive fp64 attention. Exits 1
when an error exceeds the dtype's tolerance.
"""
from __future__ import annotations

import argparse
import json

from .attention import STRATEGIES
from .context import resolve
from .layout import LAYOUTS
from .mesh import PLACEMENTS

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="ring", choices=sorted(STRATEGIES))
    p.add_argument("--world", type=int, default=4, help="number of local gloo processes")
    p.add_argument("--ulysses", type=int, default=None, help="USP Ulysses degree")
    p.add_argument("--ring", type=int, default=None, help="USP ring degree")
    p.add_argument("--team-size", "--teams", dest="team_size", type=int, default=None,
                   help="WallFacer team size C (--teams: deprecated alias)")
    p.add_argument("--placement", default=None, choices=PLACEMENTS, help="USP / WallFacer placement on the topology")
    p.add_argument("--ranks-per-node", type=int, default=None, help="WallFacer: ranks per node (default: detect)")
    p.add_argument("--chunks", type=int, default=None, help="FPDT chunks")
    p.add_argument("--offload", action="store_true", default=None)
    p.add_argument("--layout", default=None, choices=LAYOUTS, help="default: the strategy's")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--dtype", default="float64", choices=sorted(TOLERANCE))
    p.add_argument("--json", action="store_true", help="print the per-rank results as JSON")


def _init_kwargs(args: argparse.Namespace) -> dict:
    """The options given on the command line, resolved as `seqpar.init` would (clear error if invalid)."""
    given = {name: getattr(args, name) for name in ("layout", "ulysses", "ring", "team_size", "chunks", "offload",
                                                    "placement", "ranks_per_node")
             if getattr(args, name) is not None}
    return resolve(args.strategy, args.world, **given).init_kwargs()


def main(args: argparse.Namespace) -> int:
    from .testing import ProcessWorld, WorkerError
    from .testing.checks import attention_exactness

    init_kwargs = _init_kwargs(args)  # before any process starts
    with ProcessWorld(args.world) as world:
        try:
            results = world.run(attention_exactness, args.strategy, init_kwargs, batch=args.batch,
                                seq=args.seq, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                dtype=args.dtype, causal=args.causal)
        except WorkerError as e:
            raise ValueError(e.summary) from None
    if args.json:
        print(json.dumps(results, indent=1))
    tol = TOLERANCE[args.dtype]
    worst = {f: max(r[f] / (1.0 if args.dtype == "float64" else max(1.0, r[f + "_ref"])) for r in results)
             for f in ("out", "lse", "dq", "dk", "dv")}
    ok = all(v < tol for v in worst.values())
    print(f"{args.strategy} world={args.world} {init_kwargs} causal={args.causal} dtype={args.dtype}: "
          + " ".join(f"{k}={v:.2e}" for k, v in worst.items())
          + f"  (tolerance {tol:g}{'' if args.dtype == 'float64' else ' relative'}) -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1
