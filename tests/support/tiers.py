"""The suite's tiers: pytest markers, the fixtures that imply them, and a check that keeps them honest.

    make test-fast   pytest -m "not (slurm or netns or multiprocess or slow)"   (the inner loop, minutes)
    make test        everything (CI)

A test lands in the right tier by default, without anyone remembering a marker:
- it is tagged `slurm` when it uses the `slurm_cluster` fixture, `multiprocess` when it uses a fixture that
  trains in other processes (`trained_run`), `netns` when its module says so;
- whatever it uses, the processes it and its fixtures start are watched while it runs (through
  subprocess.Popen, os.system, a shell's ``-c`` text, ``env``, a Python started with options, or a project
  script that starts torchrun): a test that starts torchrun, spawns
  torch ranks (torch.multiprocessing) or has two training processes alive at once (`launch.train`, the
  test harness, ...; a process pool or a lock race trains nothing), and is not tagged `multiprocess` (or
  `slurm`/`netns`, which imply it), fails with a line saying which marker it needs. So `make test-fast`
  never runs multi-process training, and a new test that does is caught the first time it runs, in
  either tier;
- a fast-tier test that takes longer than SLOW_S is named at the end of the run (not failed: speed
  depends on the machine), so it can be tagged `slow`.

Where a test lives says what it is: ``tests/unit/`` holds tests that run in the test's own process, in the
fast tier; ``tests/integration/`` the ones that run real processes, Slurm, namespaces, or take long. A test
in ``tests/unit/`` that is tagged (or found to need) a heavy tier fails, saying to move it.
"""

from __future__ import annotations

import multiprocessing.process
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

MARKERS = {
    "slurm": "runs jobs on a real local Slurm cluster (root; installs slurm-wlm with apt when missing)",
    "netns": "emulated nodes in Linux network namespaces (root: CAP_NET_ADMIN, CAP_SYS_ADMIN)",
    "multiprocess": "starts torchrun, spawns torch ranks, or runs two training processes at once",
    "slow": "takes more than ~30 s on 2 CPU cores",
    "cuda": "needs a CUDA device (skipped elsewhere; run by `make gpu-check`)",
}
HEAVY = ("slurm", "netns", "multiprocess", "slow")
FAST_EXPRESSION = "not (" + " or ".join(HEAVY) + ")"
# The fixtures that imply a tier: a test using one is tagged without a marker of its own.
FIXTURE_TIERS = {"slurm_cluster": "slurm", "slurm_cluster_4nodes": "slurm", "trained_run": "multiprocess"}
# Tiers that already allow multi-process training (a Slurm job or an emulated node runs torchrun).
ALLOWS_PROCESSES = {"slurm", "netns", "multiprocess"}
SLOW_S = 20.0


# Command lines that run training code in the process they start (under torchrun, or side by side).
TRAINING_ENTRIES = ("launch.train", "launch.submit", "launch.preflight", "pipeline.tools.evaluate", "harness.py")


# Project scripts that start torchrun themselves, as ``"$PYTHON" -m torch.distributed.run`` (run with bash
# outside Slurm by some tests): one given a PYTHON that is no Python (a stand-in that trains nothing) does not.
TORCHRUN_SCRIPTS = ("slurm/train.sh",)
SHELLS = ("sh", "bash", "dash", "zsh")
# Words that run the command after them: `env A=1 CMD`, `exec CMD`, `timeout 60 CMD`, ...
WRAPPERS = ("env", "exec", "nohup", "setsid", "nice", "time", "timeout")
TAKES_VALUE = {"env": ("-u", "--unset", "-C", "--chdir"), "timeout": ("-s", "--signal", "-k", "--kill-after")}
PYTHON_TAKES_VALUE = ("-W", "-X", "--check-hash-based-pycs")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def _entries(argv: Any) -> list[str]:
    """What ``argv`` runs, one entry per command: the program, ``python -m``'s module or a script's path.
    ``argv`` is a list or a shell string; a shell's ``-c`` text, ``env``/``exec``/``timeout`` prefixes,
    assignments and the interpreter's own options are looked through."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        text = os.fsdecode(argv).replace("\n", " ; ")
        try:
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: words are enough
            tokens = text.split()
        commands: list[list[str]] = [[]]
        for token in tokens:  # one command between ; && || | & ( ) and redirections
            if token and set(token) <= set("();<>|&"):
                commands.append([])
            else:
                commands[-1].append(token)
        return [entry for words in commands for entry in _command(words)]
    if isinstance(argv, (list, tuple)):
        return _command([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv])
    return []


def _command(words: list[str]) -> list[str]:
    while words and (ASSIGNMENT.match(words[0]) or os.path.basename(words[0]) in WRAPPERS):
        word = words.pop(0)
        wrapper = "" if ASSIGNMENT.match(word) else os.path.basename(word)
        while wrapper in ("env", "timeout") and words and (words[0].startswith("-") or ASSIGNMENT.match(words[0])):
            option = words.pop(0)
            if option in TAKES_VALUE[wrapper] and words:
                words.pop(0)
        if wrapper == "timeout" and words:
            words.pop(0)  # the duration
    if not words:
        return []
    name, rest = os.path.basename(words[0]), words[1:]
    if name in SHELLS:
        for i, word in enumerate(rest):
            if word.startswith("-") and "c" in word.lstrip("-") and not word.startswith("--"):
                return _entries(rest[i + 1]) if i + 1 < len(rest) else []
            if not word.startswith("-"):
                return [word]  # a script
        return []
    if re.fullmatch(r"python[\d.]*", name):
        i = 0
        while i < len(rest) and rest[i].startswith("-") and rest[i] != "-":
            if rest[i] == "-m":
                return rest[i + 1 : i + 2]
            if rest[i] == "-c":
                return []  # code in a string: not a command line
            i += 2 if rest[i] in PYTHON_TAKES_VALUE else 1
        return rest[i : i + 1]
    return [words[0]]


def is_torchrun(argv: Any, env: Any = None) -> bool:
    """Whether ``argv`` (a list, or a shell string) starts torchrun (or ``python -m torch.distributed.run``, or
    a project script that starts it, unless ``env``, the process's environment, names a stand-in PYTHON)."""
    python = os.path.basename(str((env if env is not None else os.environ).get("PYTHON") or "python"))
    script_runs_it = re.fullmatch(r"python[\d.]*", python) is not None
    return any(
        os.path.basename(entry) == "torchrun"
        or entry == "torch.distributed.run"
        or (script_runs_it and entry.endswith(TORCHRUN_SCRIPTS))
        for entry in _entries(argv)
    )


def is_training(argv: Any) -> bool:
    """Whether ``argv`` starts one of the project's training entry points (a rank, when two run at once)."""
    return any(entry.endswith(TRAINING_ENTRIES) for entry in _entries(argv))


class ProcessWatch:
    """What the test that runs now starts: torchrun, torch ranks, and the most training processes alive at once.

    One training process (a command's one-line error, a short run) is fast-tier work; so are process pools and
    lock races that train nothing. torchrun, spawned torch ranks, or two training processes side by side are
    multi-process training.
    """

    def __init__(self) -> None:
        self.started_what: set[str] = set()
        self.peak = 0
        self.slow_untagged: list[str] = []  # "SECONDS  NODEID" of untagged tests over SLOW_S, for the summary
        self._alive: list[Any] = []  # started training processes (anything with Popen's poll())
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.started_what.clear()
            self.peak = 0
            self._alive.clear()

    def started(self, what: str) -> None:
        with self._lock:
            self.started_what.add(what)

    def training(self, process: Any) -> None:
        with self._lock:
            self._alive = [p for p in self._alive if p.poll() is None]
            self._alive.append(process)
            self.peak = max(self.peak, len(self._alive))

    def verdict(self) -> str | None:
        """Why the test needs the `multiprocess` tier, or None."""
        with self._lock:
            if self.started_what:
                return f"it starts {' and '.join(sorted(self.started_what))}"
            if self.peak >= 2:
                return f"it runs {self.peak} training processes at once"
        return None


WATCH = ProcessWatch()


def _install_watch() -> None:
    popen_init = subprocess.Popen.__init__

    def watched_popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        popen_init(self, args, *rest, **kwargs)
        if is_torchrun(args, kwargs.get("env")):
            WATCH.started("torchrun")
        elif is_training(args):
            WATCH.training(self)

    subprocess.Popen.__init__ = watched_popen_init  # type: ignore[method-assign]

    system = os.system

    class Running:  # an os.system command, alive until it returns
        def __init__(self) -> None:
            self.code: int | None = None

        def poll(self) -> int | None:
            return self.code

    def watched_system(command: Any) -> int:
        running = Running()
        if is_torchrun(command):
            WATCH.started("torchrun")
        elif is_training(command):
            WATCH.training(running)
        try:
            running.code = system(command)
        finally:
            running.code = -1 if running.code is None else running.code
        return running.code

    # Pickled by reference as os.system, as the original is (a test's malicious pickle names it).
    watched_system.__module__, watched_system.__qualname__, watched_system.__name__ = "os", "system", "system"
    os.system = watched_system

    start = multiprocessing.process.BaseProcess.start

    def watched_start(self: multiprocessing.process.BaseProcess) -> None:
        # torch.multiprocessing's start_processes/spawn run each rank through its own _wrap (no torch import here)
        if getattr(getattr(self, "_target", None), "__module__", "") == "torch.multiprocessing.spawn":
            WATCH.started("torch ranks (torch.multiprocessing)")
        start(self)

    multiprocessing.process.BaseProcess.start = watched_start  # type: ignore[method-assign]


# The plugin's hooks (tests/conftest.py loads this module as a plugin).


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    _install_watch()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag each test with the tiers its fixtures imply; skip the `cuda` tests where no GPU is visible."""
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            tier = FIXTURE_TIERS.get(fixture)
            if tier and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))
    cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda:
        import torch  # only when a selected test needs a GPU: the tiers plugin itself imports no torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); `make gpu-check` runs these on one")
            for item in cuda:
                item.add_marker(skip)


def tiers_of(item: pytest.Item) -> set[str]:
    return {name for name in MARKERS if item.get_closest_marker(name)}


UNIT_DIR = "unit"  # tests/unit/: the fast tier only (the heavy tiers live in tests/integration/)


def misplaced(item: pytest.Item) -> str | None:
    """Why a test in tests/unit/ does not belong there (it is tagged with a heavy tier), or None."""
    heavy = sorted(tiers_of(item) & set(HEAVY))
    if heavy and item.path.parent.name == UNIT_DIR and item.path.parent.parent.name == "tests":
        return f"{item.nodeid}: tagged {', '.join(heavy)} but lives in tests/unit/: move it to tests/integration/"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    why = misplaced(item)
    if why:
        pytest.fail(why, pytrace=False)
    WATCH.reset()  # from set-up on: what the test's fixtures start counts as the test's
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    check_call(item, report)
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if WATCH.slow_untagged:
        terminalreporter.write_sep("-", f"untagged tests over {SLOW_S:.0f} s: tag them @pytest.mark.slow")
        for line in WATCH.slow_untagged:
            terminalreporter.write_line(line)


def check_call(item: pytest.Item, report: pytest.TestReport) -> None:
    """Fail a passing test that trains in other processes outside a tier that allows it; note a slow one."""
    if report.when != "call" or not report.passed:
        return
    if not tiers_of(item) & set(HEAVY) and report.duration > SLOW_S:
        WATCH.slow_untagged.append(f"{report.duration:6.1f} s  {item.nodeid}")
    if tiers_of(item) & ALLOWS_PROCESSES:
        return
    reason = WATCH.verdict()
    if reason:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: {reason}; tag it @pytest.mark.multiprocess so that `make test-fast` leaves it out, "
            "and keep it in tests/integration/ (tests/support/tiers.py)"
        )
