"""The server: one thread, one select() loop over every fd it owns.

A pass reads whatever is ready (signal wakeups, hellos, worker results,
client requests), writes what the non-blocking fds will take, reaps
children, then does the time-driven work: hang checks and re-forks.  It
never blocks on a client, a worker or a file, and never starts a thread:
it forks, and fork in a threaded process can deadlock.
"""

import itertools
import json
import os
import re
import select
import signal
import time
from dataclasses import dataclass, field

from .. import protocol, statuses
from . import verifier
from .entrance import Entrance, EntranceError
from .scheduler import Job, Scheduler
from .session import Refused, Session, Unchecked
from .status import gather_status
from .supervisor import ForkSpawner, State, Supervisor, Worker, kill_group
from .trust import Trust
from .verifier import Verdict

HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MAX_SESSIONS = 100        # two fds each: select() cannot watch fds >= FD_SETSIZE
SPARE_SESSIONS = 4        # beyond MAX_SESSIONS, for --status only: it always gets in
SPARE_IDLE = 5.0          # seconds a spare session may take to ask for the status
FD_SETSIZE = 1024         # select() takes no fd at or above this (Linux, macOS)
# stdio, the log, syslog, the wakeup pipe, the entrance both ways, and the
# fds a fork, a refused hello or a sweep of stale client directories holds
# for a moment
OWN_FDS = 16
# Each worker holds two pipe ends, each session two FIFOs, plus a refused one.
MAX_WORKERS = (FD_SETSIZE - OWN_FDS - 2 * (MAX_SESSIONS + SPARE_SESSIONS + 1)) // 2
MAX_OUTSTANDING = 100     # files a client may have in the server before we stop reading
STOP_GRACE = 2.0          # seconds workers get to leave after SIGTERM
NO_WORKER_GRACE = 10.0    # seconds with no live worker before waiting clients are told
SWEEP_INTERVAL = 10.0     # seconds between sweeps of dead clients' directories
ENTRANCE_CHECK = 5.0      # seconds between checks that the entrance FIFO is still ours
MAX_DEATHS = 3            # workers a file may kill or hang before it is an ERROR
_MD5 = re.compile(r"[0-9a-f]{32}")


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
    stillborn: str = None
    backoff_scale: float = 1.0      # testing aid: shorter waits before re-forks


class Fault(Exception):
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
        self.sessions = []
        self.trust = Trust(config, log, self.scheduler, self.supervisor, self.sessions,
                           self.drop_session)
        self._sids = itertools.count(1)
        self.stopping = False
        self.stop_reason = "the server stopped"    # what clients still served are told
        self.status = 0
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
        return self.status

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
        for session in self.sessions:
            if not session.said_bye:
                session.say_goodbye(self.stop_reason)
            session.close()
        self.stop_workers()
        if self._wake_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.log.info("server.stopped", pid=os.getpid(), status=self.status,
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
        self.dispatch()
        self.send_replies()
        self.close_finished_sessions()
        self.drop_idle_sessions()
        self.housekeeping()

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
            self.stopping, self.status = True, 1
            self.stop_reason = "the server's entrance FIFO was taken away"
            return
        self.log.warning("entrance.recreated", path=self.entrance.path)

    def sweep(self):
        """Remove the directories that dead clients left beside the entrance."""
        self.next_sweep = self.clock() + SWEEP_INTERVAL
        removed = self.entrance.sweep()
        if removed:
            self.log.info("entrance.swept", dirs=removed)

    def interest(self):
        """Map each fd to watch to (handler, owner), for reading and for writing."""
        readers = {self._wake_r: (self.on_signals, None),
                   self.entrance.fd: (self.on_entrance, None)}
        writers = {}
        for w in self.supervisor.workers():
            if w.from_worker >= 0:
                readers[w.from_worker] = (lambda w=w: self.on_worker_readable(w), w)
            if w.outbuf:
                writers[w.to_worker] = (lambda w=w: self.flush_worker(w), w)
        for s in self.sessions:
            # A client with many files in flight waits: its writes block in
            # the FIFO, and our queue stays bounded however fast it asks.
            if not s.eof and not s.dead and s.outstanding < MAX_OUTSTANDING:
                readers[s.request_fd] = (lambda s=s: self.on_session_readable(s), s)
            if s.outbuf and not s.dead:
                writers[s.reply_fd] = (s.flush, s)
        return readers, writers

    def contained(self, handler, owner):
        """Run a handler; a bug it hits costs its one client or worker, not the server."""
        try:
            handler()
        except Exception as exc:  # noqa: BLE001 - the server must outlive any one peer
            self.log.error("server.error", error=repr(exc)[:500],
                           peer=type(owner).__name__ if owner else "server",
                           **_who(owner))
            if isinstance(owner, Session):
                self.drop_session(owner, f"internal error: {exc!r}")
            elif isinstance(owner, Worker):
                self.supervisor.kill(owner, "internal error")

    def timeout(self):
        deadlines = [self.supervisor.next_deadline(), self.workerless_deadline(),
                     self.idle_deadline(), self.next_sweep, self.next_entrance_check]
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
        worker = self.supervisor.on_exit(pid, status)
        if worker is None:
            return
        for fd in (worker.to_worker, worker.from_worker):
            if fd >= 0:
                os.close(fd)
        worker.to_worker = worker.from_worker = -1
        if worker.assignment is not None:
            # A worker we killed for lying or garbling says nothing about its
            # files; one that crashed or hung on them might have met a poison.
            blame = worker.killed_for in (None, "hung")
            self.requeue(worker.assignment, pid, blame)
        self.trust.drop_proofs(worker.wid)
        self.give_up_if_hopeless()

    def give_up_if_hopeless(self):
        """Stop with status 1 when no worker can start at all (README: exit 1)."""
        if not self.stopping and self.supervisor.hopeless():
            reason = self.supervisor.why_hopeless()
            self.log.error("server.failed", reason=reason)
            self.stopping, self.status = True, 1
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
        for session in list(self.sessions):
            if session.outstanding > 0:
                self.refuse(session, reason)

    def workerless_deadline(self):
        """When waiting clients are to be told that no worker runs, or None."""
        if self.workerless_since is None or not any(s.outstanding for s in self.sessions):
            return None
        return self.workerless_since + NO_WORKER_GRACE

    def requeue(self, assignment, pid, blame):
        """Hand a dead worker's files to others; give up on one that kills them all."""
        self.log.info("assignment.requeued", slot=assignment.worker.slot, pid=pid,
                      files=len(assignment.jobs))
        alone = len(assignment.jobs) == 1
        for job in reversed(assignment.jobs):
            job.held_by_dead(pid, blame, alone)
            if job.deaths < MAX_DEATHS:
                self.scheduler.requeue(job)
                continue
            self.log.error("file.abandoned", path=job.path, deaths=job.deaths,
                           session=job.session.sid)
            self.trust.finish(job, Verdict(statuses.ERROR, reason=f"{job.deaths} "
                                           "workers died or hung reading it"))

    # -- workers ----------------------------------------------------------
    def dispatch(self):
        """Give every idle worker up to five waiting files (see Scheduler.take)."""
        for worker in self.supervisor.idle():
            assignment = self.scheduler.take(worker)
            if assignment is None:
                continue
            worker.outbuf += protocol.encode(assignment.frame())
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

    def on_worker_readable(self, worker):
        if worker.from_worker < 0:
            return
        try:
            data = os.read(worker.from_worker, 65536)
        except BlockingIOError:
            return
        if not data:                # it exited or closed its pipe: reaping follows
            os.close(worker.from_worker)
            worker.from_worker = -1
            return
        try:
            for line in worker.lines.feed(data):
                if self.supervisor.state_of(worker) is State.KILLED:
                    return
                if line is None:
                    raise Fault("oversized frame")
                self.on_worker_frame(worker, protocol.decode(line))
        except (Fault, protocol.ProtocolError) as exc:
            self.log.error("worker.faulty", slot=worker.slot, pid=worker.pid,
                           reason=str(exc))
            self.supervisor.kill(worker, "faulty")

    def on_worker_frame(self, worker, frame):
        state = self.supervisor.state_of(worker)
        if "ready" in frame and state is State.STARTING:
            self.supervisor.on_ready(worker)
        elif "progress" in frame and state is State.BUSY:
            self.supervisor.heard_from(worker)
        elif "results" in frame and state is State.BUSY:
            jobs = worker.assignment.jobs
            results = check_results(frame, worker.assignment)
            self.supervisor.answered(worker)
            for job, result in zip(jobs, results):
                self.trust.judge(worker, job, result)
        else:
            raise Fault(f"unexpected frame in state {state.name}")

    # -- clients ----------------------------------------------------------
    def on_entrance(self):
        for line in self.entrance.read_lines():
            if line == b"":
                continue            # a hello's leading newline: see encode_hello
            try:
                session = self.open_session(line)
            except (Refused, protocol.ProtocolError) as exc:
                self.log.warning("request.refused", reason=str(exc))
                continue
            self.sessions.append(session)
            self.log.info("session.opened", session=session.sid, pid=session.pid,
                          uid=session.uid, reply=session.reply_path,
                          spare=session.spare or None)
            session.send({"welcome": protocol.HELLO_VERSION, "server": os.getpid(),
                          "session": session.sid})
            session.flush()

    def open_session(self, line):
        """Return the Session a hello asks for, or raise Refused.

        Past MAX_SESSIONS a few spare sessions are for --status only, so that
        it gets in however many clients there are; past those, the client is
        told it is refused.
        """
        if line is None:
            raise Refused(f"hello longer than {protocol.HELLO_MAX} bytes")
        request, reply, pid = protocol.read_hello(line)
        if not (self.entrance.beside(request) and self.entrance.beside(reply)):
            raise Refused("FIFOs must be in a client directory beside the entrance")
        session = Session(next(self._sids), request, reply)
        session.heard_at = self.clock()
        session.pid = pid
        regular = sum(not s.spare for s in self.sessions)
        if regular >= MAX_SESSIONS:
            if len(self.sessions) - regular >= SPARE_SESSIONS:
                session.say_goodbye("too many clients; try again later")
                session.close()
                raise Refused("too many clients")
            session.spare = True
        return session

    def on_session_readable(self, session):
        session.heard_at = self.clock()
        try:
            for frame in session.read():
                self.accept_request(session, frame)
        except (Refused, protocol.ProtocolError) as exc:
            self.log.warning("request.refused", session=session.sid, reason=str(exc))
            self.refuse(session, str(exc))

    def accept_request(self, session, frame):
        if frame.get("status"):
            session.send({"status": self.status_report(asker=session)})
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
        if session.spare:
            raise Refused("too many clients; only --status is served until some leave")
        for index, item in enumerate(frame["files"]):
            session.outstanding += 1
            session.files += 1
            if item["kind"] == "missing":
                self.log.warning("file.missing", path=item["path"],
                                 sidecar=item["sidecar"], session=session.sid)
                self.trust.answer(session, {"id": frame["id"], "i": index,
                                      "status": statuses.MISSING,
                                      "expected": item.get("expected")},
                            statuses.MISSING)
                continue
            self.scheduler.submit(Job(
                session=session, rid=frame["id"], index=index, path=item["path"],
                sidecar=item["sidecar"], expected=item.get("expected"),
                update=bool(item.get("update")), size=item.get("size") or 0,
                dir=tuple(item["dir"]) if item.get("dir") else None))

    def status_report(self, asker=None):
        """What `integrity-client --status` shows (see status.py)."""
        return gather_status(self, asker)

    def idle_limit(self, session):
        if session.spare:
            return min(self.config.idle_timeout, SPARE_IDLE)
        return self.config.idle_timeout

    def drop_idle_sessions(self):
        """Drop each session that has sent nothing, and waits for nothing, too long.

        Idle sessions would otherwise hold their places for ever: a hundred
        of them lock every other client out.
        """
        now = self.clock()
        for session in list(self.sessions):
            limit = self.idle_limit(session)
            if session.outstanding <= 0 and now - session.heard_at >= limit:
                self.refuse(session, f"idle for {limit:g}s")

    def idle_deadline(self):
        """When the next idle session is to be dropped, or None."""
        return min((s.heard_at + self.idle_limit(s) for s in self.sessions
                    if s.outstanding <= 0), default=None)

    def refuse(self, session, reason):
        """Drop a client, telling it why if its reply FIFO takes one more frame."""
        session.say_goodbye(reason)
        self.drop_session(session, reason)

    def drop_session(self, session, reason):
        """Stop serving a client; its queued files are forgotten."""
        if session.dead and session not in self.sessions:
            return
        session.dead = True
        session.outbuf.clear()
        self.scheduler.drop_session(session)
        if session in self.sessions:
            self.sessions.remove(session)
            session.close()
            self.log.warning("session.dropped", session=session.sid, reason=reason,
                             files=session.files, unanswered=session.outstanding or None,
                             **_lower(session.counts))

    def send_replies(self):
        """Send each client this pass's verdicts, batched, and start writing them."""
        for session in list(self.sessions):
            try:
                session.pack()
            except Refused as exc:
                self.drop_session(session, str(exc))
                continue
            session.flush()

    def close_finished_sessions(self):
        for session in list(self.sessions):
            if session.dead:    # a write met EPIPE: SIGKILLed, or it closed its end
                self.drop_session(session, "client vanished: its reply FIFO is closed")
                continue
            if (session.eof or session.dead) and session.outstanding <= 0 \
                    and not session.said_bye:
                session.said_bye = True
                session.unchecked = Unchecked()   # free it: no re-checks after the bye
                try:
                    session.send({"bye": session.counts})
                except Refused as exc:
                    self.drop_session(session, str(exc))
                    continue
                session.flush()
                if session.dead:
                    self.drop_session(session, "client vanished: its reply FIFO is closed")
                    continue
            if session.said_bye and not session.outbuf:
                self.sessions.remove(session)
                session.close()
                self.log.info("session.closed", session=session.sid,
                              files=session.files, **_lower(session.counts))


def _wake_only(signum, frame):
    """Python-level no-op: the wakeup fd already carries the signal number."""


def _who(owner):
    """The log fields that name a peer: a worker's slot and pid, a session."""
    if isinstance(owner, Worker):
        return {"slot": owner.slot, "pid": owner.pid}
    if isinstance(owner, Session):
        return {"session": owner.sid}
    return {}


def _lower(counts):
    return {k.lower(): v for k, v in sorted(counts.items())}


def check_results(frame, assignment):
    """Return the results of an answer, or raise Fault if it is not one."""
    results = frame.get("results")
    if frame.get("id") != assignment.aid or not isinstance(results, list) \
            or len(results) != len(assignment.jobs):
        raise Fault("answer does not match its assignment")
    for job, result in zip(assignment.jobs, results):
        if not isinstance(result, dict) or result.get("path") != job.path:
            raise Fault("answered for a path it was not given")
        if "md5" in result:
            if not (isinstance(result["md5"], str) and _MD5.fullmatch(result["md5"])):
                raise Fault("malformed md5")
            stat = (result.get("size"), result.get("mtime"), result.get("ctime"),
                    result.get("ino"))
            if not all(type(v) is int for v in stat):
                raise Fault("malformed stat")
            result["stat"] = stat
    return results
