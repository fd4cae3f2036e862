"""Test-only fault hooks for subprocesses, enabled by putting this directory first on PYTHONPATH.

ALEXNET_TEST_FLOCK_REFUSED=1: fcntl.flock/lockf raise ENOSYS, as on Lustre mounted without -o flock.
ALEXNET_TEST_SLOW_READ=SECONDS: every source image read sleeps first (a long run to interrupt).
ALEXNET_TEST_HANG_AT=STEP: in training ranks, every rank's first control step at or after STEP never
returns (a control all-reduce that hangs everywhere; the ranks stay in phase "control").
ALEXNET_TEST_UNREACHABLE_NODE=NODE: ranks on Slurm node NODE listen for the watchdog's reachability probe
on a socket that answers nothing (tests/support/harness.py BlackholeListener), as behind a cut link.
ALEXNET_TEST_SLOW_MATMUL_RANK=R: on rank R every `a @ b` of torch tensors takes 0.1 s longer: launch.preflight's
matmul (~10 ms on a CPU) measures a slow device there, every time, and names that rank.
ALEXNET_TEST_CRASH_AT=STEP: in training ranks, the step after STEP steps raises RuntimeError (its message holds
the pid, which differs every attempt); with ALEXNET_TEST_CRASH_ONCE=PATH only while PATH does not exist (it is
created first): a crash that does not repeat.
ALEXNET_TEST_SLOW_PLAN_S=SECONDS: in training ranks, preparing an epoch in the background (the next epoch's plan)
runs torch matmuls (native code, the GIL released) until it is cancelled and then SECONDS more, as a plan that
cannot stop half-way on a loaded machine does: a thread still in it when the interpreter exits aborts the
process ("terminate called without an active exception").
"""

import errno
import os

if os.environ.get("ALEXNET_TEST_FLOCK_REFUSED"):
    import fcntl

    def _refused(*args, **kwargs):
        raise OSError(errno.ENOSYS, "Function not implemented (flock refused by the test hook)")

    fcntl.flock = _refused
    fcntl.lockf = _refused

if os.environ.get("ALEXNET_TEST_SLOW_READ"):
    import time

    from preprocess import sources

    _delay = float(os.environ["ALEXNET_TEST_SLOW_READ"])
    _read = sources.SourceItem.read

    def _slow_read(self, *args, **kwargs):
        time.sleep(_delay)
        return _read(self, *args, **kwargs)

    sources.SourceItem.read = _slow_read

if os.environ.get("ALEXNET_TEST_HANG_AT") and "RANK" in os.environ:
    import threading

    from pipeline import train

    _at = int(os.environ["ALEXNET_TEST_HANG_AT"])
    _control = train.Trainer._control

    def _hung_control(self, *args, **kwargs):
        if self.progress.step >= _at:
            self.marks.enter("control", self.progress.step)
            threading.Event().wait()
        return _control(self, *args, **kwargs)

    train.Trainer._control = _hung_control

if os.environ.get("ALEXNET_TEST_UNREACHABLE_NODE") == os.environ.get("SLURMD_NODENAME") and "RANK" in os.environ:
    from pipeline.faults import reach
    from tests.support.harness import BlackholeListener

    reach.Listener = lambda: BlackholeListener(reach.job_address())

if os.environ.get("ALEXNET_TEST_SLOW_MATMUL_RANK") == os.environ.get("RANK", "-"):
    # The operator, not launch.preflight's function: `python -m launch.preflight` runs a fresh copy of the
    # module as __main__, which a patch of the imported module would not reach.
    import time

    import torch

    _matmul = torch.Tensor.__matmul__

    def _slow_matmul(self, other):
        time.sleep(0.1)
        return _matmul(self, other)

    torch.Tensor.__matmul__ = _slow_matmul

if os.environ.get("ALEXNET_TEST_CRASH_AT") and "RANK" in os.environ:
    from pathlib import Path

    from pipeline import train_step

    _crash_at = int(os.environ["ALEXNET_TEST_CRASH_AT"])
    _once = os.environ.get("ALEXNET_TEST_CRASH_ONCE")
    _call = train_step.TrainStep.__call__

    def _crashing_call(self, *args, step, **kwargs):
        if step == _crash_at and not (_once and Path(_once).exists()):
            if _once:
                Path(_once).touch()
            raise RuntimeError(f"injected crash in pid {os.getpid()} at 0x{id(self):x}")
        return _call(self, *args, step=step, **kwargs)

    train_step.TrainStep.__call__ = _crashing_call

if os.environ.get("ALEXNET_TEST_SLOW_PLAN_S") and "RANK" in os.environ:
    import time

    import torch

    from pipeline.data import planner

    _plan_s = float(os.environ["ALEXNET_TEST_SLOW_PLAN_S"])
    _prepare = planner.EpochInputs.prepare

    def _slow_prepare(self, *args, cancel=None, **kwargs):
        a, end = torch.rand(400, 400), time.monotonic() + 120
        while cancel is not None and not cancel.is_set() and time.monotonic() < end:
            a @ a
        end = time.monotonic() + _plan_s
        while time.monotonic() < end:
            a @ a
        return _prepare(self, *args, cancel=cancel, **kwargs)

    planner.EpochInputs.prepare = _slow_prepare
