"""Trust: what the server does with the readings of untrusted workers.

verifier.py decides (every rule and threshold, pure); this module acts on
the decisions: it records each worker's reading of a file, asks other
workers when the readings do not settle it, warns and bans liars, has
another worker re-check a liar's earlier unchecked hashes, has a sidecar a
liar wrote rewritten, and answers the client.  Each job moves through the
phases of scheduler.Phase; each method below does one step of that.
"""

import random
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import protocol, statuses
from . import verifier
from .log import Log
from .scheduler import Job, Phase, Scheduler
from .session import Backlog, Sessions
from .supervisor import Supervisor, Worker
from .verifier import Verdict, Vote

if TYPE_CHECKING:
    from .loop import Config

Result = dict[str, Any]     # one file of a worker's answer, checked by protocol.check_results


RECHECKS_AHEAD = 100      # re-checks of liars' hashes queued at a time (feed_rechecks)


class Trust:
    def __init__(self, config: "Config", log: Log, scheduler: Scheduler,
                 supervisor: Supervisor, sessions: Sessions) -> None:
        self.log = log
        self.scheduler = scheduler
        self.supervisor = supervisor
        self.sessions = sessions            # the server's Sessions registry
        self.sample = config.cross_check
        self.max_opinions = min(verifier.MAX_OPINIONS, config.workers)
        self.rng = random.Random()
        self.backlogs: dict[Any, deque[Backlog]] = {}  # session -> liars' hashes to re-check

    def take_result(self, worker: Worker, job: Job, result: Result) -> None:
        """on_result, but a bug of ours it hits costs this one file an ERROR,
        not the worker, and never leaves the client waiting for the verdict."""
        try:
            self.on_result(worker, job, result)
        except Exception as exc:  # noqa: BLE001 - answered below, and logged
            self.log.error("server.error", error=repr(exc)[:500], path=job.path,
                           slot=worker.slot, pid=worker.pid)
            if not job.done and job not in self.scheduler.pending:
                self.answer_error(job)

    def answer_error(self, job: Job) -> None:
        """Answer a job ERROR by the shortest way there is (no sidecar work, no
        judging): after a bug, the client must still get every verdict."""
        job.enter(Phase.DONE)
        if job.reverify_of is not None or job.proving is not None:
            job.session.settled_aside()     # the client keeps the result it holds
            return
        assert job.rid is not None and job.index is not None, "a client's file"
        job.session.answered(protocol.verdict(job.rid, job.index, statuses.ERROR,
                                              expected=job.expected, error="internal error"),
                             statuses.ERROR)

    # -- a reading comes in -----------------------------------------------
    def on_result(self, worker: Worker, job: Job, result: Result) -> None:
        """Take one worker's reading of a file, and act on what it settles."""
        if verifier.settles_at_once(job, result):
            return self.answer_ok(worker, job)
        if verifier.new_at_first_reading(job, result):
            job.cross_check = verifier.wants_cross_check(worker, self.sample, self.rng)
            if not job.cross_check:
                return self.answer_new(worker, job, result)
        if job.discarding:                      # the discard is done
            assert job.settled is not None
            return self.conclude(job, job.settled)
        self.supervisor.tally(worker)
        if "md5" not in result or "unstable" in result:
            return self.on_no_hash(worker, job, verifier.without_hash(result))
        verdict = self.record(worker, job, result)
        if verdict is None:
            return self.ask_another(job, worker)
        self.punish(job, verdict)
        if verifier.needs_repair(job, verdict):
            self.repair(job, verdict)
        else:
            self.finish(job, verdict)

    def answer_ok(self, worker: Worker, job: Job) -> None:
        """A first reading that equals the baseline (verifier.settles_at_once):
        what the long way comes to, without its objects.  The worker's result
        is tallied and, as credit() would, confirmed; the client gets OK."""
        assert job.rid is not None and job.index is not None, "a client's file"
        self.supervisor.tally(worker)
        worker.confirmed += 1
        job.enter(Phase.DONE)
        job.session.answered_ok(job.rid, job.index)

    def answer_new(self, worker: Worker, job: Job, result: Result) -> None:
        """A first reading of a file with no baseline, not to be cross-checked
        (verifier.new_at_first_reading): what the long way comes to, without
        its Verdict.  The client gets NEW, unchecked; the hash is kept for
        re-checks, should this worker be caught lying later."""
        assert job.rid is not None and job.index is not None, "a client's file"
        self.supervisor.tally(worker)
        md5 = result["md5"]
        if result.get("wrote"):
            job.written = md5
        vote = Vote(worker.wid, md5, result["stat"], bool(result.get("racy")), worker.pid,
                    worker.slot)
        job.opinions.append(vote)
        job.session.unchecked.add(job.path, job.sidecar, job.dir, vote)
        job.enter(Phase.DONE)
        job.session.answered(protocol.verdict(job.rid, job.index, statuses.NEW, md5,
                                              unchecked=True), statuses.NEW)

    def record(self, worker: Worker, job: Job, result: Result) -> Verdict | None:
        """Add a worker's hash to the file's votes; return the Verdict they
        support, or None when another worker must read it."""
        if result.get("error"):
            job.write_error = result["error"]
        if result.get("wrote"):
            job.written = result["md5"]
        if not job.opinions and job.reverify_of is None and not job.cross_check:
            # (a cross-check new_at_first_reading asked for stands: one throw of the dice)
            job.cross_check = verifier.wants_cross_check(worker, self.sample, self.rng)
        job.opinions.append(Vote(worker.wid, result["md5"], result["stat"],
                                 bool(result.get("racy")), worker.pid, worker.slot))
        # A worker that read no hash (declined) can give no opinion either.
        return verifier.judge(job.expected, job.opinions, job.cross_check,
                              self.max_opinions - len(job.declined))

    def ask_another(self, job: Job, worker: Worker) -> None:
        self.log.info("crosscheck", path=job.path, opinions=len(job.opinions),
                      slot=worker.slot, pid=worker.pid)
        self.scheduler.submit(job, urgent=True)

    def on_no_hash(self, worker: Worker, job: Job, outcome: Verdict) -> None:
        """A reading without a usable hash (error, skipped, in motion)."""
        if verifier.wants_second_reading(job):
            job.declined.add(worker.wid)
            self.log.info("crosscheck", path=job.path, slot=worker.slot, pid=worker.pid,
                          first=outcome.status)
            self.scheduler.submit(job, urgent=True)
            return
        self.finish(job, outcome)

    def repair(self, job: Job, verdict: Verdict) -> None:
        """Have a worker of the majority write the agreed hash to the sidecar."""
        job.enter(Phase.REPAIRING)
        job.repairs += 1
        self.log.warning("sidecar.repair", path=job.path, written=job.written,
                         agreed=verdict.md5)
        self.scheduler.submit(job, urgent=True)

    # -- a file is settled ------------------------------------------------
    def finish(self, job: Job, verdict: Verdict) -> None:
        """Settle a file: its unvouched sidecar goes first, if it has one."""
        if verifier.needs_discard(job, verdict):
            self.discard(job, verdict)
        else:
            self.conclude(job, verdict)

    def discard(self, job: Job, verdict: Verdict) -> None:
        job.enter(Phase.DISCARDING)
        job.settled = verdict
        self.log.warning("sidecar.discard", path=job.path, written=job.written,
                         status=verdict.status)
        self.scheduler.submit(job, urgent=True)

    def conclude(self, job: Job, verdict: Verdict) -> None:
        """The file is settled: credit who read it right, tell whom it concerns."""
        self.credit(job, verdict)
        if job.proving is not None:         # the warning, if any, is given already
            job.enter(Phase.DONE)
            job.session.settled_aside()
            return
        if job.write_error is None and verifier.sidecar_is_wrong(job, verdict):
            job.write_error = "its sidecar could not be repaired"
        if job.reverify_of is not None:
            self.end_recheck(job, verdict)
        else:
            self.answer(job, verdict)

    def credit(self, job: Job, verdict: Verdict) -> None:
        """Workers whose hash the verdict confirmed earn trust."""
        if not verdict.checked or verdict.md5 is None:
            return
        for vote in job.opinions:
            if vote.md5 == verdict.md5:
                self.supervisor.confirm(vote.wid)

    def answer(self, job: Job, verdict: Verdict) -> None:
        """Send a client's file its verdict; keep a hash nobody checked, for
        re-checks should its worker be caught lying later."""
        if not verdict.checked and job.write_error is None:
            job.session.unchecked.add(job.path, job.sidecar, job.dir, job.opinions[0])
        status, md5, error = verifier.client_verdict(job, verdict)
        assert job.rid is not None and job.index is not None, "a client's file"
        job.enter(Phase.DONE)
        job.session.answered(protocol.verdict(job.rid, job.index, status, md5, job.expected,
                                              error, unchecked=not verdict.checked),
                             status)

    def end_recheck(self, job: Job, verdict: Verdict) -> None:
        """A re-checked hash: when it was a lie (or cannot be read again),
        correct the client, which holds unchecked results until the bye."""
        session = job.session
        job.enter(Phase.DONE)
        session.settled_aside()
        original = job.opinions[0].md5
        if verdict.md5 == original and not job.write_error:
            return
        status = statuses.ERROR if job.write_error else verdict.status
        self.log.warning("file.repaired", path=job.path, got=original,
                         agreed=verdict.md5, status=status, error=job.write_error,
                         session=session.sid)
        self.sessions.send(session, protocol.correction(job.path, status, verdict.md5,
                                                        job.write_error))

    # -- liars ------------------------------------------------------------
    def punish(self, job: Job, verdict: Verdict) -> None:
        """Warn each worker the verdict outvoted, once per file: those whose lie
        is proven get a warning, the others a re-reading to the proof."""
        for wid in set(verdict.liars) - job.warned:
            job.warned.add(wid)
            if verifier.proven_lie(job.expected, job.opinions, wid, verdict.md5):
                self.penalize(wid, job, verdict)
            else:
                self.distrust(wid, job, verdict)
        for wid in set(verdict.excused) - job.doubted:
            job.doubted.add(wid)
            self.doubt(wid, job, verdict)
        if verdict.md5 is not None:
            job.losers |= {v.wid for v in job.opinions if v.md5 != verdict.md5}

    def penalize(self, wid: int, job: Job, verdict: Verdict) -> None:
        """Warn the worker whose hash was outvoted; ban it past MAX_WARNINGS."""
        vote = next(v for v in job.opinions if v.wid == wid)
        got = vote.md5
        worker = self.supervisor.note_lie(wid)
        if worker is None:
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

    def distrust(self, wid: int, job: Job, verdict: Verdict) -> None:
        """An outvoted reading that may be honest (the file may have moved
        between the readings): no warning, but the worker earns its trust
        again, its unchecked hashes are checked, and it reads the file again
        to the proof, in case it did lie."""
        vote = next(v for v in job.opinions if v.wid == wid)
        worker = self.supervisor.alive(wid)
        self.log.info("worker.outvoted", slot=vote.slot, pid=vote.pid, path=job.path,
                      got=vote.md5, agreed=verdict.md5)
        self.reverify(wid, slot=vote.slot, pid=vote.pid)
        if worker is None:
            return
        worker.confirmed = 0
        if job.proving is None:         # one proof per outvoting: a moving file
            self.put_to_proof(wid, job, verdict)    # could ask for them for ever

    def doubt(self, wid: int, job: Job, verdict: Verdict) -> None:
        """An outvoted reading excused as racy or of another version
        (verifier._excused): never a warning, for an honest worker may read
        so; but a liar may claim the same, so the worker earns its trust
        again (until then a second worker checks each of its hashes) and the
        hashes it gave unchecked are checked now."""
        vote = next((v for v in job.opinions if v.wid == wid and v.md5 != verdict.md5),
                    next(v for v in job.opinions if v.wid == wid))
        self.log.info("worker.outvoted", slot=vote.slot, pid=vote.pid, path=job.path,
                      got=vote.md5, agreed=verdict.md5,
                      excused="racy" if vote.racy else "another version")
        self.reverify(wid, slot=vote.slot, pid=vote.pid)
        worker = self.supervisor.alive(wid)
        if worker is not None:
            worker.confirmed = 0

    def put_to_proof(self, wid: int, job: Job, verdict: Verdict) -> None:
        """Have worker `wid` read the file again, right after a reading of the
        agreed hash; another then reads it.  If those two agree and its own
        reading differs, its reading lies between two of the agreed hash:
        proven (verifier.proven_lie), and warned like any other.

        An honest worker finds the agreed hash, or, with the file moving,
        a reading that nothing proves.  A liar that lies again is caught.
        """
        before = next(v for v in reversed(job.opinions) if v.md5 == verdict.md5)
        job.session.expect()
        self.scheduler.submit(Job(session=job.session, rid=None, index=None,
                                  path=job.path, sidecar=job.sidecar, size=job.size,
                                  dir=job.dir, opinions=[before], cross_check=True,
                                  proving=wid),
                              urgent=True)

    def drop_proofs(self, wid: int) -> None:
        """Forget the re-readings a worker that is gone was to give first."""
        for job in self.scheduler.withdraw(
                lambda j: not (j.proving == wid and len(j.opinions) == 1)):
            job.enter(Phase.DONE)
            job.session.settled_aside()

    def reverify(self, wid: int, **who: Any) -> None:
        """Have other workers re-check every hash worker `wid` gave unchecked.

        After its first warning none of its results goes unchecked, so later
        calls find nothing left to do.
        """
        count = 0
        for session in self.sessions:
            if session.said_bye:
                continue
            backlog = session.unchecked.take(wid)
            if backlog is None:
                continue
            session.expect(backlog.left)    # the session ends once they are re-checked
            self.backlogs.setdefault(session, deque()).append(backlog)
            count += backlog.left
        if count:
            self.log.warning("worker.reverify", files=count, **who)
            self.feed_rechecks()

    def feed_rechecks(self) -> None:
        """Queue liars' hashes for re-checking, RECHECKS_AHEAD waiting at most:
        the rest wait in their Backlogs, packed (the server calls this once a
        loop pass).  A hash that cannot be read back can never be re-checked:
        the client must not record it, so its run fails (exit 2)."""
        if not self.backlogs:
            return
        room = RECHECKS_AHEAD - len(self.scheduler.urgent)
        for session, backlogs in list(self.backlogs.items()):
            while room > 0 and backlogs and not session.dead:
                try:
                    hashes = backlogs[0].take(room)
                except OSError as exc:
                    backlogs.clear()
                    self.sessions.refuse(session, "the server could not re-check the "
                                                  f"hashes of a worker caught lying: {exc}")
                    break
                for path, sidecar, directory, vote in hashes:
                    self.scheduler.submit(Job(session=session, rid=None, index=None,
                                              path=path, sidecar=sidecar, dir=directory,
                                              opinions=[vote], written=vote.md5,
                                              cross_check=True, reverify_of=vote.wid),
                                          urgent=True)
                room -= len(hashes)
                if not hashes:          # a count above what it holds: a bug of ours,
                    for _ in range(backlogs[0].left):   # not a session waiting for ever
                        session.settled_aside()
                if not backlogs[0].left or not hashes:
                    backlogs.popleft()
            if not backlogs or session.dead:
                del self.backlogs[session]

    def give_up(self, job: Job, reason: str) -> None:
        """A file that kills the workers that read it: ERROR, with why."""
        self.finish(job, Verdict(statuses.ERROR, reason=reason))
