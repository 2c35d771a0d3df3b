"""The scheduler: files waiting for a worker, and assignments of at most five."""

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import protocol
from ..protocol import MAX_PATHS
from . import verifier
from .verifier import Phase, Verdict, Vote

if TYPE_CHECKING:
    from .session import Session
    from .supervisor import Worker

BATCH_BYTES = 4 * 1024 * 1024   # an assignment stops growing past this many bytes
QUEUE_BEHIND_BYTES = 1024 * 1024    # another may wait behind an assignment this small


# Job.enter() refuses what this table does not list.  A repair may need another
# try, or end in a verdict of no hash, whose sidecar then goes.
TRANSITIONS = {
    Phase.READING: {Phase.REPAIRING, Phase.DISCARDING, Phase.DONE},
    Phase.REPAIRING: {Phase.REPAIRING, Phase.DISCARDING, Phase.DONE},
    Phase.DISCARDING: {Phase.DONE},
    Phase.DONE: set(),
}


@dataclass(eq=False, slots=True)
class Job:
    """One file to be settled, from arrival until its verdict is sent.

    Three kinds: a client's file (rid and index say where its verdict goes);
    a re-check of a hash a liar gave unchecked (reverify_of); a re-reading
    that puts an outvoted reading to the proof (proving).  Its phase says
    what the next worker does with it; verifier.py says who may, and how.
    """
    session: "Session"
    rid: int | None             # the client's request id and the file's index in it
    index: int | None
    path: str
    sidecar: str | None         # None: its sidecar's name is a file of its own
    expected: str | None = None  # baseline hash from the client; never sent to a worker
    update: bool = False        # the user asked to rewrite changed baselines
    size: int = 0               # as the client's lister saw it: only for batching
    dir: tuple[int, int] | None = None  # (st_dev, st_ino) of its directory, as listed
    reverify_of: int | None = None  # wid whose unchecked hash this job re-checks
    proving: int | None = None  # wid whose outvoted reading this re-reading puts to the
                                # proof (Trust.put_to_proof): nothing goes to the client
    phase: Phase = Phase.READING
    # the votes
    opinions: list[Vote] = field(default_factory=list)
    cross_check: bool = False
    declined: set[int] = field(default_factory=set)  # wids that read no hash (error...)
    warned: set[int] = field(default_factory=set)    # wids already warned over this file
    doubted: set[int] = field(default_factory=set)   # wids already doubted over it
    losers: set[int] = field(default_factory=set)    # wids whose hash lost, warned or not
    # the sidecar
    written: str | None = None  # the hash its sidecar now holds, as its writer said
    write_error: str | None = None
    repairs: int = 0            # sidecar rewrites asked for after the verdict
    settled: Verdict | None = None  # the verdict, kept while its sidecar is discarded
    # workers that died holding it
    retried: bool = False
    stale: list[int] = field(default_factory=list)   # pids that may have left temp files
    deaths: int = 0             # workers that died holding it alone: a poison file?
    suspect: bool = False       # was in a batch whose worker died: goes alone now

    def enter(self, new):
        """Move to phase `new`; the transition table is the law."""
        if new not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"job {self.path!r}: {self.phase.name} -> {new.name}")
        self.phase = new

    @property
    def repairing(self):
        return self.phase is Phase.REPAIRING

    @property
    def discarding(self):
        return self.phase is Phase.DISCARDING

    @property
    def done(self):
        return self.phase is Phase.DONE

    def held_by_dead(self, pid, blame, alone):
        """Note that worker `pid` died holding this file.

        Only a death while the file was alone counts against it; a death in
        a batch just makes each of its files go alone from now on.
        """
        self.retried = True
        self.stale.append(pid)           # it may have left a temp file beside us
        if blame:
            self.deaths += alone
            self.suspect = True

    def task(self):
        """The assignment entry a worker sees: no expected hash."""
        return protocol.Task(self.path, self.sidecar, self.dir, verifier.write_mode(self),
                             tuple(self.stale))


@dataclass(eq=False)
class Assignment:
    aid: int
    worker: "Worker"
    jobs: list[Job]

    def frame(self):
        return protocol.assignment(self.aid, [job.task() for job in self.jobs])

    @property
    def quick(self):
        """May another assignment wait behind this one in its worker's pipe?

        Not behind big files: a client with one small file would wait for
        them, where an idle worker would have taken it next.  Not behind a
        file that killed or hung a worker: the files behind it would wait
        out the hang timeout with it.
        """
        return (sum(job.size for job in self.jobs) <= QUEUE_BEHIND_BYTES
                and not any(job.suspect for job in self.jobs))


class Scheduler:
    """Waiting jobs: urgent ones first, then each session's own in turn.

    A session's new files wait in a queue of its own, and the sessions take
    turns (round robin): a client with one file never waits behind another
    client's thousands.  Second opinions, repairs, re-checks and a dead
    worker's files are urgent: they jump every queue.
    """

    def __init__(self):
        self.urgent: deque[Job] = deque()
        self.queues = {}        # session -> deque of its new jobs; dict order is the turn
        self._aids = itertools.count(1)

    @property
    def pending(self):
        """Every waiting job (a list: for counting and tests, not for the hot path)."""
        return [*self.urgent, *itertools.chain.from_iterable(self.queues.values())]

    def submit(self, job, urgent=False):
        if urgent:
            self.urgent.appendleft(job)
        else:
            self.submit_all(job.session, [job])

    def submit_all(self, session, jobs):
        """Queue a session's new jobs behind its others."""
        queue = self.queues.get(session)
        if queue is None:
            queue = self.queues[session] = deque()
        queue.extend(jobs)

    def take(self, worker):
        """Return an Assignment of the jobs this worker may do next, or None.

        Up to five files and about BATCH_BYTES: small files travel five to a
        frame, big ones one each, so eight big files keep five workers busy
        instead of queueing behind one.  A job that was with a worker when it
        died goes alone: a file that kills workers takes no neighbour along.
        Urgent jobs come first, then the sessions' in turn: each session that
        gives a job to this assignment goes to the back of the line.
        """
        batch: list[Job] = []
        size = _fill(batch, 0, self.urgent, worker)
        for session in list(self.queues):
            if _full(batch, size):
                break
            queue = self.queues[session]
            given = len(batch)
            size = _fill(batch, size, queue, worker)
            if len(batch) > given:          # its turn is taken: to the back of the line
                del self.queues[session]
                if queue:
                    self.queues[session] = queue
        if not batch:
            return None
        return Assignment(next(self._aids), worker, batch)

    def requeue(self, job):
        """Put a job a dying worker held first in line for another worker."""
        self.urgent.appendleft(job)

    def withdraw(self, keep):
        """Remove and return the urgent jobs for which keep(job) is false."""
        gone = [job for job in self.urgent if not keep(job)]
        self.urgent = deque(job for job in self.urgent if keep(job))
        return gone

    def forget(self, session):
        """Forget the waiting jobs of a client that went away."""
        self.urgent = deque(j for j in self.urgent if j.session is not session)
        self.queues.pop(session, None)


def _full(batch, size):
    return len(batch) >= MAX_PATHS or size >= BATCH_BYTES or (batch and batch[-1].suspect)


def _fill(batch, size, queue, worker):
    """Move the jobs of `queue` this worker may do into `batch`, while it has room;
    return the batch's size in bytes."""
    passed = []
    while queue and not _full(batch, size):
        job = queue.popleft()
        if not verifier.may_read(job, worker.wid) or (job.suspect and batch):
            passed.append(job)
            continue
        batch.append(job)
        size += job.size
    queue.extendleft(reversed(passed))
    return size
