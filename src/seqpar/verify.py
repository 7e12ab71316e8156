"""`seqpar verify`: exactness of a strategy vs single-device attention on a local gloo world.

Spawns `--world` processes, runs forward + backward of the strategy on a random problem,
and prints the max error of out, lse, dq, dk, dv against naive fp64 attention. Exits 1
when an error exceeds the dtype's tolerance.
"""
from __future__ import annotations

import argparse
import json

from .attention import STRATEGIES
from .attention.options import add_option_arguments, options_from_args
from .context import resolve
from .testing import ProcessWorld, WorkerError
from .testing.checks import attention_exactness

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="ring", choices=sorted(STRATEGIES))
    p.add_argument("--world", type=int, default=4, help="number of local gloo processes")
    add_option_arguments(p)  # the strategy options, from their one schema (seqpar.StrategyOptions)
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
    return resolve(args.strategy, args.world, **options_from_args(args).given()).init_kwargs()


def main(args: argparse.Namespace) -> int:
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
