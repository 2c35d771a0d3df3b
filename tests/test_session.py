"""A session's life in the Sessions registry, on real FIFOs, without a server."""

import dataclasses
import os

import pytest

from osproject import protocol
from osproject.server.scheduler import Scheduler
from osproject.server.session import Refused, Sessions, State


class Log:
    def __init__(self):
        self.events = []

    def info(self, event, **fields):
        self.events.append((event, fields))

    warning = error = info


@pytest.fixture
def client(tmp_path):
    """A client's two FIFOs, its ends open: (request path, reply path, fds)."""
    request, reply = str(tmp_path / "request"), str(tmp_path / "reply")
    os.mkfifo(request, 0o600)
    os.mkfifo(reply, 0o600)
    reader = os.open(reply, os.O_RDONLY | os.O_NONBLOCK)
    fds = {"reply": reader}
    yield request, reply, fds
    for fd in fds.values():
        os.close(fd)


def frames_from(fd):
    lines = protocol.LineBuffer().feed(os.read(fd, 1 << 16))
    return [protocol.decode(line) for line in lines]


def test_a_session_served_to_the_end_goes_serving_draining_leaving_closed(client):
    request, reply, fds = client
    log = Log()
    sessions = Sessions(log, Scheduler(), clock=lambda: 0.0, idle_timeout=60)
    session = sessions.open(request, reply, pid=123)
    fds["request"] = os.open(request, os.O_WRONLY | os.O_NONBLOCK)
    assert session.state is State.SERVING and len(sessions) == 1
    assert frames_from(fds["reply"])[0]["welcome"] == protocol.HELLO_VERSION

    session.requested(1, 1)
    os.close(fds.pop("request"))            # the client asks for nothing more
    assert session.read() == [] and session.state is State.DRAINING
    sessions.close_finished()
    assert session.state is State.DRAINING, "a verdict is still owed"

    session.answered(protocol.verdict(1, 0, "OK", "a" * 32), "OK")
    sessions.send_replies()
    sessions.close_finished()
    assert session.state is State.CLOSED and len(sessions) == 0
    assert [next(iter(f)) for f in frames_from(fds["reply"])] == ["replies", "bye"]
    assert [e for e, _ in log.events] == ["session.opened", "session.closed"]
    with pytest.raises(RuntimeError):
        session.enter(State.SERVING)


def test_verdicts_leave_once_a_request_is_answered_in_full(client):
    """One frame a request, not one a loop pass: the client acts on a request
    only once its last verdict is in.  Those of other requests still partly
    answered go out with it."""
    request, reply, fds = client
    sessions = Sessions(Log(), Scheduler(), clock=lambda: 0.0, idle_timeout=60)
    session = sessions.open(request, reply, pid=123)
    fds["request"] = os.open(request, os.O_WRONLY | os.O_NONBLOCK)
    frames_from(fds["reply"])               # the welcome
    session.requested(1, 3)
    session.requested(2, 2)
    session.answered_ok(1, 0)
    session.answered(protocol.verdict(2, 1, "CHANGED", "b" * 32, "a" * 32), "CHANGED")
    session.answered_ok(1, 2)
    sessions.send_replies()
    with pytest.raises(BlockingIOError):
        os.read(fds["reply"], 1 << 16)      # no request is answered in full yet
    session.answered_ok(1, 1)               # request 1 is
    sessions.send_replies()
    assert frames_from(fds["reply"]) == [
        {"ok": [[1, 0, 2, 1]]},
        {"replies": [protocol.verdict(2, 1, "CHANGED", "b" * 32, "a" * 32)]}]
    session.answered_ok(2, 0)
    sessions.send_replies()
    assert frames_from(fds["reply"]) == [{"ok": [[2, 0]]}]
    assert session.outstanding == 0 and session.due == {}
    session.requested(3, 2)
    with pytest.raises(Refused, match="request 3 is still being answered"):
        session.requested(3, 1)             # its verdicts would wait for both
    session.answered_ok(3, 0)
    session.answered_ok(3, 1)
    session.requested(3, 1)                 # answered in full: the id is free again


def test_a_client_that_vanishes_is_dropped_and_its_waiting_files_forgotten(client):
    request, reply, fds = client
    log, scheduler = Log(), Scheduler()
    sessions = Sessions(log, scheduler, clock=lambda: 0.0, idle_timeout=60)
    session = sessions.open(request, reply, pid=None)
    scheduler.queues[session] = ["a job"]
    os.close(fds.pop("reply"))              # SIGKILLed: nobody reads its replies
    sessions.send(session, protocol.bye({}))
    session.flush()
    sessions.close_finished()
    assert session.state is State.DROPPED and len(sessions) == 0
    assert session not in scheduler.queues
    assert log.events[-1] == ("session.dropped",
                              {"session": session.sid, "reason": "client vanished: its "
                               "reply FIFO is closed", "files": 0, "unanswered": None})


def test_an_idle_session_is_refused_with_the_reason_and_the_registry_forgets_it(client):
    request, reply, fds = client
    now = [0.0]
    sessions = Sessions(Log(), Scheduler(), clock=lambda: now[0], idle_timeout=60)
    session = sessions.open(request, reply, pid=None)
    assert sessions.idle_deadline() == 60
    now[0] = 59.9
    sessions.drop_idle()
    assert session.state is State.SERVING
    now[0] = 60
    sessions.drop_idle()
    assert session.state is State.DROPPED and sessions.idle_deadline() is None
    assert frames_from(fds["reply"])[-1] == {"error": "idle for 60s"}


def test_a_fifo_that_is_not_the_clients_own_is_refused(client, tmp_path):
    request, reply, fds = client
    sessions = Sessions(Log(), Scheduler(), clock=lambda: 0.0, idle_timeout=60)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with pytest.raises(Refused, match="not a FIFO"):
        sessions.open(request, str(plain), pid=None)
    assert len(sessions) == 0


def _hashes(count):
    """(path, sidecar, directory, Vote) of `count` files, some with odd names."""
    from osproject.server.verifier import Vote
    out = []
    for i in range(count):
        path = os.fsdecode(b"/t/caf\xe9-%d\nx" % i) if i % 3 == 0 else f"/t/f{i}"
        out.append((path, None if i % 5 == 0 else path + ".md5", (1, i),
                    Vote(7, f"{i:032x}", (i, -i, i + 1, i + 2), bool(i % 2), 4242, 3)))
    return out


def test_unchecked_hashes_past_their_limit_wait_in_a_temp_file_and_come_back_whole(
        monkeypatch):
    from osproject.server import session as session_mod
    monkeypatch.setattr(session_mod.Unchecked, "SPILL", 500)
    unchecked = session_mod.Unchecked()
    kept = _hashes(200)
    other = _hashes(3)
    for path, sidecar, directory, vote in kept:
        unchecked.add(path, sidecar, directory, vote)
        assert len(unchecked._by_wid[7]) < 500, "never more than SPILL in memory"
    for path, sidecar, directory, vote in other:
        unchecked.add(path, sidecar, directory, dataclasses.replace(vote, wid=8))
    assert unchecked._file is not None and len(unchecked._spans[7]) > 10
    backlog = unchecked.take(7)
    assert unchecked.take(7) is None, "taken once"
    assert backlog.left == 200
    assert backlog.take(150) == kept[:150], "read back a span at a time, in order"
    assert len(backlog._ready) < 50 and backlog._spans, "not all read at once"
    assert backlog.take(100) == kept[150:] and backlog.left == 0
    assert backlog.take(1) == []
    assert [path for path, *_ in unchecked.take(8).take(10)] == [path for path, *_ in other]
    fd = unchecked._file.fileno()
    unchecked.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_unchecked_hashes_stay_in_memory_when_no_temp_file_can_be_made(monkeypatch):
    from osproject.server import session as session_mod
    monkeypatch.setattr(session_mod.Unchecked, "SPILL", 500)
    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(session_mod.tempfile, "TemporaryFile", no_room)
    unchecked = session_mod.Unchecked()
    kept = _hashes(50)
    for path, sidecar, directory, vote in kept:
        unchecked.add(path, sidecar, directory, vote)
    assert unchecked.take(7).take(50) == kept


def test_a_read_back_that_fails_half_way_loses_nothing_and_reads_nothing_twice(monkeypatch):
    from osproject.server import session as session_mod
    monkeypatch.setattr(session_mod.Unchecked, "SPILL", 500)
    unchecked = session_mod.Unchecked()
    kept = _hashes(60)
    for path, sidecar, directory, vote in kept:
        unchecked.add(path, sidecar, directory, vote)
    assert len(unchecked._spans[7]) >= 2
    real, calls = os.pread, []
    def flaky(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(*args)
    monkeypatch.setattr(session_mod.os, "pread", flaky)
    backlog = unchecked.take(7)
    with pytest.raises(OSError):
        backlog.take(60)
    assert backlog.left == 60
    assert backlog.take(60) == kept
    assert backlog.take(60) == [] and backlog.left == 0
