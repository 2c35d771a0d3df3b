"""Trust: what the server does with the readings of untrusted workers.

verifier.py decides (pure rules, no state); this module acts on the
decisions: it records each worker's reading of a file, asks other workers
when the readings do not settle it, warns and bans liars, has another worker
re-check a liar's earlier unchecked hashes, has a sidecar a liar wrote
rewritten, and answers the client.
"""

import random

from .. import statuses
from . import verifier
from .scheduler import Job
from .session import Refused
from .supervisor import State
from .verifier import Verdict, Vote

MAX_REPAIRS = 3           # rewrites of a sidecar a liar wrote, before giving up


class Trust:
    def __init__(self, config, log, scheduler, supervisor, sessions, drop_session):
        self.log = log
        self.scheduler = scheduler
        self.supervisor = supervisor
        self.sessions = sessions            # the server's own list of live sessions
        self.drop_session = drop_session
        self.sample = config.cross_check
        self.max_opinions = min(verifier.MAX_OPINIONS, config.workers)
        self.rng = random.Random()

    def judge(self, worker, job, result):
        """on_result, but a bug of ours it hits costs this one file an ERROR,
        not the worker, and never leaves the client waiting for the verdict."""
        try:
            self.on_result(worker, job, result)
        except Exception as exc:  # noqa: BLE001 - answered below, and logged
            self.log.error("server.error", error=repr(exc)[:500], path=job.path,
                           slot=worker.slot, pid=worker.pid)
            if not job.answered and job not in self.scheduler.pending:
                self.abandon(job)

    def abandon(self, job):
        """Answer a job ERROR by the shortest way there is (no sidecar work, no
        judging): after a bug, the client must still get every verdict."""
        job.answered = True
        if job.reverify_of is not None or job.proving is not None:
            job.session.outstanding -= 1    # the client keeps the result it holds
            return
        self.answer(job.session, {"id": job.rid, "i": job.index, "status": statuses.ERROR,
                                  "expected": job.expected, "error": "internal error"},
                    statuses.ERROR)

    def on_result(self, worker, job, result):
        """Record one worker's reading of a file; settle it or ask another worker."""
        if job.settled is not None:             # the discard is done
            return self.finish(job, job.settled)
        self.supervisor.tally(worker)
        if "md5" not in result or "unstable" in result:
            return self.on_no_hash(worker, job, outcome_without_hash(result))
        if result.get("error"):
            job.write_error = result["error"]
        if result.get("wrote"):
            job.written = result["md5"]
        if not job.opinions and job.reverify_of is None:
            job.cross_check = verifier.wants_cross_check(
                worker, self.sample, self.rng)
        job.opinions.append(Vote(worker.wid, result["md5"], result["stat"],
                                 bool(result.get("racy")), worker.pid, worker.slot))
        # A worker that read no hash (declined) can give no opinion either.
        verdict = verifier.judge(job.expected, job.opinions, job.cross_check,
                                 self.max_opinions - len(job.declined))
        if verdict is None:
            self.log.info("crosscheck", path=job.path, opinions=len(job.opinions),
                          slot=worker.slot, pid=worker.pid)
            self.scheduler.submit(job, urgent=True)
            return
        for wid in set(verdict.liars) - job.warned:
            job.warned.add(wid)
            if verifier.proven_lie(job.expected, job.opinions, wid, verdict.md5):
                self.penalize(wid, job, verdict)
            else:
                self.distrust(wid, job, verdict)
        if verdict.md5 is not None:
            job.losers |= {v.wid for v in job.opinions if v.md5 != verdict.md5}
        if self.needs_repair(job, verdict):
            job.repairs += 1
            self.log.warning("sidecar.repair", path=job.path, written=job.written,
                             agreed=verdict.md5)
            self.scheduler.submit(job, urgent=True)
        else:
            self.finish(job, verdict)

    def on_no_hash(self, worker, job, outcome):
        """A reading without a usable hash (error, skipped, in motion).

        Against a baseline one worker's word is not enough: a liar could hide
        a change behind an error, so a second worker must read no hash too.
        """
        if job.expected is not None and not job.declined and not job.repairs \
                and job.reverify_of is None:
            job.declined.add(worker.wid)
            self.log.info("crosscheck", path=job.path, slot=worker.slot, pid=worker.pid,
                          first=outcome.status)
            self.scheduler.submit(job, urgent=True)
            return
        self.finish(job, outcome)

    def needs_discard(self, job, verdict):
        """Did we write a new file's sidecar, and then agree on no hash at all?

        No reading can vouch for that sidecar (its writer may have lied), so
        it goes: the next run records the file as NEW rather than CHANGED.
        """
        return (job.settled is None and job.written is not None and not job.write_error
                and job.expected is None and verdict.md5 is None)

    def needs_repair(self, job, verdict):
        """Must a worker of the majority (re)write the sidecar?"""
        return sidecar_is_wrong(job, verdict) and job.repairs < MAX_REPAIRS

    # -- verdicts ---------------------------------------------------------
    def finish(self, job, verdict):
        """Answer the client with a file's verdict (the liars are warned already)."""
        if self.needs_discard(job, verdict):
            job.settled = verdict
            self.log.warning("sidecar.discard", path=job.path, written=job.written,
                             status=verdict.status)
            self.scheduler.submit(job, urgent=True)
            return
        self.credit(job, verdict)
        if job.proving is not None:         # the warning, if any, is given already
            job.answered = True
            job.session.outstanding -= 1
            return
        if job.write_error is None and sidecar_is_wrong(job, verdict):
            job.write_error = "its sidecar could not be repaired"
        if not verdict.checked and job.write_error is None:
            job.session.unchecked.add(job.path, job.sidecar, job.dir, job.opinions[0])
        if job.reverify_of is not None:
            return self.finish_reverify(job, verdict)
        status, error = verdict.status, verdict.reason
        if job.write_error and status == statuses.NEW:
            status, error = statuses.ERROR, job.write_error
        elif job.write_error and status == statuses.CHANGED:   # still exit 1
            error = f"baseline not updated: {job.write_error}"
        md5 = None if status == statuses.ERROR and not verdict.checked else verdict.md5
        reply = {"id": job.rid, "i": job.index, "status": status, "md5": md5,
                 "expected": job.expected, "error": error}
        if not verdict.checked:
            reply["unchecked"] = True
        job.answered = True
        self.answer(job.session, reply, status)

    def credit(self, job, verdict):
        """Workers whose hash the verdict confirmed earn trust."""
        if not verdict.checked or verdict.md5 is None:
            return
        for vote in job.opinions:
            worker = self.supervisor.by_wid.get(vote.wid)
            if worker is not None and vote.md5 == verdict.md5:
                worker.confirmed += 1

    def answer(self, session, reply, status):
        session.outstanding -= 1
        session.count(status)
        session.reply({k: v for k, v in reply.items() if v is not None})

    def finish_reverify(self, job, verdict):
        """A re-checked hash: when it was a lie (or cannot be read again),
        correct the client, which holds unchecked results until the bye."""
        session = job.session
        job.answered = True
        session.outstanding -= 1
        original = job.opinions[0].md5
        if verdict.md5 == original and not job.write_error:
            return
        status = statuses.ERROR if job.write_error else verdict.status
        self.log.warning("file.repaired", path=job.path, got=original,
                         agreed=verdict.md5, status=status, error=job.write_error,
                         session=session.sid)
        try:
            session.send({"correct": {"path": job.path, "status": status,
                                      "md5": verdict.md5, "error": job.write_error}})
        except Refused as exc:
            self.drop_session(session, str(exc))

    def penalize(self, wid, job, verdict):
        """Warn the worker whose hash was outvoted; ban it past MAX_WARNINGS."""
        vote = next(v for v in job.opinions if v.wid == wid)
        got = vote.md5
        self.supervisor.totals.warnings += 1
        worker = self.supervisor.by_wid.get(wid)
        if worker is None or self.supervisor.state_of(worker) is State.KILLED:
            # Dead or being killed already: nobody to punish, but its other
            # unchecked hashes are as suspect as if it were alive.
            self.log.warning("worker.warned", slot=vote.slot, pid=vote.pid, path=job.path,
                             got=got, agreed=verdict.md5, gone=True)
            self.reverify(wid, slot=vote.slot, pid=vote.pid)
            return
        banned = self.supervisor.warn(worker)
        self.log.warning("worker.warned", slot=worker.slot, pid=worker.pid,
                         path=job.path, got=got, agreed=verdict.md5,
                         warnings=worker.warnings)
        self.reverify(wid, slot=worker.slot, pid=worker.pid)
        if banned:
            self.supervisor.ban(worker)

    def distrust(self, wid, job, verdict):
        """An outvoted reading that may be honest (the file may have moved
        between the readings): no warning, but the worker earns its trust
        again, its unchecked hashes are checked, and it reads the file again
        to the proof, in case it did lie."""
        vote = next(v for v in job.opinions if v.wid == wid)
        worker = self.supervisor.by_wid.get(wid)
        self.log.info("worker.outvoted", slot=vote.slot, pid=vote.pid, path=job.path,
                      got=vote.md5, agreed=verdict.md5)
        self.reverify(wid, slot=vote.slot, pid=vote.pid)
        if worker is None or self.supervisor.state_of(worker) is State.KILLED:
            return
        worker.confirmed = 0
        if job.proving is None:         # one proof per outvoting: a moving file
            self.put_to_proof(wid, job, verdict)    # could ask for them for ever

    def put_to_proof(self, wid, job, verdict):
        """Have worker `wid` read the file again, right after a reading of the
        agreed hash; another then reads it.  If those two agree and its own
        reading differs, its reading lies between two of the agreed hash:
        proven (verifier.proven_lie), and warned like any other.

        An honest worker finds the agreed hash, or, with the file moving,
        a reading that nothing proves.  A liar that lies again is caught.
        """
        before = next(v for v in reversed(job.opinions) if v.md5 == verdict.md5)
        job.session.outstanding += 1
        self.scheduler.submit(Job(session=job.session, rid=None, index=None,
                                  path=job.path, sidecar=job.sidecar, size=job.size,
                                  opinions=[before], cross_check=True, proving=wid),
                              urgent=True)

    def drop_proofs(self, wid):
        """Forget the re-readings a worker that is gone was to give first."""
        for job in self.scheduler.withdraw(
                lambda j: not (j.proving == wid and len(j.opinions) == 1)):
            job.answered = True
            job.session.outstanding -= 1

    def reverify(self, wid, **who):
        """Have other workers re-check every hash worker `wid` gave unchecked.

        After its first warning none of its results goes unchecked, so later
        calls find nothing left to do.
        """
        count = 0
        for session in self.sessions:
            if session.said_bye:
                continue
            for path, sidecar, directory, vote in session.unchecked.pop(wid):
                session.outstanding += 1
                self.scheduler.submit(Job(session=session, rid=None, index=None,
                                          path=path, sidecar=sidecar, dir=directory,
                                          opinions=[vote],
                                          written=vote.md5, cross_check=True,
                                          reverify_of=wid), urgent=True)
                count += 1
        if count:
            self.log.warning("worker.reverify", files=count, **who)


def sidecar_is_wrong(job, verdict):
    """Does the sidecar lack the agreed hash it should now hold?

    A liar that read first wrote its lie; under --update, a changed file's
    baseline is rewritten only once the change is agreed.
    """
    return (job.keeps_sidecar and not job.write_error
            and verdict.status in (statuses.NEW, statuses.CHANGED)
            and job.written != verdict.md5)


def outcome_without_hash(result):
    """The verdict for a reading that produced no usable hash."""
    if "unstable" in result:     # its md5 is of no version of the file: not shown
        return Verdict(statuses.UNSTABLE, reason=str(result["unstable"]))
    if "skipped" in result:
        return Verdict(statuses.SKIPPED, reason=str(result["skipped"]))
    return Verdict(statuses.ERROR, reason=str(result.get("error", "no hash")))
