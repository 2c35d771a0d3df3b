"""The verifier: decides a file's status from untrusted opinions, BOINC style.

Pure functions of the votes, no processes and no clock, so every rule of the
trust model has a fast unit test (tests/test_verifier.py).  A vote is a hash
with its source: the baseline the client read from the sidecar, or a worker.
Two matching votes settle a file; the votes in the minority are the lies.
"""

from collections import Counter
from dataclasses import dataclass

from ..statuses import CHANGED, NEW, OK, UNSTABLE
# Worker opinions per file: two that disagree, then more until two agree.
# Honest workers always agree, so with at most two faulty workers of five a
# majority appears by the fifth opinion; random lies never agree.
MAX_OPINIONS = 5
TRUST_AFTER = 10   # confirmed results a worker needs before it is only sampled


@dataclass(frozen=True)
class Vote:
    """One worker's reading of a file."""
    wid: int            # which worker incarnation read it
    md5: str
    stat: tuple = ()    # (size, mtime, ctime, ino) as that worker saw them
    racy: bool = False  # read within a timestamp tick of its last change
    pid: int = None     # for the log: which process that worker was
    slot: int = None    # ... and in which slot, for a worker gone since


@dataclass(frozen=True)
class Verdict:
    status: str
    md5: str = None
    liars: tuple = ()       # workers in the minority: each earns a warning
    checked: bool = True    # False: one opinion that nobody cross-checked
    reason: str = None


def judge(expected, opinions, cross_check, max_opinions=MAX_OPINIONS):
    """Return the Verdict the votes support, or None to ask one more worker.

    `expected` is the baseline hash (None when the file has none); it votes
    like a worker but is never warned.  `cross_check` asks for a second
    opinion even where a single one would do (a file with no baseline).
    """
    if expected is not None and len(opinions) == 1 and opinions[0].md5 == expected:
        return Verdict(OK, expected)            # the common case, settled at once
    hashes = Counter(v.md5 for v in opinions)
    if expected is not None:
        hashes[expected] += 1
    (top, votes), *rest = hashes.most_common(2)
    if votes >= 2 and (not rest or rest[0][1] < votes):
        return Verdict(_status(expected, top), top, _liars(opinions, top))
    if len(opinions) == 1 and expected is None and not cross_check:
        return Verdict(NEW, top, checked=False)
    if len({v.stat for v in opinions}) > 1:
        return Verdict(UNSTABLE, reason="changed between readings")
    if len(opinions) < max_opinions:
        return None
    return Verdict(UNSTABLE, reason="no two readings agree")


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
