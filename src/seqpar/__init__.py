"""seqpar: exact sequence-parallel attention and long-sequence training on torch.distributed.

    ctx = seqpar.init("wallfacer", team_size=2, layout="zigzag")
    q, k, v = (ctx.shard(t) for t in (q_full, k_full, v_full))
    out = ctx.attention(q, k, v, causal=True)
"""
from .attention import STRATEGIES, Settings, Strategy, StrategyOptions, register
from .comm import CommStats
from .context import SeqParallel, init, resolve
from .kernels import available_kernels, get_kernel
from .layout import LAYOUTS, TokenLayout
from .modules import SequenceParallelAttention, UlyssesAttention
from .parallel import ParallelDims

__version__ = "0.1.0"
__all__ = ["init", "resolve", "Settings", "StrategyOptions", "Strategy", "register", "SeqParallel", "ParallelDims",
           "SequenceParallelAttention", "UlyssesAttention", "CommStats", "TokenLayout", "LAYOUTS", "STRATEGIES",
           "get_kernel", "available_kernels", "__version__"]
