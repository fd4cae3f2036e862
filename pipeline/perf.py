"""How hard the devices work and what they hold: model FLOP/s and MFU, memory per rank, the snapshot on OOM.

Model FLOPs (the convention of PaLM's MFU and torchtitan): the forward FLOPs per image are the layer
table's (``pipeline.model.layer_table``: 2 x multiply-adds of every conv and fc layer of the whole
model, both towers; LRN, pooling and ReLU not counted), and a training step costs 3 x forward per image
(backward computes the gradients of the inputs and of the weights, each as much as the forward; conv1's
unneeded input gradient is counted too, as usual). Achieved model FLOP/s of the job = 3 x forward x
images/s; per device = that / world size (the towers split every layer's FLOPs exactly between a pair);
MFU = per device / the device's peak (:data:`PEAK_TFLOPS`), which counts what the model needs, not what
the kernels did (recomputation, padding and LRN are free in it).

Memory per rank at each logged step: the host's resident set (``/proc/self/statm``) and on CUDA torch's
allocated (peak since the start) and reserved bytes, and the device's whole used memory
(``cudaMemGetInfo``): DALI's memory pool lives outside torch's allocator, and DALI exposes its size only
per operator with ``enable_memory_stats`` on a pipeline, so DALI's pool, CUDA contexts and cuDNN's
workspaces are the used memory less torch's reserved (``mem/device_other_gib``).

On a CUDA out-of-memory error the run writes ``RUN_DIR/memory/oom-<time>-rank-N.pickle``
(``torch.cuda.memory._dump_snapshot``; the allocation history is recorded from the start, bounded by
``--profile.memory-history`` entries: 10,000 by default, ~1.5-2 KB of host memory each, docs/BENCHMARKS.md)
and ends with one line naming the file and the viewer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from basics.errors import UserError
from pipeline.model import ModelConfig, build_model, layer_table
from pipeline.run_dir import RunDir

log = logging.getLogger("alexnet")

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (inputs' and weights' gradients) = 3 x forward
MEMORY_VIEWER = "https://pytorch.org/memory_viz"

# Dense peak TFLOP/s per device (vendor data sheets, no sparsity). "fp32" is the CUDA-core figure, "tf32"
# the tensor-core one that cuDNN's convolutions use for fp32 tensors by default (torch.backends.cudnn.allow_tf32).
# Matching: the most specific name first (the longest key found in torch.cuda.get_device_name() wins, whatever
# the table's order), so "NVIDIA H100 NVL" takes the NVL row, not the SXM5 one that a bare "H100" names.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},  # per GPU, as the others
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_row(device_name: str) -> str | None:
    """The table's key for a device name: the longest one found in it (None: not in the table)."""
    found = [key for key in PEAK_TFLOPS if key in device_name]
    return max(found, key=len) if found else None


def forward_flops_per_image(cfg: ModelConfig) -> int:
    """The whole model's forward FLOPs per image, from the layer table (shapes only: built on the meta device,
    never compiled, whatever ``cfg.compile`` says)."""
    # Never compiled: a compile here costs a cold compile at every start, and Dynamo keeps its shape guesses
    # per code object, so after this batch-1 forward the run's training and evaluation graphs would compile
    # with a dynamic batch dimension instead of the static ones the model benchmark measured.
    # Building draws initial weights from the RNG even on the meta device: fork it, so counting FLOPs leaves
    # the run's random stream (dropout masks, seeded per replica just before) as it was.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, compile=False))
    return sum(row.flops for row in layer_table(model))


def precision(amp: str) -> str:
    """The peak that applies to this run's matmuls and convolutions."""
    if amp == "bf16":
        return "bf16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def peak_tflops(device: torch.device, amp: str, override: float = 0.0) -> float | None:
    """The device's peak TFLOP/s for this run's precision: ``override`` when given, else the table's; None
    for a CPU or a GPU not in the table (no MFU then)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    key = peak_row(torch.cuda.get_device_name(device))
    return PEAK_TFLOPS[key][precision(amp)] if key else None


class Throughput:
    """Model FLOP/s and MFU from a logged images/s (the job's, all data-parallel replicas)."""

    def __init__(self, forward_flops: int, world_size: int, peak: float | None):
        self.forward_flops, self.world_size, self.peak = forward_flops, world_size, peak

    def scalars(self, images_per_s: float) -> dict[str, float | None]:
        job = TRAIN_FLOPS_PER_FORWARD * self.forward_flops * images_per_s / 1e12
        per_device = job / self.world_size
        return {
            "perf/model_tflops": job,
            "perf/model_tflops_per_device": per_device,
            "perf/mfu": per_device / self.peak if self.peak else None,
        }


# ---------------------------------------------------------------------------------------------- memory


def host_rss_bytes() -> int:
    """This process's resident set size."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_figures(device: torch.device) -> list[float]:
    """GiB: host RSS, then on CUDA torch's peak allocated (since the last logged step: TrainLog resets it),
    reserved, and the device's used."""
    figures = [host_rss_bytes() / 2**30]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        figures += [
            torch.cuda.max_memory_allocated(device) / 2**30,
            torch.cuda.memory_reserved(device) / 2**30,
            (total - free) / 2**30,
        ]
    return figures


def memory_scalars(device: torch.device) -> dict[str, float]:
    """Every rank's memory figures as TensorBoard scalars ``mem/<what>/rank<r>`` (a collective: every rank
    calls it at the same logged steps; one small all-gather)."""
    mine = torch.tensor(memory_figures(device), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    else:
        every = [mine]
    names = ["host_rss_gib", "torch_allocated_peak_gib", "torch_reserved_gib", "device_used_gib"]
    out: dict[str, float] = {}
    for rank, row in enumerate(every):
        values = dict(zip(names, row.tolist()))
        for name, value in values.items():
            out[f"mem/{name}/rank{rank}"] = value
        if "device_used_gib" in values:  # DALI's pool, CUDA contexts, cuDNN workspaces: outside torch's allocator
            out[f"mem/device_other_gib/rank{rank}"] = values["device_used_gib"] - values["torch_reserved_gib"]
    return out


# ---------------------------------------------------------------------------------------------- OOM


@contextmanager
def oom_snapshot(
    run_dir: str | Path,
    rank: int,
    device: torch.device,
    max_entries: int,
    dump: Callable[[str], None] | None = None,
    record: Callable[..., None] | None = None,
) -> Iterator[None]:
    """Records CUDA allocations (bounded) while the body runs; a CUDA out-of-memory error in it writes a
    snapshot and becomes one line naming the file and the viewer. ``dump``/``record``: torch's by default."""
    on = device.type == "cuda" and max_entries > 0
    if on:
        # Python stacks only: C++ stacks (torch's default) make every allocation much slower.
        (record or torch.cuda.memory._record_memory_history)(max_entries=max_entries, stacks="python")
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        if not on:
            raise
        folder = RunDir(run_dir).memory
        path = folder / f"oom-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-rank-{rank}.pickle"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (dump or torch.cuda.memory._dump_snapshot)(str(path))
            where = f"memory snapshot {path} (open it at {MEMORY_VIEWER})"
        except (OSError, RuntimeError) as failed:
            where = f"no memory snapshot ({failed})"
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        raise UserError(
            f"rank {rank}: CUDA out of memory ({first}); {where}; lower --batch-size, use --train.amp bf16 "
            "or free the device"
        ) from None
    finally:
        if on:
            (record or torch.cuda.memory._record_memory_history)(enabled=None)
