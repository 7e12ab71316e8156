"""The checks that need a 16-process world (WallFacer with C = 4, sub-rings of 4), kept out of the
test suite (which stays at <= 8 processes on the 2-core CI machine): fp64 exactness of out, lse,
dq, dk, dv against single-device attention, and the per-rank communication bytes against the
paper's formulas (the same assertions as tests/test_wallfacer.py on 8 ranks). Exits 1 on a
failure; writes docs/large_worlds.md.

    python3 benchmarks/large_worlds.py [--out docs/large_worlds.md]

Each exactness case is also one `seqpar verify` command (printed in the table).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from seqpar.attention.wallfacer import WallFacerGrid
from seqpar.testing import ProcessWorld
from seqpar.testing.checks import attention_exactness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' per-rank bodies
from checks.wallfacer import comm_volume

RANKS = 16
CASES = [(4, "zigzag", True, 2), (4, "contiguous", False, 4), (2, "zigzag", True, 4)]  # C, layout, causal, kv
B, N, HEADS, KV_HEADS, D, W = 1, 64, 4, 2, 8, 4  # comm check: fp32 words


def exactness(world: ProcessWorld) -> list[dict]:
    rows = []
    for c, layout, causal, kv_heads in CASES:
        res = world.run(attention_exactness, "wallfacer", {"team_size": c, "layout": layout}, seq=64, heads=4,
                        kv_heads=kv_heads, causal=causal)
        worst = max(r[f] for r in res for f in ("out", "lse", "dq", "dk", "dv"))
        cmd = (f"seqpar verify --strategy wallfacer --world {RANKS} --team-size {c} --layout {layout} --seq 64 "
               f"--heads 4 --kv-heads {kv_heads}" + (" --causal" if causal else ""))
        rows.append({"case": f"C={c} {layout} {'causal' if causal else 'full'} kv_heads={kv_heads}",
                     "worst": worst, "ok": worst < 1e-10, "cmd": cmd})
    return rows


def comm_formulas(world: ProcessWorld, teams: int = 4) -> dict:
    """tests/test_wallfacer.py::test_comm_bytes_match_formulas at 16 ranks: every rank's bytes."""
    problem = dict(batch=B, seq=N, heads=HEADS, kv_heads=KV_HEADS, head_dim=D, dtype="float32", causal=True)
    wf = world.run(comm_volume, "wallfacer", {"team_size": teams, "layout": "zigzag"}, **problem)
    grid = WallFacerGrid(RANKS, teams)
    n, c, g = N // RANKS, teams, grid.ring_len
    kv_block = 2 * B * c * n * KV_HEADS * D * W
    gather = (c - 1) * B * n * (HEADS + 2 * KV_HEADS) * D * W + (c - 1) * B * HEADS * c * n * 4
    scatter = (c - 1) * B * n * HEADS * D * W
    wrong = []
    for rank, mine in enumerate(wf):
        fwd, bwd = mine["forward"], mine["backward"]
        t, a = grid.coords(rank)
        placed = grid.placement_target(t, a) != (t, a)
        expected = {"all_gather": gather, "reduce_scatter": scatter, "p2p": (g - 1 + placed) * kv_block,
                    "bwd_all_gather": 2 * (c - 1) * B * n * HEADS * D * W,
                    "bwd_reduce_scatter": (c - 1) * B * n * (HEADS + 2 * KV_HEADS) * D * W}
        got = {"all_gather": fwd["all_gather"], "reduce_scatter": fwd["reduce_scatter"], "p2p": fwd.get("p2p", 0),
               "bwd_all_gather": bwd["all_gather"], "bwd_reduce_scatter": bwd["reduce_scatter"]}
        wrong += [f"rank {rank} {k}: {got[k]} != {v}" for k, v in expected.items() if got[k] != v]
    return {"ok": not wrong, "wrong": wrong, "p2p_steps": g - 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "large_worlds.md"))
    args = parser.parse_args()
    t0 = time.time()
    with ProcessWorld(RANKS, timeout=1200) as world:
        rows, comm = exactness(world), comm_formulas(world)
    minutes = (time.time() - t0) / 60
    lines = [
        "# Checks on 16-process worlds",
        "",
        "WallFacer with C = 4 needs C^2 = 16 ranks. The test suite keeps to worlds of at most 8 processes on",
        "the 2-core CI machine, so these run here instead (the same assertions as tests/test_wallfacer.py).",
        "",
        "Command: `python3 benchmarks/large_worlds.py`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), gloo, {RANKS} processes x 1 thread; torch "
        f"{torch.__version__}; date {datetime.date.today()}; {minutes:.1f} min.",
        "",
        "| case (fp64, 64 tokens, 4 heads) | max abs error (out, lse, dq, dk, dv) | within 1e-10 | seqpar verify |",
        "|---|---|---|---|",
        *[f"| {r['case']} | {r['worst']:.2e} | {'yes' if r['ok'] else 'NO'} | `{r['cmd']}` |" for r in rows],
        "",
        f"Communication bytes of every rank (C = 4, G = {RANKS // 16}: the placement only, "
        f"{comm['p2p_steps']} sub-ring rotations) equal the paper's formulas: "
        + ("yes." if comm["ok"] else "NO: " + "; ".join(comm["wrong"][:5])),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in rows) and comm["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
