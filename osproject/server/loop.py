"""The server: one thread, one select() loop over every fd it owns.

A pass reads whatever is ready (signal wakeups, hellos, worker results,
client requests), writes what the non-blocking fds will take, reaps
children, then does the time-driven work: hang checks and re-forks.  It
never blocks on a client, a worker or a file, and never starts a thread:
it forks, and fork in a threaded process can deadlock.
"""

import json
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import protocol
from . import verifier
from .entrance import Entrance, EntranceError
from .scheduler import Job, Scheduler
from .session import MAX_SESSIONS, SPARE_SESSIONS, Refused, Session, Sessions
from .status import gather_status
from .supervisor import ForkSpawner, State, Supervisor, Worker, kill_group
from .trust import Trust

# What to call when an fd is ready, and whose it is: the handler is called with
# its owner, if it has one, and the owner is blamed if the call fails.
Handler = tuple[Callable[..., object], "Worker | Session | None"]
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FD_SETSIZE = 1024         # select() takes no fd at or above this (Linux, macOS)
# stdio, the log, syslog, the wakeup pipe, the entrance both ways, and the
# fds a fork, a refused hello or a sweep of stale client directories holds
# for a moment
OWN_FDS = 16
# Each worker holds two pipe ends, each session two FIFOs and the temp file its
# unchecked hashes may spill to (Unchecked), plus a refused one.
MAX_WORKERS = (FD_SETSIZE - OWN_FDS - 3 * (MAX_SESSIONS + SPARE_SESSIONS + 1)) // 2
MAX_OUTSTANDING = 500     # files a client may have in the server before we stop reading
STOP_GRACE = 2.0          # seconds workers get to leave after SIGTERM
NO_WORKER_GRACE = 10.0    # seconds with no live worker before waiting clients are told
SWEEP_INTERVAL = 10.0     # seconds between sweeps of dead clients' directories
ENTRANCE_CHECK = 5.0      # seconds between checks that the entrance FIFO is still ours


@dataclass
class Config:
    fifo: str
    private_dir: bool = False
    workers: int = 5
    hang_timeout: float = 30.0
    idle_timeout: float = 60.0      # a session that sends and awaits nothing is dropped
    cross_check: float = 0.1
    liars: dict = field(default_factory=dict)   # slot -> chaos of its first worker
    crash: float = 0.0
    hang: float = 0.0
    garble: float = 0.0
    stillborn: str | None = None
    backoff_scale: float = 1.0      # testing aid: shorter waits before re-forks


class Fault(protocol.ProtocolError):
    """A worker broke the protocol; it is killed and its work redone."""


class Server:
    def __init__(self, config, log, clock=time.monotonic, spawner=None):
        self.config = config
        self.log = log
        self.clock = clock
        self.entrance = Entrance(config.fifo, config.private_dir)
        self.scheduler = Scheduler()
        self.supervisor = Supervisor(config.workers, spawner or ForkSpawner(self.chaos_for),
                                     clock, log, config.hang_timeout,
                                     backoff_scale=config.backoff_scale)
        self.sessions = Sessions(log, self.scheduler, clock, config.idle_timeout)
        self.trust = Trust(config, log, self.scheduler, self.supervisor, self.sessions)
        self.stopping = False
        self.stop_reason = "the server stopped"    # what clients still served are told
        self.exit_status = 0
        self.workerless_since = None    # when the last live worker went, if none lives
        self.next_sweep = 0.0           # when to sweep dead clients' directories
        self.next_entrance_check = 0.0
        self.started = clock()
        self._wake_r = self._wake_w = -1
        self._reap_needed = False

    def chaos_for(self, slot):
        """The --chaos faults a worker forked into `slot` gets."""
        chaos = {"crash": self.config.crash, "hang": self.config.hang,
                 "garble": self.config.garble, "stillborn": self.config.stillborn}
        if slot.forks == 0 and slot.index in self.config.liars:
            chaos.update(self.config.liars[slot.index])   # its replacement is honest
        return chaos

    # -- life cycle -----------------------------------------------------
    def run(self):
        """Serve until SIGTERM or SIGINT; return the exit status."""
        self.install_signals()      # first: a SIGTERM from now on stops us cleanly
        self.log.hold()             # each pass's lines go out together, at its end
        self.entrance.open()
        try:
            self.log.info("server.started", pid=os.getpid(), fifo=self.entrance.path,
                          workers=self.config.workers, log=self.log.path)
            self.sweep()
            self.supervisor.start_due()
            while not self.stopping:
                self.step()
        finally:
            self.shutdown()
        return self.exit_status

    def install_signals(self):
        """Handlers only wake the loop: the C handler writes the signal to a pipe."""
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _wake_only)

    def shutdown(self):
        self.entrance.close()
        self.sessions.close_all(self.stop_reason)
        self.stop_workers()
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.log.info("server.stopped", pid=os.getpid(), status=self.exit_status,
                      unlogged=self.log.lost or None, unsent=self.log.unsent or None)

    def stop_workers(self):
        """SIGTERM every worker, wait a little, SIGKILL the rest; reap them all."""
        self.supervisor.stopping = True
        for worker in self.supervisor.workers():
            kill_group(worker.pid, signal.SIGTERM)
        deadline = self.clock() + STOP_GRACE
        while self.supervisor.by_pid and self.clock() < deadline:
            self.reap()
            if self._wake_r >= 0 and self.supervisor.by_pid:   # wait for SIGCHLD
                select.select([self._wake_r], [], [], max(0.0, deadline - self.clock()))
                self.drain_wakeups()
        for pid in list(self.supervisor.by_pid):
            kill_group(pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            self.on_child_exit(pid, status)

    # -- the loop -------------------------------------------------------
    def step(self):
        """One pass: select, read, write, reap, then time-driven work."""
        readers, writers = self.interest()
        ready_r, ready_w, _ = select.select(list(readers), list(writers), [],
                                            self.timeout())
        for fd in ready_r:
            self.contained(*readers[fd])
        for fd in ready_w:
            self.contained(*writers[fd])
        if self._reap_needed:
            self._reap_needed = False
            self.reap()
        self.supervisor.check_hangs()
        if not self.stopping:
            self.supervisor.start_due()
            self.give_up_if_hopeless()   # forks that fail leave no child to reap
        self.check_workers_alive()
        self.trust.feed_rechecks()
        self.dispatch()
        self.sessions.send_replies()
        self.sessions.close_finished()
        self.sessions.drop_idle()
        self.housekeeping()
        self.log.flush()

    def housekeeping(self):
        """The checks that are due from time to time."""
        if self.clock() >= self.next_sweep:
            self.sweep()
        if self.clock() >= self.next_entrance_check and not self.stopping:
            self.next_entrance_check = self.clock() + ENTRANCE_CHECK
            self.check_entrance()

    def check_entrance(self):
        """Make the entrance FIFO anew if it was deleted; stop if it was replaced.

        A deleted entrance serves nobody, and lets a second server start on
        the same path; one replaced is someone else's now.
        """
        if self.entrance.is_ours():
            return
        self.on_entrance()              # hellos already in the old FIFO
        try:
            self.entrance.recreate()
        except EntranceError as exc:
            self.log.error("server.failed", reason=str(exc))
            self.stopping, self.exit_status = True, 1
            self.stop_reason = "the server's entrance FIFO was taken away"
            return
        self.log.warning("entrance.recreated", path=self.entrance.path)

    def sweep(self):
        """Remove the directories that dead clients left beside the entrance."""
        self.next_sweep = self.clock() + SWEEP_INTERVAL
        removed = self.entrance.sweep()
        if removed:
            self.log.info("entrance.swept", dirs=removed)

    def interest(self) -> tuple[dict[int, Handler], dict[int, Handler]]:
        """Map each fd to watch to (handler, owner), for reading and for writing;
        a handler with an owner is called with it (no closure made per pass)."""
        readers: dict[int, Handler] = {self._wake_r: (self.on_signals, None),
                                       self.entrance.fd: (self.on_entrance, None)}
        writers: dict[int, Handler] = {}
        for w in self.supervisor.workers():
            if w.from_worker >= 0:
                readers[w.from_worker] = (self.on_worker_readable, w)
            if w.outbuf:
                writers[w.to_worker] = (self.flush_worker, w)
        for s in self.sessions:
            # A client with many files in flight waits: its writes block in
            # the FIFO, and our queue stays bounded however fast it asks.
            if s.wants_requests and s.outstanding < MAX_OUTSTANDING:
                readers[s.request_fd] = (self.on_session_readable, s)
            if s.outbuf and not s.dead:
                writers[s.reply_fd] = (Session.flush, s)
        return readers, writers

    def contained(self, handler, owner):
        """Run a handler; a bug it hits costs its one client or worker, not the server."""
        try:
            if owner is None:
                handler()
            else:
                handler(owner)
        except Exception as exc:  # noqa: BLE001 - the server must outlive any one peer
            self.log.error("server.error", error=repr(exc)[:500],
                           peer=type(owner).__name__ if owner else "server",
                           **_who(owner))
            if isinstance(owner, Session):
                self.sessions.drop(owner, f"internal error: {exc!r}")
            elif isinstance(owner, Worker):
                self.supervisor.kill(owner, "internal error")

    def timeout(self):
        deadlines = [self.supervisor.next_deadline(), self.workerless_deadline(),
                     self.sessions.idle_deadline(), self.next_sweep, self.next_entrance_check]
        deadlines = [d for d in deadlines if d is not None]
        if not deadlines:
            return None             # idle: sleep until something happens
        return min(max(0.0, min(deadlines) - self.clock()), 3600.0)

    # -- signals and children --------------------------------------------
    def drain_wakeups(self):
        """Return the signal numbers the wakeup pipe holds."""
        try:
            return os.read(self._wake_r, 512)
        except BlockingIOError:
            return b""

    def on_signals(self):
        for signum in self.drain_wakeups():
            if signum == signal.SIGCHLD:
                self._reap_needed = True
            elif signum in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(signum).name
                self.log.info("server.stopping", signal=name)
                self.stopping = True
                self.stop_reason = f"the server was stopped ({name})"
            elif signum == signal.SIGHUP:
                try:
                    self.log.reopen()
                except OSError as exc:
                    self.log.error("log.reopen_failed", path=self.log.path,
                                   reason=exc.strerror)
                else:
                    self.log.info("log.reopened", path=self.log.path)

    def reap(self):
        """Collect every child that has exited, until none is left to reap."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.on_child_exit(pid, status)

    def on_child_exit(self, pid, status):
        dying = self.supervisor.by_pid.get(pid)
        if dying is not None:
            self.drain_worker(dying)
        worker = self.supervisor.on_exit(pid, status)
        if worker is None:
            return
        for fd in (worker.to_worker, worker.from_worker):
            if fd >= 0:
                os.close(fd)
        worker.to_worker = worker.from_worker = -1
        if worker.queued is not None:
            self.requeue_unread(worker.queued, pid)
        if worker.assignment is not None:
            self.requeue(worker.assignment, pid, verifier.blamed_for_death(worker.killed_for))
        self.trust.drop_proofs(worker.wid)
        self.give_up_if_hopeless()

    def give_up_if_hopeless(self):
        """Stop with status 1 when no worker can start at all (README: exit 1)."""
        if not self.stopping and self.supervisor.hopeless():
            reason = self.supervisor.why_hopeless()
            self.log.error("server.failed", reason=reason)
            self.stopping, self.exit_status = True, 1
            self.stop_reason = f"the server gave up: {reason}"

    def check_workers_alive(self):
        """Answer the clients whose files wait when no worker has lived for a while.

        Workers that keep dying may come back (a full disk that clears), so
        the server goes on; but a client must not wait for ever meanwhile.
        """
        if self.supervisor.any_alive():
            self.workerless_since = None
            return
        now = self.clock()
        if self.workerless_since is None:
            self.workerless_since = now
        if now - self.workerless_since < NO_WORKER_GRACE:
            return
        why = self.supervisor.spawn_error
        reason = (f"no worker has been running for {NO_WORKER_GRACE:g}s"
                  + (f" (fork failed: {why})" if why else "") + "; see the server's log")
        for session in self.sessions.waiting():
            self.sessions.refuse(session, reason)

    def workerless_deadline(self):
        """When waiting clients are to be told that no worker runs, or None."""
        if self.workerless_since is None or not self.sessions.waiting():
            return None
        return self.workerless_since + NO_WORKER_GRACE

    def requeue_unread(self, assignment, pid):
        """Put back the files queued behind the assignment a dead worker was on.

        It did not die on them: a worker does its assignments one after the
        other and writes each one's results before it reads the next, and
        every result it wrote before it died is read before its files are
        requeued (drain_worker).  So no death counts against them and they
        need not go alone.  But it may have begun them: a worker we killed
        for what its results said (a lie, garbage) was on to the next one by
        then, so its temp files may be beside them, and a sidecar it wrote.
        """
        for job in reversed(assignment.jobs):
            job.held_by_dead(pid, blame=False, alone=False)
            self.scheduler.requeue(job)

    def requeue(self, assignment, pid, blame):
        """Hand a dead worker's files to others; give up on one that kills them all."""
        self.log.info("assignment.requeued", slot=assignment.worker.slot, pid=pid,
                      files=len(assignment.jobs))
        alone = len(assignment.jobs) == 1
        for job in reversed(assignment.jobs):
            job.held_by_dead(pid, blame, alone)
            if not verifier.is_poison(job.deaths):
                self.scheduler.requeue(job)
                continue
            self.log.error("file.abandoned", path=job.path, deaths=job.deaths,
                           session=job.session.sid)
            self.trust.give_up(job, f"{job.deaths} workers died or hung reading it")

    # -- workers ----------------------------------------------------------
    def dispatch(self):
        """Give every idle worker up to five waiting files (see Scheduler.take),
        then each busy one the next five, to queue behind its own (PIPELINE):
        should it die, those are put back as they were (requeue_unread)."""
        for worker in self.supervisor.idle():
            self.assign(worker, self.scheduler.take(worker))
        for worker in self.supervisor.with_room():
            if worker.assignment is not None and worker.assignment.quick:
                self.assign(worker, self.scheduler.take(worker))

    def assign(self, worker, assignment):
        if assignment is None:
            return
        worker.outbuf += assignment.frame()
        self.supervisor.assigned(worker, assignment)
        self.flush_worker(worker)

    def flush_worker(self, worker):
        try:
            sent = os.write(worker.to_worker, worker.outbuf)
        except BlockingIOError:
            return
        except OSError:
            worker.outbuf.clear()   # it is dying; reaping requeues its files
            return
        del worker.outbuf[:sent]

    def drain_worker(self, worker):
        """Take what a worker that died wrote before it died: its pipe keeps
        it, and one pass reads only 64 KiB.  Which assignment it died on, and
        which one behind it it never began, depends on every result read."""
        while self.on_worker_readable(worker):
            pass

    def on_worker_readable(self, worker):
        """Read and act on what the worker wrote; return whether there was any."""
        if worker.from_worker < 0:
            return False
        try:
            data = os.read(worker.from_worker, 65536)
        except BlockingIOError:
            return False
        if not data:                # it exited or closed its pipe: reaping follows
            os.close(worker.from_worker)
            worker.from_worker = -1
            return False
        try:
            for fields in worker.frames.feed(data):
                if self.supervisor.state_of(worker) is State.KILLED:
                    return False
                if fields is None:
                    raise Fault("not a frame: too long, or a field not ended")
                self.on_worker_frame(worker, fields)
        except (Fault, protocol.ProtocolError) as exc:
            self.log.error("worker.faulty", slot=worker.slot, pid=worker.pid,
                           reason=str(exc))
            self.supervisor.kill(worker, "faulty")
            return False
        return True

    def on_worker_frame(self, worker, fields):
        state = self.supervisor.state_of(worker)
        if state is State.STARTING and protocol.is_ready(fields, worker.pid):
            self.supervisor.on_ready(worker)
        elif state is State.BUSY and protocol.is_progress(fields, worker.assignment.aid):
            self.supervisor.heard_from(worker)
        elif fields[0] == b"results" and state is State.BUSY:
            assignment = worker.assignment
            results = protocol.check_results(fields, assignment.aid, len(assignment.jobs))
            self.supervisor.answered(worker)
            for job, result in zip(assignment.jobs, results, strict=True):
                self.trust.take_result(worker, job, result)
        else:
            raise Fault(f"unexpected frame in state {state.name}")

    # -- clients ----------------------------------------------------------
    def on_entrance(self):
        for line in self.entrance.read_lines():
            if line == b"":
                continue            # a hello's leading newline: see encode_hello
            try:
                self.open_session(line)
            except (Refused, protocol.ProtocolError) as exc:
                self.log.warning("request.refused", reason=str(exc))

    def open_session(self, line):
        """Serve the client a hello line is from, or raise Refused saying why not."""
        if line is None:
            raise Refused(f"hello longer than {protocol.HELLO_MAX} bytes")
        try:
            request, reply, pid = protocol.read_hello(line)
        except protocol.VersionMismatch as exc:     # tell that client why, if we can
            if self.entrance.beside(exc.request) and self.entrance.beside(exc.reply):
                self.sessions.turn_away(exc.request, exc.reply, str(exc))
            raise
        if not (self.entrance.beside(request) and self.entrance.beside(reply)):
            raise Refused("FIFOs must be in a client directory beside the entrance")
        self.sessions.open(request, reply, pid)

    def on_session_readable(self, session):
        session.heard_at = self.clock()
        try:
            for frame in session.read():
                self.accept_request(session, frame)
        except (Refused, protocol.ProtocolError) as exc:
            self.log.warning("request.refused", session=session.sid, reason=str(exc))
            self.sessions.refuse(session, str(exc))

    def accept_request(self, session, frame):
        if isinstance(frame, protocol.Request):
            return self.accept_files(session, frame)
        if frame.get("status"):
            session.send(protocol.status_report(self.status_report(asker=session)))
            return
        if "audit" in frame:            # what a client found: the audit trail
            for event in frame["audit"]:
                fields = {k: v for k, v in event.items() if k != "event"}
                self.log.warning(event["event"], session=session.sid, **fields)
            return
        if "roots" in frame:
            self.log.info("session.roots", session=session.sid, count=frame["count"],
                          roots=json.dumps(frame["roots"]))
            return
        raise Refused("a frame the server cannot serve")     # validate_request knows them all

    def accept_files(self, session, request):
        if session.spare:
            raise Refused("too many clients; only --status is served until some leave")
        rid = request.rid
        session.requested(rid, len(request.items))
        session.files += len(request.items)
        self.scheduler.submit_all(session, [
            Job(session=session, rid=rid, index=index, path=item.path, sidecar=item.sidecar,
                expected=item.expected, update=item.update, size=item.size, dir=item.dir)
            for index, item in enumerate(request.items)])

    def status_report(self, asker=None):
        """What `integrity-client --status` shows (see status.py)."""
        return gather_status(self, asker)


def _wake_only(signum, frame):
    """Python-level no-op: the wakeup fd already carries the signal number."""


def _who(owner):
    """The log fields that name a peer: a worker's slot and pid, a session."""
    if isinstance(owner, Worker):
        return {"slot": owner.slot, "pid": owner.pid}
    if isinstance(owner, Session):
        return {"session": owner.sid}
    return {}

