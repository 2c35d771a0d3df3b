"""What `integrity-client --status` shows, gathered by the server.

RSS and CPU come from psutil.  For the server and its own children that is
a read of /proc/PID/stat and /proc/PID/statm (Linux) or a sysctl() and a
proc_pidinfo() call (macOS): kernel state, no disk, no peer that could
stall, some microseconds a process, so the loop may ask while it serves.
"""

import os
from dataclasses import asdict

try:
    import psutil
except ImportError:     # a runtime dependency (setup.py); a bare checkout still serves
    psutil = None

NO_USAGE = {"rss": None, "cpu": None}


def usage(pid):
    """{"rss": bytes, "cpu": user+system seconds} of a process; None when unknown.

    A worker may die between the listing and the asking; it is not reaped
    yet, so its pid cannot name another process, but psutil may find it gone
    or a zombie (NoSuchProcess), or not ours to look at (AccessDenied).
    """
    if psutil is None:
        return NO_USAGE
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cpu = proc.cpu_times()
            return {"rss": proc.memory_info().rss, "cpu": round(cpu.user + cpu.system, 2)}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return NO_USAGE


def slot_row(slot, now):
    """One worker slot: its state, and its process if it has one."""
    row = {"slot": slot.index, "state": slot.state.value, "forks": slot.forks}
    worker = slot.worker
    if worker is not None:
        row.update(pid=worker.pid, uptime=round(now - worker.started, 1),
                   files=worker.results, warnings=worker.warnings, **usage(worker.pid))
    return row


def gather_status(server, asker=None):
    """The status report of a running Server; `asker` is not counted as a client."""
    now = server.clock()
    supervisor = server.supervisor
    return {"pid": os.getpid(), "uptime": round(now - server.started, 1),
            **usage(os.getpid()),
            "clients": sum(1 for s in server.sessions if s is not asker),
            "waiting": len(server.scheduler.pending),
            "inflight": sum(len(a.jobs) for w in supervisor.workers()
                            for a in supervisor.held(w)),
            "workers": [slot_row(slot, now) for slot in supervisor.slots],
            "totals": asdict(supervisor.totals)}
