"""CPU time of tritonserver and each of its models, from Linux's /proc.

tritonserver runs in its own process group together with one Python-backend stub process
per model instance, whose command line names the model's ``model.py``. Summing each
process's user and system time by model says where a request's CPU goes, which on a
machine shared with other work is steadier than any latency.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CpuReading = dict[int, tuple[str, float]]
"""Cumulative CPU seconds of each process of a server, by pid, with the model it serves."""
CpuClock = Callable[[], CpuReading]

SERVER = "tritonserver"
_PROC = Path("/proc")


def process_group_cpu(group: int) -> CpuClock | None:
    """A clock of the CPU seconds used by the processes of process group ``group``; None without /proc."""
    if not (_PROC / str(group) / "stat").is_file():
        return None
    tick = os.sysconf("SC_CLK_TCK")

    def clock() -> CpuReading:
        reading: CpuReading = {}
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # exited meanwhile
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) != group:
                continue
            reading[int(entry.name)] = (_role(command), (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
        return reading

    return clock


def _role(command: list[bytes]) -> str:
    """The model a stub serves (its first argument is ``<repository>/<model>/<version>/model.py``)."""
    if len(command) > 1 and command[1].endswith(b"model.py"):
        return Path(os.fsdecode(command[1])).parent.parent.name
    return SERVER


def cpu_ms_per_post(before: CpuReading, after: CpuReading, posts: int) -> dict[str, float]:
    """CPU milliseconds per post spent by each model between two readings.

    Processes started in between count from zero; those that exited in between (a model
    reloaded) are left out, as their last CPU time cannot be read any more.
    """
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        _, earlier = before.get(pid, (role, 0.0))
        spent[role] = spent.get(role, 0.0) + max(0.0, seconds - earlier)
    return {role: spent[role] * 1e3 / posts for role in sorted(spent)}
