"""The (data-parallel x tensor-parallel) layout of a job: one object, built once, passed explicitly.

Ranks are laid out tp-fastest: global ranks 2k and 2k+1 form the tensor-parallel pair k (the
paper's two GPUs, which should share a node for the activation exchange), and the pairs form the
data-parallel dimension, over which each tower is replicated with DDP. Everything downstream
receives ``dp_rank``/``dp_size``/``tp_rank``/``tp_size`` from here and never reads ``RANK``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from basics.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    tp_size: int

    def __post_init__(self) -> None:
        if self.tp_size not in (1, 2):
            raise UserError(f"--tp must be 1 or 2 (the paper splits AlexNet over 2 GPUs); got {self.tp_size}")
        if self.world_size % self.tp_size:
            raise UserError(
                f"world size {self.world_size} is not divisible by --tp {self.tp_size}; "
                "start an even number of processes per node or use --tp 1"
            )

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that logs, writes TensorBoard and owns run-level files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"world {self.world_size} = dp {self.dp_size} x tp {self.tp_size}"


@dataclass
class Mesh:
    dims: ParallelDims
    dp_group: Any  # ProcessGroup over which each tower is replicated (None when not distributed)
    tp_group: Any  # ProcessGroup of the pair that holds the two towers (None when tp == 1)
    device_mesh: Any = None


def build_mesh(dims: ParallelDims, device_type: str) -> Mesh:
    """Named sub-groups ("dp", "tp") from torch's DeviceMesh; a trivial mesh without a process group."""
    if not dist.is_initialized():
        if dims.world_size != 1:
            raise RuntimeError("build_mesh: a multi-process layout needs an initialised process group")
        return Mesh(dims, None, None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.dp_size, dims.tp_size), mesh_dim_names=("dp", "tp"))
    tp_group = mesh["tp"].get_group() if dims.tp_size > 1 else None
    return Mesh(dims, mesh["dp"].get_group(), tp_group, mesh)
