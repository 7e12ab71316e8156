"""Per-rank bodies of the hybrid-parallelism tests (tensor x sequence x data parallelism)."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

import seqpar
from seqpar.parallel import ParallelDims


def layout_groups(sp: int, tp: int) -> dict[str, Any]:
    """This rank's coordinates and the members (global ranks) of each of its groups."""
    dims = ParallelDims(sp, tp=tp)
    members = {name: dist.get_process_group_ranks(getattr(dims, f"{name}_group"))
               for name in ("dp", "sp", "tp", "batch")}
    mesh = dims.device_mesh
    ctx = seqpar.init("ring", group=mesh)  # the "sp" dimension of the DeviceMesh
    return {"coords": (dims.dp_rank, dims.sp_rank, dims.tp_rank), "members": members,
            "mesh": (tuple(mesh.shape), mesh.mesh_dim_names), "ctx_ranks": dist.get_process_group_ranks(ctx.group),
            "batch_mesh": tuple(dims.batch_mesh.shape)}


def init_error(**options: Any) -> str:
    """The error seqpar.init raises for a 2-D DeviceMesh without an "sp" dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("a", "b"))
    try:
        seqpar.init("ring", group=mesh, **options)
    except ValueError as e:
        return str(e)
    return ""
