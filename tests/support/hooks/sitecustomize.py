"""Test-only fault hooks for subprocesses, enabled by putting this directory first on PYTHONPATH.

ALEXNET_TEST_FLOCK_REFUSED=1: fcntl.flock/lockf raise ENOSYS, as on Lustre mounted without -o flock.
ALEXNET_TEST_SLOW_READ=SECONDS: every source image read sleeps first (a long run to interrupt).
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
