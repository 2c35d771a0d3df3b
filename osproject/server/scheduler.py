"""The scheduler: files waiting for a worker, and assignments of at most five."""

import itertools
from collections import deque
from dataclasses import dataclass, field

from ..protocol import MAX_PATHS

BATCH_BYTES = 4 * 1024 * 1024   # an assignment stops growing past this many bytes


@dataclass(eq=False)
class Job:
    """One file of one client request, from arrival until its verdict is sent."""
    session: object
    rid: int                    # the client's request id and the file's index in it
    index: int
    path: str
    sidecar: str                # None: its sidecar's name is a file of its own
    expected: str = None        # baseline hash from the client; never sent to a worker
    update: bool = False        # the user asked to rewrite changed baselines
    size: int = 0               # as the client's lister saw it: only for batching
    dir: tuple = None           # (st_dev, st_ino) of its directory, as the lister saw it
    opinions: list = field(default_factory=list)
    cross_check: bool = False
    reverify_of: int = None     # wid whose unchecked hash this job re-checks
    proving: int = None         # wid whose outvoted reading this re-reading puts to the
                                # proof (Trust.put_to_proof): nothing goes to the client
    retried: bool = False       # a worker died holding this job
    stale: list = field(default_factory=list)   # pids that may have left temp files
    write_error: str = None
    written: str = None         # the hash its sidecar now holds, as its writer said
    repairs: int = 0            # sidecar rewrites asked for after the verdict
    warned: set = field(default_factory=set)    # wids already warned over this file
    losers: set = field(default_factory=set)    # wids whose hash lost, warned or not
    declined: set = field(default_factory=set)  # wids that read no hash (error...)
    deaths: int = 0             # workers that died holding it alone: a poison file?
    suspect: bool = False       # was in a batch whose worker died: goes alone now
    settled: object = None      # the verdict, kept while its sidecar is discarded
    answered: bool = False      # its verdict went out (or its re-check is done)

    def allows(self, wid):
        """May worker `wid` take this file now?

        An opinion must come from a worker that has not given one (nor
        declined to); a repair, which writes the agreed hash, from any worker
        not caught lying over this file.
        """
        if self.settled is not None:
            return True             # a discard is no opinion: any worker will do
        if self.proving is not None and len(self.opinions) == 1:
            return wid == self.proving  # the accused reads next, after the agreed hash
        if self.repairs:            # never the worker whose lie is being repaired
            return wid not in self.losers and wid != self.reverify_of
        return (wid != self.reverify_of and wid not in self.declined
                and all(v.wid != wid for v in self.opinions))

    @property
    def keeps_sidecar(self):
        """True when the sidecar must hold the file's agreed hash when done."""
        return (self.sidecar is not None and (self.expected is None or self.update)
                and self.proving is None)

    def write_mode(self):
        """How the next worker treats the sidecar: new, replace or keep.

        The first reading of a file without a baseline writes it; second
        opinions only read.  A repair (the agreed hash differs from the one
        written) rewrites it.
        """
        if self.settled is not None:
            return "discard"
        if self.repairs:
            return "replace"
        if self.opinions or self.expected is not None or self.reverify_of is not None \
                or self.sidecar is None:
            return "keep"
        return "replace" if self.retried else "new"

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

    def item(self):
        """The assignment entry a worker sees: no expected hash."""
        entry = {"path": self.path, "sidecar": self.sidecar, "dir": self.dir,
                 "write": self.write_mode()}
        if self.stale:
            entry["stale"] = self.stale
        return entry


@dataclass(eq=False)
class Assignment:
    aid: int
    worker: object
    jobs: list

    def frame(self):
        return {"id": self.aid, "files": [job.item() for job in self.jobs]}


class Scheduler:
    """Waiting jobs: urgent ones first, then each session's own in turn.

    A session's new files wait in a queue of its own, and the sessions take
    turns (round robin): a client with one file never waits behind another
    client's thousands.  Second opinions, repairs, re-checks and a dead
    worker's files are urgent: they jump every queue.
    """

    def __init__(self):
        self.urgent = deque()
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
            self.queues.setdefault(job.session, deque()).append(job)

    def take(self, worker):
        """Return an Assignment of the jobs this worker may do next, or None.

        Up to five files and about BATCH_BYTES: small files travel five to a
        frame, big ones one each, so eight big files keep five workers busy
        instead of queueing behind one.  A job that was with a worker when it
        died goes alone: a file that kills workers takes no neighbour along.
        Urgent jobs come first, then the sessions' in turn: each session that
        gives a job to this assignment goes to the back of the line.
        """
        batch = []
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

    def drop_session(self, session):
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
        if not job.allows(worker.wid) or (job.suspect and batch):
            passed.append(job)
            continue
        batch.append(job)
        size += job.size
    queue.extendleft(reversed(passed))
    return size
