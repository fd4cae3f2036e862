"""Process set-up, in one place: who this process is (torchrun's / srun's environment), its device, and
the process group every entry point starts and ends the same way.

    env = ProcessEnv.from_environ()                      # RANK, WORLD_SIZE, LOCAL_RANK (1 process: 0, 1, 0)
    device = select_device("auto", env.local_rank)       # cuda:LOCAL_RANK when a GPU is visible, else cpu
    with process_group(env, device, timedelta(minutes=10)):
        ...                                              # dist is initialised when WORLD_SIZE > 1

This is the only module that reads the process environment; ``launch.train``, ``launch.preflight``,
``pipeline.tools.evaluate`` and ``pipeline.tools.analysis`` use it. Everything past it receives ranks explicitly
(``pipeline.mesh.ParallelDims``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from basics.errors import UserError


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> ProcessEnv:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def select_device(preference: str, local_rank: int, option: str = "--train.device") -> torch.device:
    """``auto``: this rank's GPU when CUDA is visible, else the CPU; ``cuda`` without a GPU is ``option``'s error.

    The local rank is this process's CUDA ordinal (and DALI's ``device_id``), so it must be below the number
    of visible devices: with one GPU bound per task (Slurm ``--gpus-per-task``, ``--gpu-bind``) every task
    sees its GPU as ordinal 0, and more local ranks than GPUs cannot all have one. ``auto`` on a machine
    whose GPUs torch cannot use (a driver older than the wheels' CUDA) is an error too: falling back to the
    CPU would train every rank on gloo with one INFO line.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if preference == "cuda":
            raise UserError(f"{option} cuda, but no CUDA device is visible")
        if gpus := unusable_gpus():
            raise UserError(
                f"{option} auto: this machine has NVIDIA GPUs ({gpus}) but torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}) cannot use them (a driver older than that CUDA?); fix the driver "
                f"or the torch build, or pass {option} cpu to train on the CPU"
            )
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"{option}: local rank {local_rank} needs CUDA device {local_rank} but this process sees {count} "
            f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}); start at most {count} "
            "processes per node, or give every process all of the node's GPUs (no --gpus-per-task / "
            "--gpu-bind under Slurm; torchrun's workers share the node's CUDA_VISIBLE_DEVICES)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def unusable_gpus() -> str:
    """What says this machine has NVIDIA GPUs (the driver's device nodes), for when torch sees none; ""."""
    if torch.version.cuda is None:
        return ""  # a CPU-only torch build: CPU is what was installed
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return ""  # hidden on purpose: the CPU is what was asked for
    nodes = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    return f"{len(nodes)} device node(s) /dev/{nodes[0]}..." if nodes else ""


@contextmanager
def process_group(env: ProcessEnv, device: torch.device, timeout: timedelta) -> Iterator[None]:
    """The default process group for a multi-process run (NCCL on GPUs, gloo on CPU), destroyed on the way out.

    One process, or a group someone already started (a test, ``launch.submit``'s caller): nothing to do.
    """
    started = env.world_size > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=process_group_store(env, timeout),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def process_group_store(env: ProcessEnv, timeout: timedelta) -> dist.Store | None:
    """Under torchrun with a shared rendezvous store: that store, with this attempt's key prefix.

    torch's env:// set-up uses the agent's store without a prefix, so a restarted group finds the
    previous group's keys (its ranks' addresses) and connects to dead ranks; the prefix per restart
    count keeps each attempt's keys apart. None elsewhere (env:// makes rank 0 host a fresh store).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"/alexnet/attempt_{attempt}", agent_store)
