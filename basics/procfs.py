"""A process's ``/proc/PID/stat`` entry, parsed once for the whole project (Linux only).

The command name (field 2) is in parentheses and may hold spaces or parentheses itself, so the fields are
counted from the last ``)``: :func:`stat_fields` returns field 3 (the state letter) onward, so the kernel's
field N is ``fields[N - 3]`` (proc(5)).
"""

from __future__ import annotations

from pathlib import Path

STATE = 3  # the state letter: R, S, D, T, t, Z, ...
PPID = 4
UTIME, STIME, CUTIME, CSTIME = 14, 15, 16, 17  # clock ticks (os.sysconf("SC_CLK_TCK") a second)
STARTTIME = 22  # clock ticks since boot: tells a reused pid apart

_STATE_NAMES = {
    "T": "stopped",
    "t": "traced",
    "D": "in uninterruptible I/O",
    "Z": "a zombie",
    "R": "running",
    "S": "sleeping",
}


def stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (index with ``field(fields, N)``), or None if the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone (or never was), or no /proc
        return None
    return stat.rpartition(")")[2].split()


def field(fields: list[str], number: int) -> str:
    """The kernel's field ``number`` (1-based, as proc(5) counts) from :func:`stat_fields`' list."""
    return fields[number - STATE]


def state(pid: int) -> str | None:
    """The kernel's state letter and its name ("T (stopped)"), or None if the process does not exist."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    letter = field(fields, STATE)
    return f"{letter} ({_STATE_NAMES.get(letter, '?')})"


def start_ticks(pid: int) -> str | None:
    """The process's start time since boot (tells a reused pid apart); None if it does not run."""
    fields = stat_fields(pid)
    return None if fields is None else field(fields, STARTTIME)
