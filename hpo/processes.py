"""Processes this tool started, found and stopped by PID only (never `ray stop`: it is machine-wide).

A driver killed with SIGKILL leaves part of its private Ray behind (Ray's dashboard and
runtime-env agents, reparented to PID 1, renamed `ray::DashboardAgent`...). Every process of
that Ray names the Ray session folder on its command line or keeps its log files there open,
so the sweep records that folder and a resume stops exactly those processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_running(pid: int, cmdline: str | None = None) -> bool:
    """Alive, and (when given) still the same program: a reused PID is not our process."""
    line = command_line(pid)
    if not line:
        return False
    return cmdline is None or line == cmdline


def _uses(pid: int, folder: str) -> bool:
    if folder in command_line(pid):
        return True
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(folder):
                return True
        except OSError:
            continue
    return False


def pids_using(folder: str) -> list[int]:
    """PIDs (never this process) that name `folder` on their command line or hold a file in it open."""
    return sorted(int(e.name) for e in Path("/proc").iterdir()
                  if e.name.isdigit() and int(e.name) != os.getpid() and _uses(int(e.name), folder))


# A Ray node's own processes, as against its workers (`ray::IDLE`, `ray::CMATHTrial...`): after
# ray.shutdown() they only exit once they give up on the head, a minute or so later.
NODE_DAEMONS = ("/raylet/raylet ", "/ray/_private/log_monitor.py", "/ray/dashboard/agent.py",
                "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def is_node_daemon(cmdline: str) -> bool:
    return any(part in cmdline for part in NODE_DAEMONS)


def stop(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout` seconds."""
    started = {pid: command_line(pid) for pid in pids}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(pid, line) for pid, line in started.items()):
        time.sleep(0.2)
    for pid, line in started.items():
        if line and is_running(pid, line):  # still the process we meant, not a reused PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
