"""One-command GPU check of seqpar on a single CUDA device (<= 8 minutes on an H100).

Sections (each with its own time budget; a failing section is recorded, the others still run):

1. `gloo_cuda`: which gloo collectives accept CUDA tensors (2 processes on the one GPU:
   all_reduce, all_gather, reduce_scatter, all_to_all, send/recv); seqpar's sp groups need
   the P2P and all-to-all ones, so on one GPU the strategies run as single-rank contexts.
2. `kernels`: every block kernel that supports the device (fp32, bf16) against an fp64
   reference: out, lse, dq, dk, dv, max abs error relative to the reference's largest value.
3. `strategies`: every registered strategy as a single-rank context (a gloo world of one
   process; the collectives of a group of one) on CUDA tensors, fp32 and bf16, vs fp64.
4. `fpdt_offload`: FPDT with host offload (pinned buffers, the side copy stream and its
   prefetch) on a 4-chunk sequence: exactness and the host bytes metered.
5. `chunked_blocks`: FPDT's per-chunk block pipeline (with --offload-activations) on a
   training step, the sequence doubled until it does not fit (OOM) or the budget ends.
6. `compile`: a compiled decoder vs eager (loss and grad norm, fp32) and their step times.
7. `tflops`: the block kernel's forward+backward TFLOP/s beside torch's SDPA (causal, bf16).

Results: <out>/gpu_check.json and <out>/gpu_check.md (a markdown table per section).
`--smoke` runs every section at tiny sizes on whatever device there is (CPU here: the
CUDA-only parts are skipped with a message), so the script is tested without a GPU.

    python3 benchmarks/gpu_check.py                 # on the GPU machine (torch 2.11+, CUDA)
    python3 benchmarks/gpu_check.py --smoke         # anywhere, seconds to a minute
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar
from seqpar.kernels import available_kernels, get_kernel
from seqpar.model import ModelConfig, Transformer
from seqpar.testing.checks import reference_attention
from seqpar.world import start_ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# single-rank settings of each strategy (a group of one); FPDT with 2 chunks exercises its chunk loop
STRATEGY_KWARGS = {"fpdt": {"chunks": 2}}


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double().cpu() - ref.double().cpu()).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def _inputs(shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, k, v, dout [b, s, h(kv), d] (fp32 draws cast to dtype) on device."""
    b, s, h, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    q, dout = torch.randn(b, s, h, d, generator=g), torch.randn(b, s, h, d, generator=g)
    k, v = torch.randn(b, s, hkv, d, generator=g), torch.randn(b, s, hkv, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, dout))


_REFERENCES: dict[tuple, dict[str, torch.Tensor]] = {}


def _reference(q, k, v, dout, causal: bool) -> dict[str, torch.Tensor]:
    """fp64 naive attention on the CPU (out, lse, dq, dk, dv), kept per input for the next caller."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, causal, float(q.flatten()[:4].float().sum()))
    if key not in _REFERENCES:
        _REFERENCES[key] = _fp64_reference(q, k, v, dout, causal)
    return _REFERENCES[key]


def _fp64_reference(q, k, v, dout, causal: bool) -> dict[str, torch.Tensor]:
    full = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*full, causal)
    out.backward(dout.cpu().double())
    return {"out": out.detach(), "lse": lse.detach(), "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}


# -- 1. gloo on CUDA tensors -------------------------------------------------------------------------
def _gloo_probe(rank: int, size: int, init_file: str, device_type: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    x = torch.full((8,), float(rank + 1), device=device)
    ops: dict[str, Callable[[], None]] = {
        "all_reduce": lambda: dist.all_reduce(x.clone()),
        "all_gather": lambda: dist.all_gather([torch.empty_like(x) for _ in range(size)], x),
        "reduce_scatter": lambda: dist.reduce_scatter(torch.empty_like(x), [x.clone() for _ in range(size)]),
        "all_to_all_single": lambda: dist.all_to_all_single(torch.empty_like(x), x.clone()),
        "send_recv": lambda: (dist.send(x, 1) if rank == 0 else dist.recv(torch.empty_like(x), 0)),
    }
    out = {}
    for name, op in ops.items():
        try:
            op()
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - record what gloo refuses
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        dist.barrier()
    results.put((rank, out))
    dist.destroy_process_group()


def check_gloo_cuda(device: torch.device, smoke: bool) -> dict[str, Any]:
    import multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        queue = mp.get_context("spawn").Queue()
        procs = start_ranks(_gloo_probe, 2, lambda r: (r, 2, f"{tmp}/init", device.type, queue))
        got = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
    return [{"tensors": device.type, "op": op, "rank0": got[0][op], "rank1": got[1][op]} for op in got[0]]


# -- 2. block kernels -------------------------------------------------------------------------------------
def check_kernels(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    shape = (1, 256, 4, 2, 64) if smoke else (1, 2048, 8, 2, 128)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        q, k, v, dout = _inputs(shape, dtype, device)
        for causal in (False, True):
            ref = _reference(q, k, v, dout, causal)
            for name in available_kernels():
                try:
                    kernel = get_kernel(name, device, dtype)
                except ValueError as e:
                    rows.append({"kernel": name, "dtype": dtype_name, "causal": causal, "skipped": str(e)})
                    continue
                scale = 1.0 / math.sqrt(shape[-1])
                out, lse = kernel.forward(q, k, v, causal, scale)
                dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, scale)
                got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
                rows.append({"kernel": name, "dtype": dtype_name, "causal": causal,
                             **{key: _rel(got[key], ref[key]) for key in ref}})
    return rows


# -- 3. strategies as single-rank contexts ---------------------------------------------------------------
def _one_rank_world(tmp: str) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp}/world1", rank=0, world_size=1)


def _strategy_errors(ctx, q, k, v, dout, causal: bool) -> dict[str, float]:
    ref = _reference(q, k, v, dout, causal)
    leaves = [ctx.shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ctx.attention(*leaves, causal=causal, return_lse=True)
    out.backward(ctx.shard(dout))
    got = {"out": ctx.unshard(out), "lse": ctx.unshard(lse, dim=2), "dq": ctx.unshard(leaves[0].grad),
           "dk": ctx.unshard(leaves[1].grad), "dv": ctx.unshard(leaves[2].grad)}
    return {key: _rel(got[key], ref[key]) for key in ref}


def check_strategies(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    shape = (1, 256, 4, 2, 32) if smoke else (1, 2048, 8, 2, 128)
    rows = []
    for name in sorted(seqpar.STRATEGIES):
        for dtype_name, dtype in DTYPES.items():
            q, k, v, dout = _inputs(shape, dtype, device, seed=1)
            try:
                ctx = seqpar.init(name, **STRATEGY_KWARGS.get(name, {}))
                rows.append({"strategy": name, "dtype": dtype_name, "ranks": 1,
                             **_strategy_errors(ctx, q, k, v, dout, causal=True)})
            except Exception as e:  # noqa: BLE001 - a strategy that cannot run is a row, not the end
                rows.append({"strategy": name, "dtype": dtype_name, "error": f"{type(e).__name__}: {e}"[:200]})
    return rows


# -- 4. FPDT's host offload ------------------------------------------------------------------------------------
def check_fpdt_offload(device: torch.device, smoke: bool) -> dict[str, Any]:
    from seqpar.offload import HOST_BYTES
    shape = (1, 512, 4, 2, 32) if smoke else (1, 4096, 8, 2, 128)
    q, k, v, dout = _inputs(shape, torch.bfloat16, device, seed=2)
    ctx = seqpar.init("fpdt", chunks=4, offload=True)
    HOST_BYTES.reset_peak()
    start = HOST_BYTES.live
    errors = _strategy_errors(ctx, q, k, v, dout, causal=True)
    stream = device.type == "cuda"
    return {"chunks": 4, "dtype": "bfloat16", "seq": shape[1], "pinned_and_side_stream": stream,
            "host_peak_mib": (HOST_BYTES.peak - start) / 2**20, **errors,
            **({} if stream else {"note": "CPU: host offload keeps numpy copies, no pinned memory or copy stream"})}


# -- 5. the chunked-block pipeline at the longest sequence that fits ----------------------------------------
def _lm_step(model: Transformer, ctx, seq: int, device: torch.device, vocab: int) -> float:
    g = torch.Generator().manual_seed(seq)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    x, y = ctx.shard(tokens[:, :-1]).to(device), ctx.shard(tokens[:, 1:]).to(device)
    model.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    loss_sum, count = model(x, ctx.positions(seq, device), y)
    (loss_sum / count).backward()
    _sync(device)
    return time.perf_counter() - t0


def check_chunked_blocks(device: torch.device, smoke: bool, budget_s: float) -> dict[str, Any]:
    cfg = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2) if smoke else dict(dim=1024, n_layers=4, n_heads=16,
                                                                                 n_kv_heads=4)
    chunk = 128 if smoke else 8192
    seq, limit, fitted, deadline = chunk * 2, (chunk * 8 if smoke else 1 << 24), [], time.perf_counter() + budget_s
    while seq <= limit and time.perf_counter() < deadline:
        try:
            ctx = seqpar.init("fpdt", chunks=seq // chunk, offload=True)
            mc = ModelConfig(vocab_size=256, chunked_blocks=True, offload_activations=True, **cfg)
            model = Transformer(mc, ctx).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                seconds = _lm_step(model, ctx, seq, device, 256)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            fitted.append({"seq": seq, "step_s": seconds, "tokens_per_s": seq / seconds, "peak_gib": peak})
            del model
            if seconds * 2.5 > deadline - time.perf_counter():
                break
            seq *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    shape = f"dim {cfg['dim']}, {cfg['n_layers']} layers, {cfg['n_heads']}/{cfg['n_kv_heads']} heads"
    return [{"model": shape, "chunk_tokens": chunk, **run, "longest_so_far": run is fitted[-1]} for run in fitted]


# -- 6. compiled vs eager blocks ------------------------------------------------------------------------------
def check_compile(device: torch.device, smoke: bool) -> dict[str, Any]:
    backend = "aot_eager" if smoke and device.type == "cpu" else "inductor"
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2) if smoke else ModelConfig(dim=1024, n_layers=4,
                                                                                             n_heads=16, n_kv_heads=4)
    seq = 256 if smoke else 8192
    ctx = seqpar.init("local")
    out: dict[str, Any] = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Transformer(cfg, ctx).to(device)
        if mode == "compiled":
            for i, block in enumerate(model.layers):
                model.layers[i] = torch.compile(block, backend=backend)
        times = [_lm_step(model, ctx, seq, device, cfg.vocab_size) for _ in range(3)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        out[mode] = {"mode": mode, "backend": backend if mode == "compiled" else "-", "seq": seq,
                     "first_step_s": times[0], "step_s": min(times[1:]), "grad_norm": float(norm)}
    out["compiled"]["grad_norm_rel_diff"] = abs(out["compiled"]["grad_norm"] / out["eager"]["grad_norm"] - 1)
    return list(out.values())


# -- 7. kernel TFLOP/s beside SDPA -----------------------------------------------------------------------------
def _time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def check_tflops(device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    b, s, h, d = (1, 512, 4, 64) if smoke else (1, 16384, 16, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, dout = _inputs((b, s, h, h, d), dtype, device, seed=3)
    flops = 4 * b * h * s * s * d * 0.5 * 3.5  # causal; backward = 2.5 x forward
    kernel = get_kernel("auto", device, dtype)
    scale = 1.0 / math.sqrt(d)

    def block():
        out, lse = kernel.forward(q, k, v, True, scale)
        kernel.backward(dout, q, k, v, out, lse, True, scale)

    qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))

    def sdpa():
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(dout.transpose(1, 2))

    reps = 2 if smoke else 10
    return [{"impl": f"seqpar block kernel ({kernel.name})", "seq": s, "dtype": str(dtype).split(".")[-1],
             "tflops": flops / _time(block, device, reps) / 1e12},
            {"impl": "torch SDPA", "seq": s, "dtype": str(dtype).split(".")[-1],
             "tflops": flops / _time(sdpa, device, reps) / 1e12}]


# -- driver ------------------------------------------------------------------------------------------------
def _markdown(results: dict[str, Any]) -> str:
    lines = [f"# seqpar GPU check ({results['device']}, torch {results['torch']}, {results['date']})", ""]
    for name, value in results["sections"].items():
        lines += [f"## {name} ({value['seconds']:.1f} s)", ""]
        body = value.get("result", value.get("skipped") or value.get("error"))
        rows = body if isinstance(body, list) else [body] if isinstance(body, dict) else None
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
        else:
            lines.append(str(body))
        lines.append("")
    return "\n".join(lines)


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x).replace("|", "/").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU: CUDA-only parts skipped)")
    ap.add_argument("--out", default="runs/gpu_check", help="directory of gpu_check.json and gpu_check.md")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    a = ap.parse_args(argv)
    device = _device()
    if device.type != "cuda" and not a.smoke:
        print("gpu_check: no CUDA device; run with --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    cuda_only = {"fpdt_offload": "pinned memory and the copy stream need CUDA"} if device.type != "cuda" else {}
    budget = 20.0 if a.smoke else 150.0
    sections: dict[str, Callable[[], Any]] = {
        "gloo_cuda": lambda: check_gloo_cuda(device, a.smoke),
        "kernels": lambda: check_kernels(device, a.smoke),
        "strategies": lambda: check_strategies(device, a.smoke),
        "fpdt_offload": lambda: check_fpdt_offload(device, a.smoke),
        "chunked_blocks": lambda: check_chunked_blocks(device, a.smoke, budget),
        "compile": lambda: check_compile(device, a.smoke),
        "tflops": lambda: check_tflops(device, a.smoke),
    }
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "python": platform.python_version(), "smoke": a.smoke,
                               "date": datetime.datetime.now().isoformat(timespec="seconds"), "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        _one_rank_world(tmp)
        for name, run in sections.items():
            if a.only and name not in a.only:
                continue
            t0 = time.perf_counter()
            entry: dict[str, Any] = {}
            try:
                entry["result"] = run()
                if name in cuda_only:
                    entry["note"] = f"ran on CPU; on CUDA it also checks what {cuda_only[name]}"
            except Exception as e:  # noqa: BLE001 - every section reports, the check goes on
                entry["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            entry["seconds"] = time.perf_counter() - t0
            results["sections"][name] = entry
            print(f"gpu_check: {name}: {'error' if 'error' in entry else 'done'} in {entry['seconds']:.1f} s",
                  file=sys.stderr)
        dist.destroy_process_group()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(_markdown(results))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
