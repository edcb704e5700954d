"""tritonserver's processes as Linux's ``/proc`` shows them: its Python-backend stubs, dead children, memory.

Triton 2.51 neither restarts a Python-backend process that died nor reports it; the
launcher finds out here (:class:`~postsim.server.watchdog.StubWatchdog`), and the soak
benchmark reads the memory of the server and of each stub.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True, kw_only=True)
class StubProcess:
    """A Python-backend stub of a running tritonserver: one per model instance."""

    pid: int
    model: str
    version: str
    model_file: Path
    """The ``model.py`` of the version it serves (the stub's first argument)."""
    shm_region: str
    """Its shared-memory region, a file in /dev/shm."""
    instance: str = ""
    """The model instance it runs (``fuser_0_0``), the name Triton's errors give it."""


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (zombies included)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat_fields(int(entry.name))
        if fields is not None and len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return sorted(children)


def process_start_time(pid: int) -> float | None:
    """When a process started, on the ``time.time()`` scale (to 10 ms), or None when it is gone."""
    fields = _proc_stat_fields(pid)
    try:
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    if fields is None or len(fields) < 20:
        return None
    age_s = uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - age_s


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), or None when it is gone or a zombie."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The live Python-backend stubs serving models of the tritonserver ``server_pid``, by pid.

    Not the short-lived stub Triton starts while it loads a model, to complete its config
    (named after the model, where a model instance's is ``<model>_<group>_<n>``): it exits
    once done.
    """
    stubs = []
    for pid in child_pids(server_pid):
        args = _cmdline(pid)
        if len(args) < 3 or not args[0].endswith(STUB_BINARY):
            continue
        model_file = Path(args[1])  # <repository>/<model>/<version>/model.py
        if len(args) > 8 and args[8] == model_file.parent.parent.name:
            continue  # the config auto-complete stub of a model being loaded
        stubs.append(
            StubProcess(
                pid=pid,
                model=model_file.parent.parent.name,
                version=model_file.parent.name,
                model_file=model_file,
                shm_region=args[2],
                instance=args[8] if len(args) > 8 else "",
            )
        )
    return stubs


def dead_children(server_pid: int) -> dict[int, int]:
    """Children of ``server_pid`` that exited and were not reaped (zombies): pid -> wait status."""
    dead = {}
    for pid in child_pids(server_pid):
        fields = _proc_stat_fields(pid)
        if fields and fields[0] == "Z":
            dead[pid] = int(fields[-1]) if fields[-1].lstrip("-").isdigit() else 0
    return dead


def describe_wait_status(status: int) -> str:
    if status & 0x7F:
        number = status & 0x7F
        with contextlib.suppress(ValueError):
            return f"killed by signal {number} ({signal.Signals(number).name})"
        return f"killed by signal {number}"
    return f"exited with code {(status >> 8) & 0xFF}"
