"""The trust actions driven directly, for races a process test cannot time:
here, a new file that vanishes between its first and its second reading."""

from types import SimpleNamespace

from osproject.server.scheduler import Job, Scheduler
from osproject.server.session import Unchecked
from osproject.server.trust import Trust
from osproject.server.verifier import write_mode


class Log:
    def __init__(self):
        self.events = []

    def info(self, event, **fields):
        self.events.append(event)

    warning = error = info


class Session:
    """What Trust uses of a session: its count of jobs owed, and the verdicts."""

    def __init__(self):
        self.outstanding, self.replies, self.unchecked = 1, [], Unchecked()
        self.sid, self.said_bye, self.dead = 1, False, False

    def expect(self, jobs=1):
        self.outstanding += jobs

    def answered(self, verdict, status):
        self.outstanding -= 1
        self.replies.append(verdict)

    def answered_ok(self, rid, index):
        self.answered({"id": rid, "i": index, "status": "OK"}, "OK")

    def settled_aside(self):
        self.outstanding -= 1


def worker(wid):
    return SimpleNamespace(wid=wid, pid=1000 + wid, slot=wid, warnings=0, results=0,
                           confirmed=0)


def supervisor(workers, **methods):
    """What Trust asks of the supervisor, for workers that all live."""
    def confirm(wid):
        workers[wid].confirmed += 1
    return SimpleNamespace(alive=workers.get, confirm=confirm, note_lie=workers.get,
                           **methods)


def reading(path, md5=None, **extra):
    result = {"path": path, **extra}
    if md5:
        result.update(md5=md5, stat=(1, 2, 3, 4), wrote=True)
    return result


def test_a_new_file_whose_second_reading_fails_loses_the_sidecar_nobody_vouches_for():
    workers = {1: worker(1), 2: worker(2), 3: worker(3)}
    scheduler, log, session = Scheduler(), Log(), Session()
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), log, scheduler,
                  supervisor(workers, tally=lambda w: None), [session])
    job = Job(session=session, rid=1, index=0, path="/t/f", sidecar="/t/f.md5")

    assert write_mode(job) == "new"
    trust.on_result(workers[1], job, reading("/t/f", "a" * 32))  # fresh: cross-checked
    assert scheduler.take(workers[1]) is None, "not a second opinion of its own"
    assert scheduler.take(workers[2]).jobs == [job] and write_mode(job) == "keep"
    trust.on_result(workers[2], job, reading("/t/f", error="No such file or directory"))

    assert "sidecar.discard" in log.events and session.replies == []
    assert scheduler.take(workers[1]).jobs == [job] and write_mode(job) == "discard"
    trust.on_result(workers[1], job, {"path": "/t/f", "discarded": True})
    assert [r["status"] for r in session.replies] == ["ERROR"]
    assert "md5" not in session.replies[0]
    assert session.outstanding == 0


def test_a_bug_of_ours_while_judging_a_file_answers_it_error_instead_of_hanging():
    workers = {1: worker(1), 2: worker(2)}

    def tally(w):
        raise KeyError("a bug of ours")          # stands in for any bug in on_result
    scheduler, log, session = Scheduler(), Log(), Session()
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), log, scheduler,
                  supervisor(workers, tally=tally), [session])
    job = Job(session=session, rid=1, index=0, path="/t/f", sidecar="/t/f.md5")

    trust.take_result(workers[1], job, reading("/t/f", "a" * 32))

    assert "server.error" in log.events
    assert [(r["status"], r["error"]) for r in session.replies] == [("ERROR",
                                                                     "internal error")]
    assert session.outstanding == 0 and not scheduler.pending


def test_an_outvoted_first_reading_is_warned_only_once_its_re_reading_is_proven_a_lie():
    A, X, Y = "a" * 32, "1" * 32, "2" * 32
    workers = {w: worker(w) for w in (1, 2, 3, 4)}
    warned = []
    scheduler, log, session = Scheduler(), Log(), Session()
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=4), log, scheduler,
                  supervisor(workers, tally=lambda w: None,
                             warn=lambda w: warned.append(w.wid) or False), [session])
    job = Job(session=session, rid=1, index=0, path="/t/f", sidecar="/t/f.md5")
    for wid, md5 in ((1, X), (2, A), (3, A)):     # the new file moved after its first reading?
        trust.on_result(workers[wid], job, reading("/t/f", md5))
        if wid < 3:
            assert scheduler.take(workers[wid + 1]).jobs == [job]
    assert [r["md5"] for r in session.replies] == [A]
    assert "worker.outvoted" in log.events and warned == []
    assert session.outstanding == 1, "the proof keeps the session open"

    assert scheduler.take(workers[2]) is None, "the accused reads it again first"
    [proof] = scheduler.take(workers[1]).jobs
    trust.on_result(workers[1], proof, reading("/t/f", Y))      # a lie again
    assert scheduler.take(workers[3]) is None, "it read just before the accused"
    assert scheduler.take(workers[4]).jobs == [proof]
    trust.on_result(workers[4], proof, reading("/t/f", A))
    assert warned == [1] and "worker.warned" in log.events
    assert len(session.replies) == 1 and session.outstanding == 0
    assert not scheduler.pending


def test_a_proof_re_reading_reads_the_very_file_in_its_directory(tmp_path):
    """A proof job once lost its directory's identity: its worker read nothing,
    the proof ended in silence, and a liar outvoted on a new file went unwarned."""
    import hashlib
    import os

    from osproject.server.worker import WorkerProcess
    data = b"the agreed content\n"
    (tmp_path / "f").write_bytes(data)
    here = os.stat(tmp_path)
    path, agreed = str(tmp_path / "f"), hashlib.md5(data).hexdigest()
    workers = {w: worker(w) for w in (1, 2, 3)}
    scheduler, session = Scheduler(), Session()
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), Log(), scheduler,
                  supervisor(workers, tally=lambda w: None), [session])
    job = Job(session=session, rid=1, index=0, path=path, sidecar=path + ".md5",
              dir=(here.st_dev, here.st_ino))
    for wid, md5 in ((1, "1" * 32), (2, agreed), (3, agreed)):
        trust.on_result(workers[wid], job, reading(path, md5))
        if wid < 3:
            scheduler.take(workers[wid + 1])
    [proof] = scheduler.take(workers[1]).jobs
    to_worker, from_worker = os.pipe()
    try:
        result = WorkerProcess(to_worker, from_worker, {}).do_file(proof.task())
    finally:
        os.close(to_worker)
        os.close(from_worker)
    assert result.get("md5") == agreed, result


def _first_run(shortcut, monkeypatch, results):
    """Each result as a fresh new file's first reading by a trusted worker; return
    what the client and the trust state saw."""
    import osproject.server.verifier as verifier_mod
    if not shortcut:
        monkeypatch.setattr(verifier_mod, "new_at_first_reading", lambda job, result: False)
    workers = {1: worker(1)}
    workers[1].confirmed = 100                     # trusted: only sampled (never, here)
    tallies = []
    scheduler, log, session = Scheduler(), Log(), Session()
    trust = Trust(SimpleNamespace(cross_check=0.0, workers=3), log, scheduler,
                  supervisor(workers, tally=tallies.append), [session])
    jobs = []
    for i, result in enumerate(results):
        job = Job(session=session, rid=1, index=i, path=f"/t/{i}",
                  sidecar=None if i == 3 else f"/t/{i}.md5", dir=(1, 2))
        session.outstanding += 1
        trust.on_result(workers[1], job, result)
        jobs.append((job.phase, job.written, job.opinions, job.write_error, job.cross_check))
    pending = [(j.path, j.phase) for j in scheduler.pending]
    return (session.replies, session.outstanding, bytes(session.unchecked._by_wid[1]),
            jobs, pending, log.events, len(tallies), workers[1].confirmed)


def test_a_first_run_shortcut_comes_to_what_the_long_way_does(monkeypatch):
    md5 = "b" * 32
    results = [reading("/t/0", md5), reading("/t/1", md5, racy=True),
               reading("/t/2", md5, wrote=False, error="a sidecar appeared meanwhile; "
                       "not overwritten"),
               {"md5": md5, "stat": (1, 2, 3, 4)},          # no sidecar: none written
               reading("/t/4", md5, unstable="changed while it was read")]
    short = _first_run(True, monkeypatch, results)
    monkeypatch.undo()
    assert short == _first_run(False, monkeypatch, results)
    assert [r["status"] for r in short[0]] == ["NEW", "NEW", "ERROR", "NEW", "UNSTABLE"]
    assert all(r.get("unchecked") for r in short[0][:2])


class Sessions(list):
    """What Trust asks of the Sessions registry: the sessions, and refuse()."""

    def __init__(self, *sessions):
        super().__init__(sessions)
        self.refused = []

    def refuse(self, session, reason):
        self.refused.append((session, reason))


def test_a_liar_caught_late_has_its_hashes_rechecked_a_hundred_at_a_time(monkeypatch):
    """(From a review.)  All of a liar's unchecked hashes read back and queued
    at once took a server with a million of them in its temp file from 15 MiB
    to 1.7 GB.  Now RECHECKS_AHEAD wait in the queue; the rest stay packed in
    their Backlog until the queue has room, and the session waits for all."""
    from osproject.server import trust as trust_mod
    from osproject.server.verifier import Vote
    monkeypatch.setattr(Unchecked, "SPILL", 2000)
    session, scheduler = Session(), Scheduler()
    for i in range(1000):
        session.unchecked.add(f"/t/{i}", f"/t/{i}.md5", (1, 2),
                              Vote(1, "a" * 32, (1, 2, 3, 4), False, 1001, 1))
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), Log(), scheduler,
                  supervisor({}), Sessions(session))
    trust.reverify(1)
    assert session.outstanding == 1 + 1000, "the session waits for every re-check"
    queued, rounds = [], 0
    while scheduler.urgent:
        assert len(scheduler.urgent) <= trust_mod.RECHECKS_AHEAD == 100
        queued += scheduler.urgent
        scheduler.urgent.clear()                # as if workers took them
        trust.feed_rechecks()
        rounds += 1
    assert rounds == 10
    assert sorted(job.path for job in queued) == sorted(f"/t/{i}" for i in range(1000))
    assert {(job.reverify_of, job.opinions[0].md5) for job in queued} == {(1, "a" * 32)}
    assert trust.backlogs == {} and session.unchecked.take(1) is None


def test_a_spilled_hash_that_cannot_be_read_back_later_fails_the_client_then(monkeypatch):
    """The first hundred re-checks are read back fine; a span read on a later
    loop pass fails: that client's run fails then (it must not record hashes
    nobody re-checked), and its backlog is dropped, not retried each pass."""
    import errno
    import os

    from osproject.server.verifier import Vote
    monkeypatch.setattr(Unchecked, "SPILL", 2000)
    session, scheduler = Session(), Scheduler()
    for i in range(1000):
        session.unchecked.add(f"/t/{i}", f"/t/{i}.md5", (1, 2),
                              Vote(1, "a" * 32, (1, 2, 3, 4), False, 1001, 1))
    sessions = Sessions(session)
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), Log(), scheduler,
                  supervisor({}), sessions)
    trust.reverify(1)
    assert len(scheduler.urgent) == 100 and sessions.refused == []
    scheduler.urgent.clear()
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "pread", broken)
    trust.feed_rechecks()
    [(refused, reason)] = sessions.refused
    assert refused is session and "could not re-check" in reason
    assert trust.backlogs == {} and not scheduler.urgent
    trust.feed_rechecks()
    assert len(sessions.refused) == 1, "refused once"


def test_a_backlog_that_holds_fewer_hashes_than_it_counts_never_hangs_the_loop():
    """(From a review.)  Were a Backlog's count ever above what it holds,
    feed_rechecks looped for ever on empty takes: the whole server stuck.
    Now the backlog is done and its session no longer waits for the rest."""
    from osproject.server.verifier import Vote
    session, scheduler = Session(), Scheduler()
    session.unchecked.add("/t/a", "/t/a.md5", (1, 2),
                          Vote(1, "a" * 32, (1, 2, 3, 4), False, 1001, 1))
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), Log(), scheduler,
                  supervisor({}), Sessions(session))
    session.unchecked._counts[1] += 2       # as a bug of ours would leave it
    trust.reverify(1)
    assert [job.path for job in scheduler.urgent] == ["/t/a"]
    assert trust.backlogs == {} and session.outstanding == 1 + 1, "one re-check still due"


def test_a_liar_whose_spilled_hashes_cannot_be_read_back_is_banned_and_its_client_told(
        monkeypatch):
    """(From two reviews.)  The ban still comes, the file that proved the lie
    is answered OK, and the client, which would record lies nobody can
    re-check now, is refused (its run fails, exit 2)."""
    import errno
    import os

    from osproject.server.verifier import Vote
    monkeypatch.setattr(Unchecked, "SPILL", 200)
    liar = worker(1)
    liar.warnings = 2
    workers = {1: liar, 2: worker(2)}
    banned = []
    sup = SimpleNamespace(alive=workers.get, note_lie=workers.get, confirm=lambda w: None,
                          tally=lambda w: None, warn=lambda w: True, ban=banned.append)
    session, scheduler, log = Session(), Scheduler(), Log()
    for i in range(10):
        session.unchecked.add(f"/t/{i}", f"/t/{i}.md5", (1, 2),
                              Vote(1, "a" * 32, (1, 2, 3, 4), False, 1001, 1))
    assert session.unchecked._spans
    sessions = Sessions(session)
    trust = Trust(SimpleNamespace(cross_check=0.1, workers=3), log, scheduler, sup, sessions)
    job = Job(session=session, rid=1, index=0, path="/t/x", sidecar=None, expected="e" * 32,
              opinions=[Vote(1, "b" * 32, (1, 2, 3, 4), False, 1001, 1)])
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")
    with monkeypatch.context() as m:
        m.setattr(os, "pread", broken)
        trust.take_result(workers[2], job, {"md5": "e" * 32, "stat": (1, 2, 3, 4)})
    assert banned == [liar]
    assert [r["status"] for r in session.replies] == ["OK"]
    assert "server.error" not in log.events
    [(refused, reason)] = sessions.refused
    assert refused is session and "could not re-check" in reason


def test_a_liar_that_says_racy_is_never_warned_but_loses_its_trust_and_its_unchecked_hashes():
    """(From a review.)  The racy flag and the stat are a worker's own words:
    a liar that claims them on every lie went unwarned and kept its trust, so
    90% of its new files' lies went unchecked.  Now the excuse spares the
    warning only."""
    from osproject.server.verifier import Vote, wants_cross_check
    A, X = "a" * 32, "1" * 32
    workers = {w: worker(w) for w in (1, 2)}
    workers[1].confirmed = 100                      # trusted: only sampled
    warned = []
    scheduler, log, session = Scheduler(), Log(), Session()
    trust = Trust(SimpleNamespace(cross_check=0.0, workers=3), log, scheduler,
                  supervisor(workers, tally=lambda w: None,
                             warn=lambda w: warned.append(w.wid) or False), [session])
    for i in range(3):                              # its earlier lies, unchecked
        session.unchecked.add(f"/t/n{i}", f"/t/n{i}.md5", (1, 2),
                              Vote(1, X, (1, 2, 3, 4), True, 1001, 1))
    for excuse in ({"racy": True}, {"stat": (9, 9, 9, 9)}):
        workers[1].confirmed = 100
        job = Job(session=session, rid=1, index=0, path="/t/f", sidecar=None, expected=A)
        session.outstanding += 1
        trust.on_result(workers[1], job, {**reading("/t/f", X), **excuse})
        assert scheduler.withdraw(lambda j, job=job: j is not job) == [job], "asked again"
        trust.on_result(workers[2], job, reading("/t/f", A))
        assert warned == [], "an excused reading is never a warning"
        assert workers[1].confirmed == 0
        assert wants_cross_check(workers[1], 0.0, None), "each new file of it checked again"
    rechecks = [j for j in scheduler.pending if j.reverify_of == 1]
    assert sorted(j.path for j in rechecks) == ["/t/n0", "/t/n1", "/t/n2"]
    assert log.events.count("worker.outvoted") == 2 and "worker.warned" not in log.events


def _doubting(confirmed=0):
    workers = {w: worker(w) for w in (1, 2, 3)}
    workers[1].confirmed = confirmed
    scheduler, log, session, warned = Scheduler(), Log(), Session(), []
    trust = Trust(SimpleNamespace(cross_check=0.0, workers=3), log, scheduler,
                  supervisor(workers, tally=lambda w: None,
                             warn=lambda w: warned.append(w.wid) or False), [session])
    return workers, scheduler, log, session, warned, trust


def test_a_trusted_liar_that_reports_a_stat_of_its_own_loses_its_trust_first_run_or_not():
    """(From a review.)  Readings of two stats are UNSTABLE before any loser is
    named: that verdict excuses every reader, so the liar earns no trust."""
    A, X, B = "a" * 32, "1" * 32, "b" * 32
    for expected, honest in ((None, A), (A, B)):        # a first run; a real change
        workers, scheduler, log, session, warned, trust = _doubting(confirmed=100)
        job = Job(session=session, rid=1, index=0, path="/t/f", expected=expected,
                  sidecar="/t/f.md5" if expected is None else None)
        trust.sample = 1.0                              # sampled, on a first run
        trust.on_result(workers[1], job, {**reading("/t/f", X), "stat": (9, 9, 9, 9)})
        assert scheduler.take(workers[2]).jobs == [job]
        trust.on_result(workers[2], job, {**reading("/t/f", honest), "wrote": False})
        if expected is None:
            assert job.discarding, "the sidecar the liar wrote goes: nobody vouches for it"
        else:
            assert [r["status"] for r in session.replies] == ["UNSTABLE"]
        assert workers[1].confirmed == 0 and warned == []
        assert "worker.outvoted" in log.events


def test_a_worker_is_doubted_once_per_file_and_for_its_losing_reading():
    A, X, Y = "a" * 32, "1" * 32, "2" * 32
    workers, scheduler, log, session, warned, trust = _doubting()
    events = []
    trust.log = SimpleNamespace(info=lambda e, **f: events.append((e, f)),
                                warning=lambda e, **f: events.append((e, f)),
                                error=lambda e, **f: events.append((e, f)))
    job = Job(session=session, rid=1, index=0, path="/t/f", sidecar="/t/f.md5")
    trust.on_result(workers[1], job, reading("/t/f", X, racy=True))   # wrote X, "racy"
    assert scheduler.take(workers[2]).jobs == [job]
    trust.on_result(workers[2], job, {**reading("/t/f", A), "wrote": False})
    assert scheduler.take(workers[3]).jobs == [job]
    trust.on_result(workers[3], job, {**reading("/t/f", A), "wrote": False})
    assert job.repairing
    [repair] = scheduler.take(workers[2]).jobs
    trust.on_result(workers[2], repair, {**reading("/t/f", Y), "stat": (9, 9, 9, 9)})
    outvoted = [f for e, f in events if e == "worker.outvoted"]
    assert [(f["slot"], f["got"]) for f in outvoted] == [(1, X), (2, Y)], outvoted
    assert warned == []
