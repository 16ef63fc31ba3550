"""How much of the machine's CPU went to processes outside the benchmark during a run.

Other work on a 2-core machine moves the figures more than most proxy changes do, so each run
records it: the CPU time the whole machine spent busy (/proc/stat) minus the time spent by
the benchmark's own processes (this process and the pgbench it waits for, the poolers, the
PostgreSQL server and its backends, live or already reaped).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # monotonic seconds
    busy: float  # CPU seconds the machine spent busy, all cores
    ours: float  # CPU seconds spent by the benchmark's processes


def machine_busy() -> float:
    """Busy CPU seconds since boot, summed over cores (user, nice, system, irq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu(pid: int, *, with_reaped_children: bool = False) -> float:
    """CPU seconds of ``pid`` (plus its reaped children's if asked); 0 if it is gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # Fields after "(comm)": state is [0]; utime [11], stime [12], cutime [13], cstime [14].
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def server_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: its postmaster, and its backends, live or reaped."""
    return process_cpu(postmaster, with_reaped_children=True) + sum(
        process_cpu(child) for child in children(postmaster))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


class CpuShare:
    """Samples before and after a run; ``other_fraction`` says how busy everyone else was.

    ``pids`` gives the long-lived processes of the benchmark (the poolers); ``postmaster``
    the PostgreSQL server, whose backends come and go.
    """

    def __init__(self, pids: Callable[[], Iterable[int]], postmaster: Callable[[], int | None]):
        self._pids = pids
        self._postmaster = postmaster
        self._cores = len(os.sched_getaffinity(0))

    def sample(self) -> Sample:
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        ours += sum(process_cpu(pid) for pid in self._pids())
        postmaster = self._postmaster()
        if postmaster is not None:
            ours += server_cpu(postmaster)
        return Sample(time.monotonic(), machine_busy(), ours)

    def other_fraction(self, before: Sample, after: Sample) -> float:
        """The share of all cores' time that went to other processes between two samples."""
        elapsed = (after.at - before.at) * self._cores
        if elapsed <= 0:
            return 0.0
        other = (after.busy - before.busy) - (after.ours - before.ours)
        return max(0.0, other / elapsed)
