"""How well `seqpar plan` ranks the candidates on a local process world: rank correlation and regret.

For every shape (sequence length x MHA / GQA) the planner predicts one attention layer
(forward + backward) of every valid candidate on a calibration of the world, then
`seqpar plan --profile`'s machinery measures them all (interleaved, median of --iters after a
warm-up, slowest rank). Per shape: Spearman rank correlation of predicted vs measured time,
the regret = measured time of the predicted best / the measured best (1.00: the planner
picked the fastest), and the confirmed regret: the same two re-measured on their own
(`--confirm` interleaved iterations), free of the minimum's bias towards lucky runs. One calibration
per GQA ratio (the kernel table depends on it), saved
next to the output and reusable with --calibration-dir.

    python3 benchmarks/planner_regret.py                  # full study, writes its table into docs/planner.md
    python3 benchmarks/planner_regret.py --quick --print  # seq 4096 and 8192, a few minutes, stdout only

The full study runs every candidate (about 19 on 4 ranks) at seq 4K to 32K: on a 2-core CPU
an iteration at 32K takes ~10 s, so the whole run takes about an hour. Run it on a quiet
machine: the other processes' load is measured as if it were the world's.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from seqpar.plan import Calibration, Cluster, ModelShape, PlanInput, measure, plan, profile, profile_rank
from seqpar.world import ProcessWorld

DOC = Path(__file__).resolve().parent.parent / "docs" / "planner.md"
BEGIN, END = "<!-- planner_regret:begin -->", "<!-- planner_regret:end -->"


def shapes(args) -> list[tuple[str, int, int, int]]:
    """(name, seq, heads, kv_heads)."""
    kinds = {"mha": (args.heads, args.heads), "gqa": (args.heads, max(1, args.heads // args.gqa_ratio))}
    return [(k, seq, *kinds[k]) for k in args.kinds for seq in args.seqs]


def calibration(run, args, heads: int, kv_heads: int) -> Calibration:
    ratio = heads // kv_heads
    path = Path(args.calibration_dir) / f"calibration-w{args.world}-g{ratio}-d{args.head_dim}.json"
    if path.exists() and not args.recalibrate:
        cal = Calibration.load(path)
        print(f"# using {path}: {cal.summary()}", file=sys.stderr)
        return cal
    t0 = time.time()
    cal = measure(run, args.world, ranks_per_node=args.world, dtypes=(args.dtype,), heads=ratio, kv_heads=1,
                  head_dim=args.head_dim, repeats=args.repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    print(f"# calibrated in {time.time() - t0:.0f} s, saved {path}: {cal.summary()}", file=sys.stderr)
    return cal


def study(args) -> tuple[list[dict], list[str]]:
    rows, cals = [], {}
    with ProcessWorld(args.world, timeout=3600, pg_timeout=1800) as world:
        run = lambda fn, *a, **kw: world.run(fn, *a, **kw)[0]  # noqa: E731
        for name, seq, heads, kv_heads in shapes(args):
            key = heads // kv_heads
            if key not in cals:
                cals[key] = calibration(run, args, heads, kv_heads)
            cal = cals[key]
            model = ModelShape(1, heads * args.head_dim, heads, kv_heads, 4 * heads * args.head_dim, 256)
            inp = PlanInput(Cluster(args.world, args.world, calibration=cal), model, seq, 1, args.dtype, True)
            candidates = plan(inp, args.strategies, tp=(1,), pp=(1,))  # one attention layer on the world
            opts = argparse.Namespace(profile_top=args.top, profile_iters=args.iters, profile_warmup=1,
                                      profile_confirm=args.confirm,
                                      profile_seq=None, profile_heads=None, profile_kv_heads=None,
                                      profile_head_dim=None, profile_dtype=None)
            t0 = time.time()
            report = profile(inp, candidates, opts, calibration=cal,
                             runner=lambda w, configs, kw: run(profile_rank, configs, **kw))
            measured = {c.label: c.measured for c in report.candidates}
            rows.append({"shape": f"{name} N={seq} h={heads}/{kv_heads}", "n": len(report.candidates),
                         "spearman": report.spearman, "regret": report.regret,
                         "confirmed": report.confirmed_regret,
                         "predicted_best": report.predicted_best, "measured_best": report.measured_best,
                         "t_pred_best": measured[report.predicted_best]["seconds"],
                         "t_best": measured[report.measured_best]["seconds"], "seconds": time.time() - t0,
                         "detail": [(c.label, c.measured.get("predicted_seconds"), c.measured.get("seconds"))
                                    for c in report.candidates]})
            print(f"# {rows[-1]['shape']}: spearman {report.spearman:.3f} regret {report.regret:.3f} confirmed "
                  f"{report.confirmed_regret:.3f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
    return rows, [c.summary() for c in cals.values()]


def markdown(rows: list[dict], cal_lines: list[str], args, total: float) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"Command: `python3 {' '.join(['benchmarks/planner_regret.py'] + sys.argv[1:])}` — machine: {cores}-core "
        f"CPU, gloo, {args.world} local processes of 1 thread; torch {torch.__version__}, Python "
        f"{platform.python_version()}; date {datetime.date.today().isoformat()}; total {total / 60:.0f} min.",
        f"Shapes: batch 1, head_dim {args.head_dim}, {args.dtype}, causal; every valid candidate, median of "
        f"{args.iters} interleaved iterations after a warm-up.",
        "",
        "| shape | candidates | Spearman | regret | confirmed regret | predicted best (measured) | measured best |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['n']} | {r['spearman']:.2f} | {r['regret']:.2f} | {r['confirmed']:.2f} | "
                     f"{r['predicted_best']} ({r['t_pred_best'] * 1e3:.0f} ms) | {r['measured_best']} "
                     f"({r['t_best'] * 1e3:.0f} ms) |")
    lines += ["", "Calibrations: " + "; ".join(cal_lines), ""]
    if args.details:
        for r in rows:
            lines += ["", f"{r['shape']}: predicted | measured (ms)", "", "```"]
            lines += [f"{label:<44} {p * 1e3 if p else float('nan'):9.1f} {m * 1e3 if m else float('nan'):9.1f}"
                      for label, p, m in r["detail"]]
            lines += ["```"]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc += f"\n{block}\n"
    DOC.write_text(doc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--kinds", nargs="+", default=["mha", "gqa"], choices=["mha", "gqa"])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--gqa-ratio", type=int, default=4, help="query heads per K/V head of the GQA shapes")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--confirm", type=int, default=5, help="re-measure the predicted and measured best (iterations)")
    p.add_argument("--top", type=int, default=0, help="profile only the best K predicted (0: all valid)")
    p.add_argument("--strategies", type=lambda s: s.split(","), help="comma-separated subset")
    p.add_argument("--repeats", type=int, default=5, help="calibration repeats")
    p.add_argument("--calibration-dir", default="runs/planner_regret")
    p.add_argument("--recalibrate", action="store_true", help="measure even when a saved calibration exists")
    p.add_argument("--details", action="store_true", help="also list predicted | measured per candidate")
    p.add_argument("--print", action="store_true", help="print the table instead of writing docs/planner.md")
    p.add_argument("--quick", action="store_true", help="seqs 4096 8192, 3 iterations")
    args = p.parse_args()
    if args.quick:
        args.seqs, args.iters = [4096, 8192], 3
    t0 = time.time()
    rows, cal_lines = study(args)
    text = markdown(rows, cal_lines, args, time.time() - t0)
    if args.print:
        print(text)
    else:
        write_doc(text)
        print(f"wrote the table into {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
