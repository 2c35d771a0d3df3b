"""The trust rules, all of them: how untrusted readings become a verdict.

Every threshold and every rule of the trust model lives here, as pure
functions of a file's votes and of its Job's state: no processes, no clock,
no I/O, so each rule has a fast unit test (tests/test_verifier.py).  trust.py
carries the decisions out; scheduler.py holds the jobs.

A vote is a hash with its source: the baseline the client holds, or a
worker.  Two matching votes settle a file (BOINC style); the votes in the
minority are lies, warned once proven (proven_lie).  More than MAX_WARNINGS
warnings and a worker is banned.
"""

import enum
from collections import Counter
from dataclasses import dataclass

from ..statuses import CHANGED, ERROR, NEW, OK, SKIPPED, UNSTABLE

# Worker opinions per file: two that disagree, then more until two agree.
# Honest workers always agree, so with at most two faulty workers of five a
# majority appears by the fifth opinion; random lies never agree.
MAX_OPINIONS = 5
TRUST_AFTER = 10   # confirmed results a worker needs before it is only sampled
MAX_WARNINGS = 2   # proven lies a worker may tell; one more and it is banned
MAX_REPAIRS = 3    # rewrites of a sidecar a liar wrote, before giving up on it
MAX_DEATHS = 3     # workers a file may kill or hang, alone, before it is an ERROR


class Phase(enum.Enum):
    """Where a Job is (scheduler.TRANSITIONS says where it may go next)."""
    READING = "reading"         # gathering opinions until the votes settle it
    REPAIRING = "repairing"     # a worker of the majority rewrites a liar's sidecar
    DISCARDING = "discarding"   # a worker removes a sidecar no reading vouches for
    DONE = "done"               # its verdict went out (or its re-check is over)

    __hash__ = object.__hash__  # Enum's own hashes the name, in Python: enter() is hot


@dataclass(frozen=True)
class Vote:
    """One worker's reading of a file."""
    wid: int            # which worker incarnation read it
    md5: str
    stat: tuple = ()    # (size, mtime, ctime, ino) as that worker saw them
    racy: bool = False  # read within a timestamp tick of its last change
    pid: int | None = None  # for the log: which process that worker was
    slot: int | None = None  # ... and in which slot, for a worker gone since


@dataclass(frozen=True)
class Verdict:
    status: str
    md5: str | None = None
    liars: tuple = ()       # workers in the minority: each earns a warning
    excused: tuple = ()     # ... but racy, or of another version: no warning, no trust
    checked: bool = True    # False: one opinion that nobody cross-checked
    reason: str | None = None


def judge(expected, opinions, cross_check, max_opinions=MAX_OPINIONS):
    """Return the Verdict the votes support, or None to ask one more worker.

    `expected` is the baseline hash (None when the file has none); it votes
    like a worker but is never warned.  `cross_check` asks for a second
    opinion even where a single one would do (a file with no baseline).
    """
    if len(opinions) == 1:                      # the common cases, settled at once
        if expected is not None and opinions[0].md5 == expected:
            return Verdict(OK, expected)
        if expected is None and not cross_check:
            return Verdict(NEW, opinions[0].md5, checked=False)
    hashes = Counter(v.md5 for v in opinions)
    if expected is not None:
        hashes[expected] += 1
    (top, votes), *rest = hashes.most_common(2)
    if votes >= 2 and (not rest or rest[0][1] < votes):
        return Verdict(_status(expected, top), top, _liars(opinions, top),
                       excused=_excused(opinions, top))
    if len(opinions) == 1 and expected is None and not cross_check:
        return Verdict(NEW, top, checked=False)
    # No hash agreed: every reader is excused, none is trusted for it (a liar
    # that reports a stat of its own makes the file look in motion).
    everyone = tuple(v.wid for v in opinions)
    if len({v.stat for v in opinions}) > 1:
        return Verdict(UNSTABLE, reason="changed between readings", excused=everyone)
    if len(opinions) < max_opinions:
        return None
    return Verdict(UNSTABLE, reason="no two readings agree", excused=everyone)


def settles_at_once(job, result):
    """Does this first reading settle a client's file OK by itself?

    The common case of a clean verify: a worker's first reading of a file
    with a baseline gives that very hash, read whole and stable, with no
    error.  judge() says OK for it with no vote against, so nothing is
    punished, repaired, discarded or kept for re-checks: the server answers
    at once (Trust.answer_ok), without the vote machinery.  Re-checks and
    proofs always go the long way.
    """
    return (job.expected is not None and result.get("md5") == job.expected
            and job.phase is Phase.READING and not job.opinions and not job.declined
            and job.reverify_of is None and job.proving is None
            and "unstable" not in result and not result.get("error")
            and not result.get("wrote"))


def new_at_first_reading(job, result):
    """Is this the first reading of a client's file with no baseline, a hash
    read whole and stable, with its sidecar (if it can have one) written
    and no error?

    The common case of a first run: judge() says NEW on this one opinion,
    unchecked, unless the worker is to be cross-checked (wants_cross_check),
    and nothing is punished, repaired or discarded.  The server answers at
    once (Trust.answer_new); a cross-check goes the long way.
    """
    return (job.expected is None and job.phase is Phase.READING and not job.opinions
            and not job.declined and job.reverify_of is None and job.proving is None
            and "md5" in result and "unstable" not in result and not result.get("error")
            and (job.sidecar is None or result.get("wrote") is True))


def _status(expected, agreed):
    if expected is None:
        return NEW
    return OK if agreed == expected else CHANGED


def _liars(opinions, agreed):
    """Workers whose hash lost although they read the very same file version.

    A reading taken while the file was still settling (racy) or of another
    version (size, mtime, ctime or inode differ) can be honest and wrong, so
    it is never punished: an honest worker must never be warned.
    """
    honest_stats = {v.stat for v in opinions if v.md5 == agreed}
    return tuple(v.wid for v in opinions
                 if v.md5 != agreed and not v.racy and v.stat in honest_stats)


def _excused(opinions, agreed):
    """Workers whose hash lost, but whom _liars excuses: a racy reading, or one
    of another version.  A liar can claim either (the flag and the stat are
    its own words), so an excuse spares the warning and nothing else: the
    worker earns its trust again and its unchecked hashes are checked
    (Trust.doubt)."""
    honest_stats = {v.stat for v in opinions if v.md5 == agreed}
    return tuple(v.wid for v in opinions
                 if v.md5 != agreed and (v.racy or v.stat not in honest_stats))


def proven_lie(expected, opinions, wid, agreed):
    """Is worker `wid`'s outvoted reading a lie beyond doubt?

    Only if the agreed hash was there on both sides of it: read (or the
    baseline) before it, and read after it.  The readings of one file are
    taken one after another, in the order of `opinions`.  A file whose
    content moves while its stat does not (writes through a shared mmap to
    pages already dirty, /sys) can make an honest first reading lose to two
    later ones; only a file that went back to its earlier content in
    between could make a proven lie honest.  The majority's last reading is
    always after the loser, so what a proof can lack is the reading before.
    """
    index = next(i for i, v in enumerate(opinions) if v.wid == wid)
    before = expected == agreed or any(v.md5 == agreed for v in opinions[:index])
    after = any(v.md5 == agreed for v in opinions[index + 1:])
    return before and after


def wants_cross_check(worker, sample, rng):
    """Should this worker's hash of a file with no baseline be checked by another?

    Trust is earned only by results another reading confirmed: a worker whose
    lies go unpunished because the files were in motion earns none.
    """
    return (worker.warnings > 0 or worker.confirmed < TRUST_AFTER
            or rng.random() < sample)


def banned(warnings):
    """Has a worker with this many warnings lied once too often?"""
    return warnings > MAX_WARNINGS


# -- deaths -------------------------------------------------------------------------

def blamed_for_death(killed_for):
    """Does a worker's death count against the files it held?

    A worker we killed for lying, for garbling or on a ban says nothing about
    its files; one that crashed (killed_for None) or hung on them may have
    met a poison file.
    """
    return killed_for in (None, "hung")


def is_poison(deaths):
    """Has a file killed or hung so many workers, alone, that it is an ERROR?"""
    return deaths >= MAX_DEATHS


# -- who reads a file next, and what it does with the sidecar -----------------------

def may_read(job, wid):
    """May worker `wid` take this job now?

    An opinion must come from a worker that has not given one (nor declined
    to); a repair, which writes the agreed hash, from any worker not caught
    lying over this file; a discard from any worker at all.
    """
    phase = job.phase
    if phase is Phase.DISCARDING:
        return True
    if job.proving is not None and len(job.opinions) == 1:
        return wid == job.proving       # the accused reads next, after the agreed hash
    if phase is Phase.REPAIRING:        # never the worker whose lie is being repaired
        return wid not in job.losers and wid != job.reverify_of
    return (wid != job.reverify_of and wid not in job.declined
            and (not job.opinions or all(v.wid != wid for v in job.opinions)))


def write_mode(job):
    """How the next worker treats the sidecar: "new", "replace", "keep" or "discard".

    The first reading of a file without a baseline writes it; second
    opinions only read.  A repair (the agreed hash differs from the one
    written) rewrites it; a sidecar nobody vouches for is discarded.  After
    a worker died holding the file, its sidecar may be that worker's: it is
    replaced, not refused.
    """
    if job.phase is Phase.DISCARDING:
        return "discard"
    if job.phase is Phase.REPAIRING:
        return "replace"
    if job.opinions or job.expected is not None or job.reverify_of is not None \
            or job.sidecar is None:
        return "keep"
    return "replace" if job.retried else "new"


def keeps_sidecar(job):
    """Must the sidecar hold the file's agreed hash when the job is done?"""
    return (job.sidecar is not None and (job.expected is None or job.update)
            and job.proving is None)


def sidecar_is_wrong(job, verdict):
    """Does the sidecar lack the agreed hash it should now hold?

    A liar that read first wrote its lie; under --update, a changed file's
    baseline is rewritten only once the change is agreed.
    """
    return (keeps_sidecar(job) and not job.write_error
            and verdict.status in (NEW, CHANGED) and job.written != verdict.md5)


def needs_repair(job, verdict):
    """Must a worker of the majority (re)write the sidecar?"""
    return sidecar_is_wrong(job, verdict) and job.repairs < MAX_REPAIRS


def needs_discard(job, verdict):
    """Did we write a new file's sidecar, and then agree on no hash at all?

    No reading can vouch for that sidecar (its writer may have lied), so it
    goes: the next run records the file as NEW rather than CHANGED.
    """
    return (not job.discarding and job.written is not None and not job.write_error
            and job.expected is None and verdict.md5 is None)


# -- readings without a hash, and the verdict the client gets -----------------------

def without_hash(result):
    """The verdict for a reading that produced no usable hash."""
    if "unstable" in result:     # its md5 is of no version of the file: not shown
        return Verdict(UNSTABLE, reason=str(result["unstable"]))
    if "skipped" in result:
        return Verdict(SKIPPED, reason=str(result["skipped"]))
    return Verdict(ERROR, reason=str(result.get("error", "no hash")))


def wants_second_reading(job):
    """Must another worker read a file the first one read no hash of?

    Against a baseline one worker's word is not enough: a liar could hide a
    change behind an error, so a second worker must read no hash too.
    """
    return (job.expected is not None and not job.declined and not job.repairing
            and job.reverify_of is None)


def client_verdict(job, verdict):
    """(status, md5, error) the client is told for a settled file.

    A new file whose sidecar could not be written has no baseline: ERROR.
    A change whose baseline was not updated is still CHANGED (exit 1), with
    why.  One worker's hash of a file that then failed is not shown.
    """
    status, error = verdict.status, verdict.reason
    if job.write_error and status == NEW:
        status, error = ERROR, job.write_error
    elif job.write_error and status == CHANGED:
        error = f"baseline not updated: {job.write_error}"
    md5 = None if status == ERROR and not verdict.checked else verdict.md5
    return status, md5, error
