"""Per-rank bodies of the pipeline-parallelism tests."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from seqpar.parallel import ParallelDims
from seqpar.train import TrainConfig, Trainer


def pipeline_layout(sp: int, pp: int) -> dict[str, Any]:
    """This rank's coordinates, the members (global ranks) of its groups and the DeviceMesh."""
    dims = ParallelDims(sp, pp=pp)
    members = {name: dist.get_process_group_ranks(getattr(dims, f"{name}_group"))
               for name in ("pp", "dp", "sp", "tp", "batch")}
    mesh = dims.device_mesh
    return {"coords": (dims.pp_rank, dims.dp_rank, dims.sp_rank, dims.tp_rank), "members": members,
            "mesh": (tuple(mesh.shape), mesh.mesh_dim_names)}


def pipeline_step(cfg: dict[str, Any]) -> dict[str, Any]:
    """One training step: this rank's stage, the parameter names it holds and its counted
    pipeline P2P bytes (sent, received)."""
    trainer = Trainer(TrainConfig.of(**cfg))
    trainer.train_step()
    p2p = trainer.mesh.stats.snapshot().get("pp_p2p", {"sent": 0, "recv": 0})
    if trainer.log is not None:
        trainer.log.close()
    return {"stage": trainer.mesh.pp_rank, "names": [n for n, _ in trainer.model.named_parameters()],
            "sent": p2p["sent"], "recv": p2p["recv"]}
