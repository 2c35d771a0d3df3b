"""The supervisor: keeps N worker slots filled, like an OTP supervisor.

Each slot is a small state machine; `Slot.enter` is the one place its state
changes, and it refuses transitions the table does not list.  The clock and
the spawner are handed in, so the restart policy can be tested with a fake
clock and fake workers (tests/test_supervisor.py), and for real by the
integration tests.
"""

import collections
import enum
import itertools
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import protocol
from . import verifier
from . import worker as worker_mod
from .log import Log

if TYPE_CHECKING:
    from .scheduler import Assignment

BACKOFF_FIRST = 0.1    # seconds before re-forking after a worker died young
BACKOFF_MAX = 5.0      # ... doubling per consecutive failure, up to this
GIVE_UP_AFTER = 8      # every slot's workers died this often before saying ready: stop
MAX_FORKS_PER_SECOND = 5   # re-forks after infant deaths, however many slots fail
# Assignments a worker holds at most: the one it reads, and the next, waiting
# in its pipe, so that it goes on to the next without sleeping until the
# server has read its results and answered.  Each is still of MAX_PATHS.
PIPELINE = 2


class State(enum.Enum):
    DOWN = "down"          # no process; (re)spawn when restart_at comes
    STARTING = "starting"  # forked, waiting for its ready frame
    IDLE = "idle"          # alive, waiting for an assignment
    BUSY = "busy"          # an assignment is in flight (and maybe the next, queued)
    KILLED = "killed"      # SIGKILL sent (hung, banned, faulty), waiting to reap


TRANSITIONS = {
    State.DOWN: {State.STARTING},
    State.STARTING: {State.IDLE, State.KILLED, State.DOWN},
    State.IDLE: {State.BUSY, State.KILLED, State.DOWN},
    State.BUSY: {State.IDLE, State.KILLED, State.DOWN},
    State.KILLED: {State.DOWN},
}


@dataclass(eq=False)
class Worker:
    """One incarnation of a worker process and the pipes to it."""
    slot: int
    pid: int
    wid: int                        # unique for the server's life, unlike a pid
    to_worker: int = -1             # we write assignments here (non-blocking)
    from_worker: int = -1           # we read results here (non-blocking)
    heard_at: float = 0.0           # last frame or fork time: the hang clock
    started: float = 0.0
    assignment: "Assignment | None" = None  # the Assignment in flight, if any
    queued: "Assignment | None" = None      # the Assignment waiting behind it, if any
    warnings: int = 0
    results: int = 0                # files answered
    confirmed: int = 0              # answers another reading agreed with: trust
    completed: int = 0              # assignments answered
    killed_for: str | None = None   # why we killed it, if we did
    frames: protocol.FrameBuffer = field(default_factory=protocol.FrameBuffer)
    outbuf: bytearray = field(default_factory=bytearray)


@dataclass
class Totals:
    """Counts over the server's life, for --status: a dead worker's own go with it."""
    files: int = 0          # files workers answered, second opinions included
    warnings: int = 0       # lies detected (worker.warned), the liar alive or not
    bans: int = 0
    reforks: int = 0        # forks into a slot that had a worker before


@dataclass(eq=False)
class Slot:
    index: int
    state: State = State.DOWN
    worker: Worker | None = None    # None while DOWN
    restart_at: float = 0.0
    failures: int = 0               # consecutive deaths before doing any work
    stillborn: int = 0              # consecutive deaths before even saying ready
    forks: int = 0

    def enter(self, new: State) -> None:
        """Move to state `new`; the transition table is the law."""
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"slot {self.index}: {self.state.name} -> {new.name}")
        self.state = new


class Supervisor:
    """Fork, watch, reap and replace workers; never block."""

    def __init__(self, count: int, spawn: Callable[[Slot], Worker], clock: Callable[[], float],
                 log: Log, hang_timeout: float, backoff_scale: float = 1.0) -> None:
        self.slots = [Slot(i) for i in range(count)]
        self.spawn = spawn          # spawn(slot) -> Worker, with pid and pipes
        self.clock = clock
        self.log = log
        self.hang_timeout = hang_timeout
        # Testing aid (--backoff-scale): below 1, every wait before a re-fork
        # after deaths in infancy is shorter, the back-off and the window of
        # the fork rate cap alike; the policy and its counts stay the same.
        self.backoff_scale = backoff_scale
        self.by_pid: dict[int, Worker] = {}
        self.by_wid: dict[int, Worker] = {}     # live workers, by incarnation id
        self.stopping = False       # shutting down: reap, but do not replace
        self.recent_forks: collections.deque[float] = collections.deque(
            maxlen=MAX_FORKS_PER_SECOND)
        self.totals = Totals()
        self.spawn_error: str | None = None     # why the last fork failed, until one succeeds

    # -- starting -------------------------------------------------------
    def start_due(self) -> None:
        """Fork into every DOWN slot whose restart time has come.

        Restarts after a death in infancy also wait for the global rate cap;
        a worker that did its job before it died is replaced at once.
        """
        now = self.clock()
        for slot in self.slots:
            if slot.state is State.DOWN and self.restart_time(slot) <= now:
                self.start(slot, now)

    def restart_time(self, slot: Slot) -> float:
        if slot.failures:
            return max(slot.restart_at, self.fork_allowed_at())
        return slot.restart_at

    def fork_allowed_at(self) -> float:
        """When the next fork keeps us within MAX_FORKS_PER_SECOND."""
        if len(self.recent_forks) < MAX_FORKS_PER_SECOND:
            return float("-inf")
        return self.recent_forks[0] + 1.0 * self.backoff_scale

    def start(self, slot: Slot, now: float) -> None:
        try:
            worker = self.spawn(slot)
        except OSError as exc:          # EMFILE, EAGAIN: out of fds or processes
            self.log.error("worker.spawn_failed", slot=slot.index, reason=exc.strerror)
            self.spawn_error = exc.strerror
            slot.stillborn += 1
            slot.failures += 1
            slot.restart_at = now + backoff(slot.failures, self.backoff_scale)
            return
        worker.heard_at = worker.started = now
        self.spawn_error = None
        self.recent_forks.append(now)       # every fork counts toward the cap
        slot.forks += 1
        if slot.forks > 1:
            self.totals.reforks += 1
        slot.worker = worker
        slot.enter(State.STARTING)           # DOWN -> STARTING
        self.by_pid[worker.pid] = worker
        self.by_wid[worker.wid] = worker
        self.log.info("worker.forked", slot=slot.index, pid=worker.pid,
                      restart=slot.forks > 1 or None)

    def on_ready(self, worker: Worker) -> None:
        """The worker said hello: it may take work."""
        slot = self.slots[worker.slot]
        slot.stillborn = 0
        slot.enter(State.IDLE)                      # STARTING -> IDLE

    def assigned(self, worker: Worker, assignment: "Assignment") -> None:
        """Give a worker an assignment: its first, or the one queued behind it."""
        if worker.assignment is not None:
            worker.queued = assignment              # BUSY stays BUSY
            return
        worker.assignment = assignment
        worker.heard_at = self.clock()
        self.slots[worker.slot].enter(State.BUSY)   # IDLE -> BUSY

    def answered(self, worker: Worker) -> None:
        """The worker answered its assignment: it goes on to the queued one, if
        any (its hang clock starting anew), else it may take the next."""
        worker.completed += 1
        slot = self.slots[worker.slot]
        slot.failures = 0
        worker.assignment, worker.queued = worker.queued, None
        if worker.assignment is not None:
            worker.heard_at = self.clock()
            return
        slot.enter(State.IDLE)                      # BUSY -> IDLE

    def held(self, worker: Worker) -> "list[Assignment]":
        """The assignments a worker holds, oldest first."""
        return [a for a in (worker.assignment, worker.queued) if a is not None]

    def tally(self, worker: Worker) -> None:
        """Count one file a worker answered, for it and for the server's life."""
        worker.results += 1
        self.totals.files += 1

    def heard_from(self, worker: Worker) -> None:
        worker.heard_at = self.clock()

    # -- stopping -------------------------------------------------------
    def kill(self, worker: Worker, reason: str) -> None:
        """SIGKILL a worker's process group; it is replaced once reaped."""
        slot = self.slots[worker.slot]
        if slot.worker is not worker or slot.state is State.KILLED:
            return
        slot.enter(State.KILLED)                    # STARTING|IDLE|BUSY -> KILLED
        worker.killed_for = reason
        kill_group(worker.pid, signal.SIGKILL)
        self.log.warning("worker.killed", slot=slot.index, pid=worker.pid,
                         reason=reason)

    def alive(self, wid: int) -> Worker | None:
        """The worker of incarnation `wid`, or None once it is gone or being killed."""
        worker = self.by_wid.get(wid)
        if worker is None or self.slots[worker.slot].state is State.KILLED:
            return None
        return worker

    def confirm(self, wid: int) -> None:
        """Another reading agreed with worker `wid`'s: it earns trust (if it lives)."""
        worker = self.by_wid.get(wid)
        if worker is not None:
            worker.confirmed += 1

    def note_lie(self, wid: int) -> Worker | None:
        """Count a proven lie for the server's life; return its liar if it is alive."""
        self.totals.warnings += 1
        return self.alive(wid)

    def warn(self, worker: Worker) -> bool:
        """Count a detected lie; return True when the worker has earned a ban."""
        if self.slots[worker.slot].state is State.KILLED:
            return False                # already on its way out
        worker.warnings += 1
        return verifier.banned(worker.warnings)

    def ban(self, worker: Worker) -> None:
        self.totals.bans += 1
        self.log.error("worker.banned", slot=worker.slot, pid=worker.pid,
                       warnings=worker.warnings)
        self.kill(worker, "banned")

    def check_hangs(self) -> None:
        """Kill every worker silent for longer than the hang timeout."""
        now = self.clock()
        for slot in self.slots:
            w = slot.worker         # never None while STARTING or BUSY
            if w is not None and slot.state in (State.STARTING, State.BUSY) and \
                    now - w.heard_at > self.hang_timeout:
                self.log.error("worker.hung", slot=slot.index, pid=w.pid,
                               silent=round(now - w.heard_at, 1))
                self.kill(w, "hung")

    def on_exit(self, pid: int, status: int) -> Worker | None:
        """A child was reaped: free its slot; return the Worker (None if unknown)."""
        worker = self.by_pid.pop(pid, None)
        if worker is None:
            return None
        del self.by_wid[worker.wid]
        slot = self.slots[worker.slot]
        killed = slot.state is State.KILLED
        if slot.state is State.STARTING:
            slot.stillborn += 1
        slot.enter(State.DOWN)                      # any -> DOWN
        slot.worker = None
        level = "info" if killed or status == 0 else "warning"
        self.log.emit(level, "worker.exited", slot=slot.index, pid=pid,
                      **describe_status(status))
        self.schedule_restart(slot, worker, killed)
        return worker

    def schedule_restart(self, slot: Slot, worker: Worker, killed: bool) -> None:
        """Restart at once after a useful life; back off after a death in infancy."""
        now = self.clock()
        if self.stopping:
            slot.restart_at = float("inf")
            return
        if killed or worker.completed:
            slot.failures = 0
            slot.restart_at = now
            return
        slot.failures += 1
        delay = backoff(slot.failures, self.backoff_scale)
        slot.restart_at = now + delay
        self.log.warning("worker.backoff", slot=slot.index, failures=slot.failures,
                         delay=round(delay, 2))

    def hopeless(self) -> bool:
        """True when no worker can start at all: every slot's keep dying unborn.

        Workers that start and then die are only backed off: the cause may go
        away (a full disk, a file that crashes them), and the server waits.
        """
        return all(s.stillborn >= GIVE_UP_AFTER for s in self.slots)

    def why_hopeless(self) -> str:
        """What server.failed says: forks fail, or the workers die unborn."""
        if self.spawn_error:
            return f"no worker can be forked: {self.spawn_error}"
        return "workers die before they can start"

    # -- queries --------------------------------------------------------
    def workers(self) -> list[Worker]:
        return [s.worker for s in self.slots if s.worker is not None]

    def idle(self) -> list[Worker]:
        return [s.worker for s in self.slots if s.state is State.IDLE and s.worker is not None]

    def with_room(self) -> list[Worker]:
        """Busy workers that may take an assignment to queue behind theirs."""
        return [s.worker for s in self.slots if s.state is State.BUSY
                and s.worker is not None and len(self.held(s.worker)) < PIPELINE]

    def any_alive(self) -> bool:
        """Is some worker ready for work, or at it?"""
        return any(s.state in (State.IDLE, State.BUSY) for s in self.slots)

    def state_of(self, worker: Worker) -> State:
        return self.slots[worker.slot].state

    def next_deadline(self) -> float | None:
        """When the loop must wake for time-driven work, or None."""
        times = [self.restart_time(s) for s in self.slots if s.state is State.DOWN]
        times += [s.worker.heard_at + self.hang_timeout for s in self.slots
                  if s.state in (State.STARTING, State.BUSY) and s.worker is not None]
        return min(times, default=None)


def backoff(failures: int, scale: float = 1.0) -> float:
    """Seconds to wait before the next fork after `failures` deaths in a row
    (times `scale`, below 1 only as a testing aid)."""
    return scale * min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)


def describe_status(status: int) -> dict[str, str | int]:
    """Turn a waitpid status into log fields: exit= or signal=."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return {"signal": signal.Signals(sig).name}
        except ValueError:
            return {"signal": sig}
    return {"exit": os.WEXITSTATUS(status)}


def kill_group(pid: int, sig: int) -> None:
    """Signal a worker's process group (its children too), else the worker."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class ForkSpawner:
    """Fork a real worker process tied to the server by two anonymous pipes."""

    def __init__(self, chaos_for: Callable[[Slot], dict[str, object]]) -> None:
        self.chaos_for = chaos_for      # chaos_for(slot) -> dict for the child
        self._wids = itertools.count(1)

    def __call__(self, slot: Slot) -> Worker:
        chaos = self.chaos_for(slot)
        to_r, to_w = os.pipe()          # assignments: server -> worker
        try:
            from_r, from_w = os.pipe()  # results:     worker -> server
        except OSError:
            _close(to_r, to_w)
            raise
        for stream in (sys.stdout, sys.stderr):   # or the child flushes them again
            if stream is not None:                # None: started with it closed
                stream.flush()
        try:
            pid = os.fork()
        except OSError:
            _close(to_r, to_w, from_r, from_w)
            raise
        if pid == 0:
            worker_mod.child_main(to_r, from_w, chaos)   # never returns
        os.close(to_r)
        os.close(from_w)
        try:
            os.setpgid(pid, pid)        # also done in the child: whoever runs first
        except OSError:
            pass
        for fd in (to_w, from_r):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        return Worker(slot=slot.index, pid=pid, wid=next(self._wids),
                      to_worker=to_w, from_worker=from_r)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
