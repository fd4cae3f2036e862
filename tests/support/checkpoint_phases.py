"""Two gloo ranks saving one checkpoint, each one's phases sampled while it waits (the rank body of
test_watchdog's phase test; spawned processes import it without pytest).

Rank 0 is late into the save (rank 1 waits in the save's first collective), rank 1's file write is slow
(rank 0 waits in DCP's gather of the write results) and rank 0's commit is slow (rank 1 waits in the
outcome's all-gather). Each rank records, every 20 ms, the phase its marks show (``pipeline.phases``), and at
the end its marker count, to ``DIR/phases-rank{R}.json``.
"""

from __future__ import annotations

import json
import threading
import time

import torch
import torch.distributed as dist

from tests.support.tensor_parallel import gloo_group

DELAY_S = 1.5


def save_with_delays(rank: int, workdir: str) -> None:
    from torch.distributed import checkpoint as dcp

    from pipeline.checkpoint import CheckpointConfig, Checkpointer, TrainState
    from pipeline.config import RunConfig
    from pipeline.model import ModelConfig, build_model
    from pipeline.phases import PhaseMarks
    from pipeline.schedule import LRSchedule

    with gloo_group(rank, workdir) as root:
        cfg = RunConfig(run_dir=str(root / "run"))
        cfg.model = ModelConfig(num_classes=4, widths=(8, 16, 16, 16, 8), fc_width=16)
        model = build_model(cfg.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        layout = {"world_size": 2, "dp_size": 2, "tp_size": 1}
        state = TrainState(model, optimizer, LRSchedule(cfg.schedule, 0.01), cfg, layout, rank=rank, tp_rank=0)
        marks = PhaseMarks()
        saver = Checkpointer(root / "run", CheckpointConfig(every_minutes=0), rank, marks=marks)
        if rank == 1:
            write = dcp.FileSystemWriter.write_data

            def slow_write(self, plan, planner):
                time.sleep(DELAY_S)  # DCP's file writing, which the marked writer wraps
                return write(self, plan, planner)

            dcp.FileSystemWriter.write_data = slow_write
        else:
            commit = Checkpointer._commit

            def slow_commit(self, *args, **kwargs):
                time.sleep(DELAY_S)
                return commit(self, *args, **kwargs)

            Checkpointer._commit = slow_commit
        samples: list[tuple[float, str]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.monotonic(), marks.current.phase))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        dist.barrier()
        sampler.start()
        marks.enter("checkpoint")  # what the trainer enters before save()
        if rank == 0:
            time.sleep(DELAY_S)  # late into the save: rank 1 waits in its first collective
        saver.save(state, torch.device("cpu"))
        done.set()
        sampler.join()
        (root / f"phases-rank{rank}.json").write_text(json.dumps({"samples": samples, "seq": marks.current.seq}))
