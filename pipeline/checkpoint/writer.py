"""DCP's file writer with the save's phase marks: which parts are disk work and which wait for the other ranks.

The watchdog allows disk work ("checkpoint") the slow allowance and waiting ("checkpoint-sync") the step's; a
rank must enter the same marks in the same order as every other rank, so the writer marks at DCP's own steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed.checkpoint as dcp

# A phase change for the progress watchdog: (phase, alone). ``alone``: only this rank does it (rank 0's
# commit), so it moves the rank's phase on without a marker of its own (tick) (pipeline.phases.PhaseMarks).
MarkPhase = Callable[[str, bool], None]


class PhaseMarkingWriter(dcp.FileSystemWriter):
    """DCP's file writer, telling the watchdog which parts of a save are disk work ("checkpoint", the
    slow allowance) and which wait for the other ranks ("checkpoint-sync": DCP's plan gather and scatter,
    the gather of every rank's write results, the broadcast of the metadata). Every rank enters the same
    markers; the coordinator's metadata write only ticks into its phase."""

    def __init__(self, path: str, phase: MarkPhase):
        super().__init__(path, sync_files=True)
        self._phase = phase

    def prepare_local_plan(self, plan: Any) -> Any:
        self._phase("checkpoint", False)  # creates the directory
        plan = super().prepare_local_plan(plan)
        self._phase("checkpoint-sync", False)  # then the plan's gather and scatter
        return plan

    def write_data(self, plan: Any, planner: Any) -> Any:
        self._phase("checkpoint", False)
        written = super().write_data(plan, planner)  # synchronous: the future returned is done
        self._phase("checkpoint-sync", False)  # then the results' gather and the metadata's broadcast
        return written

    def finish(self, metadata: Any, results: Any) -> None:
        self._phase("checkpoint", True)  # the coordinator only: .metadata written while the others wait
        super().finish(metadata, results)
        self._phase("checkpoint-sync", True)
