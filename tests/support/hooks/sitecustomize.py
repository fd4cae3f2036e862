"""Test-only fault hooks for subprocesses, enabled by putting this directory first on PYTHONPATH.

ALEXNET_TEST_FLOCK_REFUSED=1: fcntl.flock/lockf raise ENOSYS, as on Lustre mounted without -o flock.
ALEXNET_TEST_SLOW_READ=SECONDS: every source image read sleeps first (a long run to interrupt).
ALEXNET_TEST_SLOW_MATMUL_RANK=R: on rank R every `a @ b` of torch tensors takes 0.1 s longer: launch.preflight's
matmul (~10 ms on a CPU) measures a slow device there, every time, and names that rank.
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
