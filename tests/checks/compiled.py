"""Per-rank checks of compiled blocks (run inside a ProcessWorld): dynamo's view of one block
(graphs and breaks around seqpar's attention op) and the op's tapes after backward."""
from __future__ import annotations

from typing import Any

import torch
import torch._dynamo

import seqpar
from seqpar import ops
from seqpar.model import Block, DiTBlock, ModelConfig, rope_tables

from .train import TINY_MODEL


def block_graphs(strategy: str, init_kwargs: dict[str, Any], kind: str = "llama",
                 documents: bool = False) -> dict[str, Any]:
    """torch._dynamo.explain of one block's forward (a decoder Block with RoPE, optionally packed
    documents, or a DiTBlock), then a forward/backward compiled with backend aot_eager and a
    counting backend: graphs dynamo made, graph breaks, and the op's tapes left after backward."""
    ctx = seqpar.init(strategy, **init_kwargs)
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    seq = 32
    x = torch.randn(2, seq // ctx.size, cfg.dim, requires_grad=True)
    if kind == "dit":
        block, args = DiTBlock(cfg.dim, cfg.n_heads, ctx), (torch.randn(2, cfg.dim),)
    else:
        block = Block(cfg, ctx)
        cu = torch.tensor([0, 12, 32]) if documents else None
        rope = rope_tables(ctx.positions(seq, cu_seqlens=cu), cfg.head_dim, cfg.rope_theta, torch.float32)
        args = (rope, cu)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, *args)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    block.compile(backend=counting)
    out = block(x, *args)
    out.sum().backward()
    ops_in_graph = sum(str(node.target) == "seqpar.attention.default" for gm in graphs for node in gm.graph.nodes)
    return {"graph_count": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "compiled_graphs": len(graphs), "attention_ops": ops_in_graph, "live_tapes": ops.live_tapes(),
            "grad_finite": bool(torch.isfinite(x.grad).all())}
