"""Processes on this machine, told apart by pid and start time (a pid alone may be reused):
whether the one recorded is still alive, and which ones belong to a session."""

from __future__ import annotations

from pathlib import Path


def stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot; -1 if there is no such process."""
    fields = stat(pid)
    return int(fields[19]) if fields else -1


def alive(pid: int, started: int) -> bool:
    """``pid`` is the process recorded (same start time, so not a reused pid) and not a zombie."""
    fields = stat(pid)
    return fields is not None and fields[0] not in "ZX" and int(fields[19]) == started


def in_session(session: int, since: int) -> list[int]:
    """Live processes of the session led by ``session`` that started at or after ``since``
    (so that a reused session id is not taken for the recorded one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat(int(entry.name))
            if (fields and fields[0] not in "ZX" and int(fields[3]) == session
                    and int(fields[19]) >= since):
                found.append(int(entry.name))
    return found
